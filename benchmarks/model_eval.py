"""Model selection by BLEU: the same test comments sent to several models, scored side by side.

Each ``--endpoint NAME=URL[,model=M][,adapter=A][,api_key_env=VAR]`` is an OpenAI-compatible
server (NIM, vLLM, OpenAI). ``model`` is the served model name (asked from ``GET /models`` when the
server serves only one); ``adapter`` is the served name of a LoRA adapter (the NIM_PEFT_SOURCE
sub-directory or vLLM ``--lora-modules`` name), which is what requests then ask for. Each
``--local NAME=HF_DIR[,adapter=PEFT_DIR]`` generates in-process with ``recipes.generate``.

Every request is greedy (temperature 0) with ``--max-tokens``. ``--concurrency`` requests run at
once per endpoint; connection errors, timeouts and HTTP 408/429/5xx are retried with exponential
backoff (``benchmarks.openai_client``). The first failure that survives its retries stops that
endpoint (requests in flight still finish), the other endpoints still run, and nothing is scored.

Resumable: every finished generation is appended to ``OUTPUT/cache/NAME.jsonl`` and fsync'd at once,
so Ctrl-C, a crash or ``kill -9`` loses no finished item; rerunning the same command skips the cached
items and says how many. A cached item is reused only when its request is identical (id, prompt,
model, adapter, URL, max tokens), so changing a setting regenerates instead of mixing runs.

Test data (``--data``): the prepared ``hf/test.jsonl`` (chat messages, sent to /chat/completions so
the server applies the model's chat template), the NeMo-format ``test.jsonl`` (a prompt already
rendered with one model's template, sent to /completions: use it only for that model family), or a
raw pair file (.csv/.xlsx/.jsonl with date/section/draft/final[/fund]; validated and normalised by
``recipes.data`` and turned into messages by ``recipes.prompt.build_messages``).

Scores (``benchmarks.bleu.corpus_score``: sacrebleu, ja-mecab): corpus BLEU on 0-1 and 0-100 with
its signature, chrF, per-section BLEU, and sacrebleu's paired bootstrap resampling of every model
against the baseline (the first model or ``--baseline``): p-value and 95 % confidence interval.

Fact fidelity and house style (``benchmarks.bleu.check_comments``), per model: fact recall (the draft's
numbers and instruments kept), fact precision (the prediction's facts that are the draft's), the share of
comments with no finding (``benchmarks.fidelity.compare``), and the style compliance rate (share of
predictions with no ``recipes.synth_data.house_style_violations``). The draft is each item's own: the
user message of hf/ rows and raw pairs (``recipes.prompt.parse_user_message``), the rendered prompt of
NeMo rows (``recipes.prompt.draft_from_prompt``). Copying the draft scores 1.0 on fidelity and badly on
style, so both are reported, with the reference finals and the copied drafts as reference points. Each
rate's difference against the baseline gets a paired bootstrap (:func:`rates_bootstrap`: the same
resampled comment indices as sacrebleu's BLEU test, 95 % percentile interval, p-value).

Output (``--output DIR``): results.md (the table), results.json, bleu.png (BLEU per model, sorted,
values on the bars), examples.md (each prediction with a character-level diff against the
reference, and its fidelity findings with their spans and its style violations), predictions/NAME.jsonl
(``benchmarks.bleu`` reads them; they carry the draft) and cache/. ::

    python -m benchmarks.model_eval --data data/prepared/hf/test.jsonl \\
        --endpoint swallow70b=http://nim:8000/v1,model=tokyotech-llm/llama-3.1-swallow-70b-instruct-v0.1,adapter=swallow-lora \\
        --endpoint gpt4o-mini=https://api.openai.com/v1,model=gpt-4o-mini,api_key_env=OPENAI_API_KEY \\
        --baseline gpt4o-mini --output runs/model_eval --concurrency 8 --max-tokens 512
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # --local never downloads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import hashlib
import html
import json
import re
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from benchmarks.bleu import DEFAULT_TOKENIZE, RATE_NAMES, CommentChecks, check_comments, corpus_score, draft_of_row
from benchmarks.openai_client import (DEFAULT_BACKOFF, DEFAULT_RETRIES, DEFAULT_TIMEOUT, EndpointError,
                                      OpenAIClient, report_command)
from benchmarks import tracking
from recipes.fileio import iter_jsonl, write_json_atomic, write_text_atomic
from recipes.textdiff import DELETE, EQUAL, INSERT, char_diff

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # names become file names
RAW_SUFFIXES = (".csv", ".xlsx")
SIGNIFICANCE_LEVEL = 0.05


# ---------------------------------------------------------------------------------------------
# test data


@dataclass(frozen=True)
class Example:
    """One test item. Exactly one of ``messages`` (chat) and ``prompt`` (rendered) is set."""
    id: str
    reference: str
    section: str | None = None
    date: str | None = None
    fund: str | None = None
    messages: tuple[dict, ...] | None = None
    prompt: str | None = None
    draft: str | None = None  # what the model rewrites (fact fidelity); None when it cannot be recovered

    @property
    def source(self) -> str:
        """What the model was asked to rewrite, for examples.md."""
        if self.messages:
            return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")
        return self.prompt or ""


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Test items from a prepared ``hf/`` or NeMo-format JSONL, or a raw pair file (module docstring).

    Errors name the file, line and field. Ids must be unique: the cache is keyed by them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit}: must be > 0")
    if path.suffix.lower() in RAW_SUFFIXES or _first_row_has(path, "draft"):
        examples = _raw_examples(path)
    else:
        examples = [_prepared_example(path, lineno, row) for lineno, row in iter_jsonl(path)]
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"{path}: no test items")
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples, 1):
        if ex.id in seen:
            raise ValueError(f"{path}: id {ex.id!r} appears twice (items {seen[ex.id]} and {i}); ids must be unique")
        seen[ex.id] = i
    return examples


def _first_row_has(path: Path, key: str) -> bool:
    if path.suffix.lower() != ".jsonl":
        return False
    for _, row in iter_jsonl(path):
        return key in row
    return False


def _raw_examples(path: Path) -> list[Example]:
    from recipes.data import read_records  # validates and normalises exactly as training data was
    from recipes.prompt import build_messages

    return [Example(id=r.id, reference=r.final, section=r.section, date=r.date, fund=r.fund,
                    messages=tuple(build_messages(r.draft, r.section, r.date, r.fund)), draft=r.draft)
            for r in read_records(path)]


def _prepared_example(path: Path, lineno: int, row: dict) -> Example:
    where = f"{path}:{lineno}"
    meta = {k: (None if row.get(k) is None else str(row[k])) for k in ("section", "date", "fund")}
    ex_id = str(row["id"]) if row.get("id") is not None else f"line{lineno}"
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        _check_messages(where, "prompt", prompt)
        _check_messages(where, "completion", completion)
        answers = [m["content"] for m in completion if m["role"] == "assistant"]
        if len(answers) != 1:
            raise ValueError(f"{where}: field 'completion' must hold one assistant message, got {len(answers)}")
        if not any(m["role"] == "user" for m in prompt):
            raise ValueError(f"{where}: field 'prompt' has no user message")
        return Example(id=ex_id, reference=answers[0], messages=tuple(dict(m) for m in prompt),
                       draft=draft_of_row(row), **meta)
    if "input" in row:
        for key in ("input", "output"):
            if not isinstance(row.get(key), str) or (key == "input" and not row[key]):
                raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {row.get(key)!r}")
        return Example(id=ex_id, reference=row["output"], prompt=row["input"], draft=draft_of_row(row), **meta)
    raise ValueError(f"{where}: not a test item: expected fields prompt+completion (hf/ chat format), "
                     f"input+output (NeMo format) or draft+final (raw pairs); got {', '.join(sorted(row))}")


def _check_messages(where: str, key: str, value) -> None:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field {key!r} must be a non-empty list of chat messages, got {value!r}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: field {key!r}[{i}] must be {{'role': str, 'content': str}}, got {m!r}")


# ---------------------------------------------------------------------------------------------
# what to evaluate


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    url: str
    model: str | None = None  # served base model; None: ask GET /models
    adapter: str | None = None  # served LoRA name; requests ask for it
    api_key_env: str | None = None
    kind: str = "endpoint"

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "url": self.url, "model": self.model, "adapter": self.adapter}


@dataclass(frozen=True)
class LocalSpec:
    name: str
    model_dir: str
    adapter: str | None = None
    kind: str = "local"

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "model_dir": self.model_dir, "adapter": self.adapter}


def _split_spec(text: str, option: str, keys: Sequence[str]) -> tuple[str, str, dict[str, str]]:
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not rest:
        raise ValueError(f"{option} {text!r}: expected NAME=VALUE[,key=value...]")
    if not NAME_RE.match(name):
        raise ValueError(f"{option} {text!r}: name {name!r} must be letters, digits, '.', '_' or '-' "
                         "(it names the cache file)")
    first, *pairs = rest.split(",")
    opts: dict[str, str] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        k = k.strip()
        if not sep or not v.strip():
            raise ValueError(f"{option} {text!r}: {p!r} is not key=value")
        if k not in keys:
            raise ValueError(f"{option} {text!r}: unknown key {k!r} (known: {', '.join(keys)})")
        opts[k] = v.strip()
    return name, first.strip(), opts


def parse_endpoint_spec(text: str) -> EndpointSpec:
    """``NAME=URL[,model=M][,adapter=A][,api_key_env=VAR]`` -> EndpointSpec."""
    from benchmarks.openai_client import normalize_base_url

    name, url, opts = _split_spec(text, "--endpoint", ("model", "adapter", "api_key_env"))
    try:
        url = normalize_base_url(url)
    except ValueError as e:
        raise ValueError(f"--endpoint {text!r}: {e}") from None
    return EndpointSpec(name=name, url=url, **opts)


def parse_local_spec(text: str) -> LocalSpec:
    """``NAME=HF_DIR[,adapter=PEFT_DIR]`` -> LocalSpec (the directories must exist)."""
    name, model_dir, opts = _split_spec(text, "--local", ("adapter",))
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"--local {text!r}: {model_dir} is not a Hugging Face model dir (no config.json)")
    if "adapter" in opts and not (Path(opts["adapter"]) / "adapter_config.json").is_file():
        raise ValueError(f"--local {text!r}: {opts['adapter']} is not a PEFT adapter dir (no adapter_config.json)")
    return LocalSpec(name=name, model_dir=str(Path(model_dir).resolve()),
                     adapter=str(Path(opts["adapter"]).resolve()) if "adapter" in opts else None)


# ---------------------------------------------------------------------------------------------
# resumable cache


def request_key(example: Example, target: dict, max_tokens: int) -> str:
    """Hash of everything that decides a greedy answer; a cached answer is reused only on a match."""
    blob = json.dumps({"id": example.id, "messages": example.messages, "prompt": example.prompt,
                       "target": target, "max_tokens": max_tokens, "temperature": 0.0},
                      ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


class ResultCache:
    """Append-only JSONL of finished generations, one object per line with a ``key``.

    Each :meth:`add` writes one whole line and fsyncs before returning, so a finished item survives
    any crash. A torn last line (a kill in the middle of a write) is cut off on open: that item had
    not finished. Safe to :meth:`add` from several threads.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.torn = self._repair_tail()
        if self.path.exists():
            for lineno, row in iter_jsonl(self.path):
                if not isinstance(row.get("key"), str):
                    raise ValueError(f"{self.path}:{lineno}: cache row without a 'key' (not a model_eval cache?)")
                self._rows[row["key"]] = row

    def _repair_tail(self) -> bool:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with self.path.open("rb+") as fh:
            data = fh.read()
            if data.endswith(b"\n"):
                return False
            fh.truncate(data.rfind(b"\n") + 1)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def get(self, key: str) -> dict | None:
        return self._rows.get(key)

    def add(self, row: dict) -> None:
        if not isinstance(row.get("key"), str):
            raise ValueError("cache row needs a string 'key'")
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._rows[row["key"]] = row


# ---------------------------------------------------------------------------------------------
# generation


@dataclass
class RunStats:
    """What one model's run did: cached = reused from an earlier run, generated = new this run."""
    total: int = 0
    cached: int = 0
    generated: int = 0
    elapsed_s: float = 0.0
    client: dict = field(default_factory=dict)  # requests / retries / failures sent this run
    served_model: str | None = None

    def to_dict(self) -> dict:
        return {"total": self.total, "cached": self.cached, "generated": self.generated,
                "elapsed_s": round(self.elapsed_s, 3), "requests_sent": self.client.get("requests"),
                "retries": self.client.get("retries"), "failures": self.client.get("failures"),
                "served_model": self.served_model}


def _pending(examples: list[Example], cache: ResultCache, target: dict, max_tokens: int):
    keyed = [(ex, request_key(ex, target, max_tokens)) for ex in examples]
    return keyed, [(ex, k) for ex, k in keyed if k not in cache]


def resolve_model(client: OpenAIClient, spec: EndpointSpec) -> str:
    """The model name requests ask for (adapter, else model, else the only served model), checked
    against ``GET /models`` when the server lists its models."""
    wanted = spec.adapter or spec.model
    try:
        served = client.list_models()
    except EndpointError as e:
        if e.status == 404 and wanted:  # some gateways have no /models; trust the user
            return wanted
        raise
    if wanted is None:
        if len(served) != 1:
            raise EndpointError(spec.name, f"serves {len(served)} models ({', '.join(served) or 'none'}): "
                                           "say which with model=NAME")
        return served[0]
    if wanted not in served:
        what = "adapter" if spec.adapter else "model"
        raise EndpointError(spec.name, f"{what} {wanted!r} is not served here (served: {', '.join(served)})")
    return wanted


def run_endpoint(spec: EndpointSpec, examples: list[Example], cache: ResultCache, *, max_tokens: int,
                 concurrency: int = 4, timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF, progress: bool = True) -> RunStats:
    """Generate every example not yet in ``cache`` on one endpoint, ``concurrency`` at a time.

    Workers write each answer to the cache as soon as it arrives. On the first EndpointError no new
    request starts, those in flight finish (and are cached), and the error is re-raised.
    """
    from tqdm.auto import tqdm

    if concurrency <= 0:
        raise ValueError(f"concurrency={concurrency}: must be > 0")
    stats = RunStats(total=len(examples))
    t0 = time.perf_counter()
    with OpenAIClient(spec.url, name=spec.name, api_key_env=spec.api_key_env, timeout=timeout, retries=retries,
                      backoff=backoff, max_connections=max(concurrency, 4)) as client:
        try:
            model = resolve_model(client, spec)
            stats.served_model = model
            target = {"url": spec.url, "model": model, "base": spec.model}
            keyed, todo = _pending(examples, cache, target, max_tokens)
            stats.cached = len(keyed) - len(todo)
            _say_resume(spec.name, stats.cached, len(todo), len(keyed))

            def one(ex: Example, key: str) -> None:
                if ex.messages is not None:
                    c = client.chat(list(ex.messages), model, max_tokens=max_tokens, temperature=0.0)
                else:
                    c = client.complete(ex.prompt, model, max_tokens=max_tokens, temperature=0.0)
                cache.add({"key": key, "id": ex.id, "text": c.text, "finish_reason": c.finish_reason,
                           "usage": c.usage, "latency_s": round(c.latency_s, 4), "attempts": c.attempts,
                           "model": model, "time": time.time()})

            with tqdm(total=len(todo), desc=spec.name, unit="item", disable=not progress) as bar:
                stats.generated = _run_pool(one, todo, concurrency, bar)
        finally:
            stats.client = client.stats.to_dict()
            stats.elapsed_s = time.perf_counter() - t0
    return stats


def _run_pool(fn, todo: list, concurrency: int, bar) -> int:
    """Run ``fn(*item)`` for each item of ``todo``, at most ``concurrency`` at a time; returns how
    many succeeded. After the first error (or Ctrl-C) nothing new starts, the calls already running
    finish (their answers are cached), and the error is re-raised."""
    done = 0
    first_error: BaseException | None = None
    items = iter(todo)
    running: set = set()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="model_eval") as pool:
        try:
            while True:
                # Submit lazily, never more than `concurrency` at once, so an error stops new requests.
                while first_error is None and len(running) < concurrency:
                    item = next(items, None)
                    if item is None:
                        break
                    running.add(pool.submit(fn, *item))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    exc = f.exception()
                    if exc is None:
                        done += 1
                        bar.update(1)
                    elif first_error is None:
                        first_error = exc
        except BaseException:
            wait(running)
            raise
    if first_error is not None:
        raise first_error
    return done


def _say_resume(name: str, cached: int, todo: int, total: int) -> None:
    if cached:
        print(f"{name}: resuming: {cached} of {total} items already generated (cached, skipped), "
              f"{todo} to generate", file=sys.stderr)
    else:
        print(f"{name}: {todo} items to generate", file=sys.stderr)


def run_local(spec: LocalSpec, examples: list[Example], cache: ResultCache, *, max_tokens: int,
              batch_size: int = 4, progress: bool = True) -> RunStats:
    """Greedy generation in this process (``recipes.generate``), cached batch by batch."""
    from tqdm.auto import tqdm

    from recipes.generate import generate_texts, load_model
    from recipes.prompt import render_prompt

    stats = RunStats(total=len(examples), served_model=spec.model_dir)
    t0 = time.perf_counter()
    target = {"local": spec.model_dir, "adapter": spec.adapter}
    keyed, todo = _pending(examples, cache, target, max_tokens)
    stats.cached = len(keyed) - len(todo)
    _say_resume(spec.name, stats.cached, len(todo), len(keyed))
    if todo:
        model, tokenizer = load_model(spec.model_dir, spec.adapter)
        with tqdm(total=len(todo), desc=spec.name, unit="item", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                prompts = [ex.prompt if ex.prompt is not None else render_prompt(tokenizer, list(ex.messages))
                           for ex, _ in batch]
                texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_tokens,
                                       batch_size=batch_size, progress=False)
                for (ex, key), text in zip(batch, texts):
                    cache.add({"key": key, "id": ex.id, "text": text, "model": spec.model_dir,
                               "adapter": spec.adapter, "time": time.time()})
                stats.generated += len(batch)
                bar.update(len(batch))
    stats.elapsed_s = time.perf_counter() - t0
    return stats


def cached_predictions(examples: list[Example], cache: ResultCache, target: dict, max_tokens: int) -> list[str]:
    """Predictions (stripped, as recipes.generate does) in example order; every item must be cached."""
    out = []
    for ex in examples:
        row = cache.get(request_key(ex, target, max_tokens))
        if row is None:
            raise KeyError(f"{cache.path}: no cached answer for item {ex.id!r}")
        out.append(str(row.get("text") or "").strip())
    return out


# ---------------------------------------------------------------------------------------------
# scoring


def paired_bootstrap(named: list[tuple[str, list[str]]], references: list[str], *, n_samples: int = 1000,
                     tokenize: str = DEFAULT_TOKENIZE) -> dict:
    """sacrebleu's paired bootstrap resampling of every system against the first (the baseline).

    Returns ``{name: {"BLEU": {...}, "chrF": {...}}}`` with score, bootstrap mean, 95 % CI half-width
    and bounds, and (not for the baseline) the p-value of the difference; plus ``"_signature"``.
    """
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    if len(named) < 2:
        raise ValueError("paired bootstrap needs a baseline and at least one other system")
    test = PairedTest(named, {"BLEU": BLEU(tokenize=tokenize), "chrF": CHRF()}, [references], test_type="bs",
                      n_samples=n_samples)
    sigs, scores = test()
    out: dict = {name: {} for name in scores["System"]}
    for metric, results in scores.items():
        if metric == "System":
            continue
        key = "chrF" if metric.startswith("chrF") else metric
        for name, r in zip(scores["System"], results):
            out[name][key] = {"score": float(r.score), "mean": float(r.mean), "ci": float(r.ci),
                              "ci_low": float(r.mean - r.ci), "ci_high": float(r.mean + r.ci),
                              "p_value": None if r.p_value is None else float(r.p_value)}
    out["_signature"] = {("chrF" if k.startswith("chrF") else k): str(v) for k, v in sigs.items()}
    return out


def score_models(predictions: dict[str, list[str]], examples: list[Example], *, baseline: str | None = None,
                 bootstrap: int = 1000, tokenize: str = DEFAULT_TOKENIZE) -> dict:
    """Corpus BLEU/chrF/per-section of each model and, with two or more, the paired bootstrap test.

    Returns {"baseline", "models": {name: BleuResult.to_dict() + "significance"}, "ranking", signatures}.
    """
    names = list(predictions)
    baseline = baseline or names[0]
    if baseline not in predictions:
        raise ValueError(f"baseline {baseline!r} is not one of the models ({', '.join(names)})")
    refs = [ex.reference for ex in examples]
    sections = [ex.section for ex in examples]
    models = {n: corpus_score(predictions[n], refs, tokenize=tokenize, sections=sections).to_dict() for n in names}
    sig = None
    if bootstrap and len(names) > 1:
        order = [baseline] + [n for n in names if n != baseline]
        sig = paired_bootstrap([(n, predictions[n]) for n in order], refs, n_samples=bootstrap, tokenize=tokenize)
    for n in names:
        models[n]["significance"] = sig.get(n) if sig else None
        models[n]["delta_vs_baseline"] = models[n]["score"] - models[baseline]["score"]
    ranking = sorted(names, key=lambda n: -models[n]["score"])
    first = models[names[0]]
    return {"baseline": baseline, "models": models, "ranking": ranking, "signature": first["signature"],
            "chrf_signature": first["chrf_signature"],
            "bootstrap": None if sig is None else {"n_samples": bootstrap, "signature": sig["_signature"],
                                                   "method": "sacrebleu paired bootstrap resampling"}}


def _sacrebleu_seed() -> int | None:
    """The seed sacrebleu's bootstrap uses (``SACREBLEU_SEED``, default 12345; 'none': unseeded)."""
    seed = os.environ.get("SACREBLEU_SEED", "12345")
    return None if seed.lower() == "none" else int(seed)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def rates_bootstrap(checks: dict[str, CommentChecks], baseline: str, *, n_samples: int = 1000,
                    seed: int | None | str = "sacrebleu") -> dict:
    """Paired bootstrap of each per-comment rate's difference (model - baseline).

    The comment indices are drawn as sacrebleu's paired bootstrap draws them for BLEU
    (``numpy.random.default_rng(seed).choice(N, size=(n_samples, N))``, seed ``SACREBLEU_SEED`` or 12345),
    so each resample is the same set of comments as in the BLEU test. Each rate is recomputed on every
    resample as sum(numerator) / sum(denominator) (fact recall: kept / draft facts; fact precision: kept /
    prediction facts; no finding and style compliance: share of comments) for the model and the baseline.
    Reported: the observed difference, the 2.5-97.5 percentile interval of the resampled differences, and
    the two-sided p-value of "no difference": (1 + #{|d_i - mean(d)| >= |observed|}) / (1 + resamples),
    the resampled differences shifted to mean 0 (a zero observed difference gives p = 1). Resamples where
    a rate is undefined (no facts in the resampled comments) are left out (``samples``).

    Returns ``{name: {rate: {...}}}`` for every model but the baseline; a rate that cannot be computed
    (no drafts, no facts) is ``{"note": why}``.
    """
    import numpy as np

    if baseline not in checks:
        raise ValueError(f"baseline {baseline!r} is not one of the models ({', '.join(checks)})")
    n = checks[baseline].n
    if n == 0:
        raise ValueError("no comments to resample")
    if seed == "sacrebleu":
        seed = _sacrebleu_seed()
    idxs = np.random.default_rng(seed).choice(n, size=(n_samples, n), replace=True)
    base = checks[baseline].ratios()

    def resampled(num, den):
        num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
        d = den[idxs].sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(d > 0, num[idxs].sum(1) / np.where(d > 0, d, 1.0), np.nan)

    base_rs = {m: resampled(*nd) for m, nd in base.items()}
    out: dict = {}
    for name, c in checks.items():
        if name == baseline:
            continue
        if c.n != n:
            raise ValueError(f"{name}: {c.n} comments, baseline {baseline} has {n}")
        mine = c.ratios()
        res = out[name] = {}
        for m in RATE_NAMES:
            if m not in mine or m not in base:
                res[m] = {"note": "not available: no drafts to check the facts against"}
                continue
            v, b = _ratio(sum(mine[m][0]), sum(mine[m][1])), _ratio(sum(base[m][0]), sum(base[m][1]))
            if v is None or b is None:
                res[m] = {"note": "undefined: no facts in the drafts or the predictions", "model": v, "baseline": b}
                continue
            d = resampled(*mine[m]) - base_rs[m]
            d = d[~np.isnan(d)]
            obs = v - b
            if not len(d):
                res[m] = {"note": "undefined on every resample", "model": v, "baseline": b, "delta": obs}
                continue
            lo, hi = np.percentile(d, [2.5, 97.5])
            p = (1 + int(np.sum(np.abs(d - d.mean()) >= abs(obs) - 1e-12))) / (1 + len(d))
            res[m] = {"model": v, "baseline": b, "delta": obs, "ci_low": float(lo), "ci_high": float(hi),
                      "p_value": float(p), "samples": int(len(d))}
    return out


def score_rates(predictions: dict[str, list[str]], examples: list[Example], *, baseline: str | None = None,
                bootstrap: int = 1000, extractor=None) -> tuple[dict, dict[str, CommentChecks]]:
    """Fact fidelity (when every item has its draft) and house style of each model, of the reference finals
    and of the drafts copied; with two or more models and ``bootstrap`` > 0, :func:`rates_bootstrap`
    against the baseline. Returns (the "rates" part of results.json, {name: CommentChecks})."""
    names = list(predictions)
    baseline = baseline or names[0]
    missing = [ex.id for ex in examples if ex.draft is None]
    drafts = None if missing else [ex.draft for ex in examples]
    checks = {n: check_comments(predictions[n], drafts, extractor=extractor) for n in names}
    if drafts is None:
        note = (f"fact fidelity not available: {len(missing)} of {len(examples)} items have no recoverable draft "
                f"(first: {missing[0]!r}); style compliance needs none")
        source = None
    else:
        note = None
        source = ("the user message of each item (recipes.prompt.parse_user_message)" if examples[0].messages
                  else "the rendered prompt of each item (recipes.prompt.draft_from_prompt)")
    if not bootstrap:
        boot = {"applies": False, "reason": "no bootstrap (--bootstrap 0)"}
    elif len(names) < 2:
        boot = {"applies": False, "reason": "one model: no baseline to test against"}
    else:
        boot = {"applies": True, "n_samples": bootstrap, "seed": _sacrebleu_seed(),
                "method": "paired bootstrap of the per-comment rates (the same resampled comment indices as "
                          "sacrebleu's BLEU test): difference vs the baseline, 2.5-97.5 percentile interval, "
                          "p = (1 + #{|d_i - mean d| >= |observed|}) / (1 + resamples)"}
    sig = rates_bootstrap(checks, baseline, n_samples=bootstrap) if boot["applies"] else {}
    refs = check_comments([ex.reference for ex in examples], drafts, extractor=extractor)
    models = {n: {**checks[n].to_dict(), "rates": checks[n].rates(), "significance": sig.get(n)} for n in names}
    out = {"baseline": baseline, "fidelity_available": drafts is not None, "drafts": source, "note": note,
           "bootstrap": boot, "models": models,
           "reference_finals": {**refs.to_dict(), "rates": refs.rates()}}
    if drafts is not None:
        copied = check_comments(drafts, drafts, extractor=extractor)
        out["drafts_copied"] = {**copied.to_dict(), "rates": copied.rates()}
    else:
        out["drafts_copied"] = None
    return out, checks


# ---------------------------------------------------------------------------------------------
# reports


def diff_markup(reference: str, prediction: str) -> str:
    """One line of HTML for Markdown: ``<del>`` what the prediction drops, ``<ins>`` what it adds,
    newlines as ``<br>`` (so the markup never spans a Markdown block). The character diff is
    ``recipes.textdiff.char_diff`` with SequenceMatcher's own alignment of the whole texts
    (``merge_short=0, trim_ends=False``), as examples.md has always shown it."""
    tags = {EQUAL: "{}", DELETE: "<del>{}</del>", INSERT: "<ins>{}</ins>"}
    return "".join(tags[op].format(_html_line(text))
                   for op, text in char_diff(reference, prediction, merge_short=0, trim_ends=False))


def _html_line(text: str) -> str:
    return html.escape(text).replace("\n", "↵<br>").replace("|", "&#124;")


def _html_inline(text: str) -> str:
    """Text for one Markdown list item: escaped, newlines as ↵."""
    return html.escape(text, quote=False).replace("\n", "↵").replace("|", "&#124;")


def _span(span, text: str) -> str:
    return f"[{span[0]}, {span[1]}) <code>{_html_inline(text)}</code>" if span else "–"


def check_lines(check: CommentChecks, i: int) -> list[str]:
    """examples.md lines for one prediction: each fidelity finding (kind, message, the span in the draft and
    in the prediction) and each house-style violation."""
    lines = []
    if check.comparisons is not None:
        c = check.comparisons[i]
        if c.faithful:
            lines.append(f"- fact check: no finding ({c.kept} of {len(c.draft_facts)} draft facts kept)")
        else:
            lines.append(f"- fact check: {len(c.findings)} finding(s), {c.kept} of {len(c.draft_facts)} draft facts "
                         f"kept, {len(c.final_facts)} facts in the prediction")
            for f in c.findings:
                lines.append(f"  - <code>{f.kind}</code> {_html_inline(f.message)} — draft {_span(f.draft_span, f.draft_text)}"
                             f", prediction {_span(f.final_span, f.final_text)}")
    vs = check.violations[i]
    lines.append("- house style: " + ("no violation" if not vs else f"{len(vs)} violation(s): "
                                      + "; ".join(_html_inline(v) for v in vs)))
    return lines


def write_examples_md(path: Path, examples: list[Example], predictions: dict[str, list[str]], limit: int,
                      tokenize: str = DEFAULT_TOKENIZE, checks: dict[str, CommentChecks] | None = None) -> None:
    from sacrebleu.metrics import BLEU

    sent = BLEU(tokenize=tokenize, effective_order=True)
    lines = ["# Examples: predictions against the reference", "",
             "Character-level diff against the reference: <del>struck out</del> = in the reference but "
             "missing from the prediction, <ins>underlined</ins> = added by the prediction. "
             "Sentence BLEU (effective order) is for orientation only; the corpus score is in results.md.", ""]
    if checks:
        has_drafts = any(c.comparisons is not None for c in checks.values())
        lines += ["Under each prediction: " + ("its fact check against the draft (`benchmarks.fidelity`: kind, "
                  "message, and the span `[start, end)` in the draft and in the prediction, character offsets) and "
                  if has_drafts else "(no drafts: no fact check) ")
                  + "its house-style violations (`recipes.synth_data.house_style_violations`).", ""]
    shown = examples[:limit] if limit >= 0 else examples
    for i, ex in enumerate(shown):
        meta = " · ".join(x for x in (ex.section, ex.date, ex.fund) if x)
        lines += [f"## {i + 1}. `{ex.id}`" + (f" — {meta}" if meta else ""), "",
                  "**Input**", "", f"<blockquote>{_html_line(ex.source)}</blockquote>", "",
                  "**Reference**", "", f"<blockquote>{_html_line(ex.reference)}</blockquote>", ""]
        for name, preds in predictions.items():
            p = preds[i]
            score = sent.sentence_score(p, [ex.reference]).score
            tag = "exact match" if p == ex.reference else f"sentence BLEU {score:.1f}"
            lines += [f"**{html.escape(name)}** ({tag})", "", f"<blockquote>{diff_markup(ex.reference, p)}</blockquote>",
                      ""]
            if checks and name in checks:
                lines += check_lines(checks[name], i) + [""]
    if len(shown) < len(examples):
        lines.append(f"({len(examples) - len(shown)} more items not shown; see predictions/ or --examples)")
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_bleu_chart(path: Path, scores: dict) -> None:
    """Bar chart like the team's slide: BLEU (0-100) per model, best first, value on each bar,
    bootstrap 95 % CI as whiskers when there is one, the baseline hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.report import savefig_atomic

    names = scores["ranking"]
    vals = [scores["models"][n]["score"] for n in names]
    err = None
    sigs = [scores["models"][n].get("significance") for n in names]
    if all(s and "BLEU" in s for s in sigs):
        err = [[max(0.0, v - s["BLEU"]["ci_low"]) for v, s in zip(vals, sigs)],
               [max(0.0, s["BLEU"]["ci_high"] - v) for v, s in zip(vals, sigs)]]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 1.5), 4.4))
    bars = ax.bar(range(len(names)), vals, color="tab:blue", yerr=err, capsize=4 if err else 0,
                  error_kw={"ecolor": "0.35", "lw": 1})
    for bar, n in zip(bars, names):
        if n == scores["baseline"] and len(names) > 1:
            bar.set_hatch("//")
            bar.set_facecolor("tab:gray")
    tops = [v + (err[1][i] if err else 0.0) for i, v in enumerate(vals)]
    for bar, v, top in zip(bars, vals, tops):  # above the whisker, so the number is never crossed out
        ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, top), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=10, fontweight="bold")
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel("BLEU (0-100, sacrebleu ja-mecab)")
    n = scores["models"][names[0]]["n_segments"]
    ax.set_title(f"BLEU per model, {n} test comments" + ("\n(whiskers: bootstrap 95% CI)" if err else ""),
                 fontsize=11)
    ax.set_ylim(0, max(tops + [1.0]) * 1.12 + 2)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    savefig_atomic(fig, path)
    plt.close(fig)


def _rate(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _delta_cell(s: dict | None) -> tuple[str, str]:
    """(Δ [95 % CI], p) cells of one rate's bootstrap result."""
    if not s or "p_value" not in s:
        return ("n/a" if not s else html.escape(s.get("note", "n/a"))), "–"
    mark = " *" if s["p_value"] < SIGNIFICANCE_LEVEL else ""
    return f"{s['delta']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]", f"{s['p_value']:.4f}{mark}"


def rates_of_result(result: dict) -> dict | None:
    """:func:`score_rates`'s dict back from results.json's content (None for a result written before it)."""
    if not result.get("rates"):
        return None
    return {**result["rates"], "models": {n: {"fidelity": m["fidelity"], "style": m["style"], "rates": m["rates"],
                                              "significance": m["rates_significance"]}
                                          for n, m in result["models"].items()}}


def rates_markdown(rates: dict, ranking: Sequence[str], heading: str = "##") -> list[str]:
    """results.md's section on fact fidelity and house style (``rates`` from :func:`score_rates`)."""
    base = rates["baseline"]
    lines = [f"{heading} Fact fidelity and house style", ""]
    if rates["fidelity_available"]:
        lines += [f"Fact fidelity (`benchmarks.fidelity`) of each prediction against its draft (drafts: {rates['drafts']}):"
                  " **fact recall** = draft facts (numbers with unit, sign and period; named instruments) kept "
                  "unchanged, **fact precision** = prediction facts that are the draft's, **no finding** = share of "
                  "comments with no missing, added or changed fact. **Style compliance** = share of predictions with "
                  "no `recipes.synth_data.house_style_violations`. Copying the draft scores 1.0 on fidelity and "
                  "fails on style (*drafts copied*); a good rewrite is high on both (*reference finals*).", ""]
    else:
        lines += [f"{rates['note']}. **Style compliance** = share of predictions with no "
                  "`recipes.synth_data.house_style_violations`.", ""]
    kinds = list(next(iter(rates["models"].values()))["fidelity"]["findings"]) if rates["fidelity_available"] else []
    lines += ["| model | fact recall | fact precision | no finding | style compliance | draft facts kept | "
              "prediction facts | " + "".join(f"{k} | " for k in kinds) + "style violations |",
              "|---|---|---|---|---|---|---|" + "---|" * len(kinds) + "---|"]
    rows = [(n, rates["models"][n]) for n in ranking]
    rows += [("*reference finals*", rates["reference_finals"])]
    if rates.get("drafts_copied"):
        rows += [("*drafts copied*", rates["drafts_copied"])]
    for name, r in rows:
        f, st, rt = r["fidelity"], r["style"], r["rates"]
        facts = (f"{f['kept']}/{f['draft_facts']} | {f['final_facts']} | " + "".join(f"{f['findings'][k]} | " for k in kinds)
                 if f else "– | – | ")
        lines.append(f"| {name} | {_rate(rt['fact_recall'])} | {_rate(rt['fact_precision'])} | "
                     f"{_rate(rt['faithful_share'])} | {_rate(rt['style_compliance'])} ({st['compliant']}/{st['n']}) | "
                     f"{facts}{st['violations']} |")
    lines.append("")
    boot = rates["bootstrap"]
    if not boot["applies"]:
        lines += [f"Paired bootstrap of these rates: does not apply ({boot['reason']}).", ""]
        return lines
    lines += [f"Difference vs **{base}**: {boot['method']}; {boot['n_samples']} resamples, seed {boot['seed']}. "
              f"Δ [95% interval], p-value (* p < {SIGNIFICANCE_LEVEL}).", "",
              "| model | " + " | ".join(f"Δ {label} | p" for label in RATE_NAMES.values()) + " |",
              "|---|" + "---|---|" * len(RATE_NAMES)]
    for n in ranking:
        if n == base:
            lines.append(f"| {n} | " + " | ".join("(baseline) | –" for _ in RATE_NAMES) + " |")
            continue
        sig = rates["models"][n]["significance"] or {}
        lines.append(f"| {n} | " + " | ".join(" | ".join(_delta_cell(sig.get(m))) for m in RATE_NAMES) + " |")
    return lines + [""]


def results_markdown(scores: dict, specs: dict[str, dict], runs: dict[str, dict], meta: dict,
                     rates: dict | None = None) -> str:
    base = scores["baseline"]
    models = scores["models"]
    lines = ["# Model selection: BLEU on the test comments", "",
             f"Data `{meta['data']}`: {meta['n_examples']} items; greedy (temperature 0), max {meta['max_tokens']} "
             f"new tokens. Baseline for the significance test: **{base}**.", "",
             "| rank | model | BLEU (0–1) | BLEU (0–100) | 95% CI | Δ vs baseline | p-value | significant | chrF |"
             + (" fact recall | fact precision | no finding | style compliance |" if rates else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if rates else "")]
    for rank, n in enumerate(scores["ranking"], 1):
        m = models[n]
        s = (m.get("significance") or {}).get("BLEU")
        ci = f"{s['mean']:.1f} ± {s['ci']:.1f}" if s else "–"
        if n == base:
            delta, p, signif = "(baseline)", "–", "–"
        else:
            delta = f"{m['delta_vs_baseline']:+.2f}"
            p = f"{s['p_value']:.4f}" if s and s["p_value"] is not None else "–"
            signif = ("yes" if s["p_value"] < SIGNIFICANCE_LEVEL else "no") if s and s["p_value"] is not None else "–"
        extra = ""
        if rates:
            rt = rates["models"][n]["rates"]
            extra = "".join(f" {_rate(rt[k])} |" for k in RATE_NAMES)
        lines.append(f"| {rank} | {n} | {m['score01']:.3f} | {m['score']:.2f} | {ci} | {delta} | {p} | {signif} "
                     f"| {m['chrf']:.2f} |{extra}")
    lines += ["", f"BLEU signature: `{scores['signature']}`  ", f"chrF signature: `{scores['chrf_signature']}`"]
    if scores.get("bootstrap"):
        b = scores["bootstrap"]
        lines += ["", f"Significance: {b['method']}, {b['n_samples']} resamples, each model against {base}; "
                      f"'significant' means p < {SIGNIFICANCE_LEVEL}. 95% CI: bootstrap mean ± half-width of the "
                      "2.5–97.5 percentile range (sacrebleu). "
                      f"Signature: `{b['signature'].get('BLEU', '')}`"]
    sections = list(dict.fromkeys(s for n in models for s in models[n]["per_section"]))
    if sections:
        lines += ["", "## BLEU per section (0–100)", "",
                  "| model | " + " | ".join(f"{s} (n={models[scores['ranking'][0]]['per_section'].get(s, {}).get('n', 0)})"
                                             for s in sections) + " |",
                  "|---|" + "---|" * len(sections)]
        for n in scores["ranking"]:
            ps = models[n]["per_section"]
            lines.append(f"| {n} | " + " | ".join(f"{ps[s]['score']:.2f}" if s in ps else "–" for s in sections) + " |")
    if rates:
        lines += [""] + rates_markdown(rates, scores["ranking"])[:-1]
    lines += ["", "## Models and runs", "",
              "| model | where | served as | cached (reused) | generated now | HTTP requests (incl. GET /models) | retries "
              "| time (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for n in specs:
        sp, r = specs[n], runs[n]
        where = sp.get("url") or sp.get("model_dir")
        served = r.get("served_model") or ""
        if sp.get("adapter"):
            served += f" (adapter of {sp.get('model')})" if sp["kind"] == "endpoint" else f" + {sp['adapter']}"
        lines.append(f"| {n} | `{where}` | `{served}` | {r['cached']} | {r['generated']} | "
                     f"{r.get('requests_sent', '–')} | {r.get('retries', '–')} | {r['elapsed_s']:.1f} |")
    lines += ["", "![BLEU per model](bleu.png)", "",
              "Per-example outputs with a character diff against the reference (and their fact-check findings "
              "and style violations): [examples.md](examples.md). "
              "Predictions: `predictions/NAME.jsonl` (`python -m benchmarks.bleu` rescores them)."]
    return "\n".join(lines) + "\n"


def write_predictions_jsonl(path: Path, examples: list[Example], preds: list[str],
                            check: CommentChecks | None = None) -> None:
    """The recipes.generate record format, so benchmarks.bleu reads it; plus the draft (when known, so
    benchmarks.bleu finds it), the house-style violations and the fidelity comparison of each prediction."""
    rows = []
    for i, (ex, p) in enumerate(zip(examples, preds)):
        row = {"id": ex.id, "section": ex.section, "date": ex.date, "prediction": p, "reference": ex.reference}
        if ex.draft is not None:
            row["draft"] = ex.draft
        if check is not None:
            row["style_violations"] = check.violations[i]
            if check.comparisons is not None:
                row["fidelity"] = check.comparisons[i].to_dict()
        rows.append(row)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# driver


def check_output_dir(output: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """A model_eval output dir (it has cache/) is resumed; any other non-empty dir needs --overwrite."""
    out = output.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if p == out or out in p.parents:
            raise FileExistsError(f"{output}: output dir holds the input {p}; choose another --output")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{output}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "cache").is_dir() and not overwrite:
        raise FileExistsError(f"{output}: exists and is not a model_eval output (no cache/); "
                              "pass --overwrite to write into it")


def evaluate(data: str | Path, output: str | Path, endpoints: Sequence[EndpointSpec] = (),
             locals_: Sequence[LocalSpec] = (), *, max_tokens: int = 512, concurrency: int = 4,
             timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
             baseline: str | None = None, bootstrap: int = 1000, limit: int | None = None, n_examples: int = 50,
             batch_size: int = 4, tokenize: str = DEFAULT_TOKENIZE, overwrite: bool = False,
             progress: bool = True, vocabulary: str | Path | None = None) -> dict:
    """Generate (resuming from the cache), score and write the reports; returns results.json's content.

    Raises EndpointError (after trying every model) when some model could not finish.
    """
    output = Path(output)
    specs: list = list(endpoints) + list(locals_)
    if not specs:
        raise ValueError("nothing to evaluate: give at least one --endpoint or --local")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
    if baseline is not None and baseline not in names:
        raise ValueError(f"--baseline {baseline!r} is not one of the models ({', '.join(names)})")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens={max_tokens}: must be > 0")
    check_output_dir(output, [Path(data)], overwrite)
    extractor = None
    if vocabulary is not None:
        from benchmarks.fidelity import FactExtractor, load_vocabulary

        extractor = FactExtractor(load_vocabulary(vocabulary))
    examples = load_examples(data, limit)
    (output / "cache").mkdir(parents=True, exist_ok=True)
    runs: dict[str, RunStats] = {}
    targets: dict[str, dict] = {}
    caches: dict[str, ResultCache] = {}
    errors: list[str] = []
    for spec in specs:
        cache = caches[spec.name] = ResultCache(output / "cache" / f"{spec.name}.jsonl")
        if cache.torn:
            print(f"{spec.name}: cut a half-written last line off {cache.path} (that item had not finished)",
                  file=sys.stderr)
        try:
            if isinstance(spec, LocalSpec):
                runs[spec.name] = run_local(spec, examples, cache, max_tokens=max_tokens, batch_size=batch_size,
                                            progress=progress)
                targets[spec.name] = {"local": spec.model_dir, "adapter": spec.adapter}
            else:
                runs[spec.name] = stats = run_endpoint(spec, examples, cache, max_tokens=max_tokens,
                                                       concurrency=concurrency, timeout=timeout, retries=retries,
                                                       backoff=backoff, progress=progress)
                targets[spec.name] = {"url": spec.url, "model": stats.served_model, "base": spec.model}
        except EndpointError as e:
            errors.append(str(e))
            print(f"error: {e}", file=sys.stderr)
    if errors:
        done = {n: len(c) for n, c in caches.items()}
        raise EndpointError(", ".join(n for n in names if n not in runs) or "evaluation",
                            f"{len(errors)} model(s) could not finish; finished items are cached "
                            f"({', '.join(f'{n}: {k}' for n, k in done.items())}); rerun the same command to resume. "
                            "Errors:\n  " + "\n  ".join(errors))
    predictions = {n: cached_predictions(examples, caches[n], targets[n], max_tokens) for n in names}
    scores = score_models(predictions, examples, baseline=baseline, bootstrap=bootstrap, tokenize=tokenize)
    rates, checks = score_rates(predictions, examples, baseline=scores["baseline"], bootstrap=bootstrap,
                                extractor=extractor)
    spec_info = {s.name: s.describe() for s in specs}
    run_info = {n: runs[n].to_dict() for n in names}
    meta = {"data": str(data), "n_examples": len(examples), "max_tokens": max_tokens, "concurrency": concurrency}
    result = {**meta, "temperature": 0.0, "baseline": scores["baseline"], "ranking": scores["ranking"],
              "signature": scores["signature"], "chrf_signature": scores["chrf_signature"],
              "bootstrap": scores["bootstrap"],
              "models": {n: {**spec_info[n], "run": run_info[n], "bleu": scores["models"][n],
                             "fidelity": rates["models"][n]["fidelity"], "style": rates["models"][n]["style"],
                             "rates": rates["models"][n]["rates"],
                             "rates_significance": rates["models"][n]["significance"]} for n in names},
              "rates": {k: v for k, v in rates.items() if k != "models"}}
    for n in names:
        write_predictions_jsonl(output / "predictions" / f"{n}.jsonl", examples, predictions[n], checks[n])
    write_examples_md(output / "examples.md", examples, predictions, n_examples, tokenize=tokenize, checks=checks)
    write_bleu_chart(output / "bleu.png", scores)
    write_text_atomic(output / "results.md", results_markdown(scores, spec_info, run_info, meta, rates))
    write_json_atomic(output / "results.json", result)
    return result


def log_results_to_mlflow(args) -> int:
    """results.json's per-model figures to ``--mlflow-run`` (when given) as ``model_eval/<name>/...``."""
    if not args.mlflow_run:
        return 0
    result = json.loads((Path(args.output) / "results.json").read_text(encoding="utf-8"))
    figures = {n: {k: m.get(k) for k in ("bleu", "rates", "fidelity", "style")} for n, m in result["models"].items()}
    return tracking.log_from_args(args, tracking.flat_numbers(figures, "model_eval"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_eval", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="test items: prepared hf/test.jsonl, NeMo test.jsonl or raw pairs")
    parser.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL[,model=M,adapter=A,api_key_env=V]",
                        help="an OpenAI-compatible server to evaluate (repeatable)")
    parser.add_argument("--local", action="append", default=[], metavar="NAME=HF_DIR[,adapter=DIR]",
                        help="generate in-process with recipes.generate (repeatable)")
    parser.add_argument("--output", required=True, help="output dir (rerun with the same dir to resume)")
    parser.add_argument("--baseline", help="model the others are tested against (default: the first given)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per endpoint (default 4)")
    parser.add_argument("--max-tokens", type=int, default=512, help="max new tokens per answer (default 512)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds per request, whole answer (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                        help=f"retries on connection errors, timeouts, 408/429/5xx (default {DEFAULT_RETRIES})")
    parser.add_argument("--backoff", type=float, default=DEFAULT_BACKOFF,
                        help=f"first retry delay in s, doubled each retry (default {DEFAULT_BACKOFF:g})")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (0: no test)")
    parser.add_argument("--limit", type=int, help="only the first N test items")
    parser.add_argument("--examples", type=int, default=50, help="items shown in examples.md (-1: all; default 50)")
    parser.add_argument("--batch-size", type=int, default=4, help="--local: prompts per generate() call")
    parser.add_argument("--tokenize", default=DEFAULT_TOKENIZE, help=f"sacrebleu tokenizer (default {DEFAULT_TOKENIZE})")
    parser.add_argument("--vocabulary", help="extra instruments for the fact check: JSON {canonical: [alias, ...]}")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty dir that is not a model_eval output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    tracking.add_arguments(parser)  # each model's figures as model_eval/<name>/bleu/score, .../rates/..., ...
    args = parser.parse_args(argv)
    try:
        endpoints = [parse_endpoint_spec(s) for s in args.endpoint]
        locals_ = [parse_local_spec(s) for s in args.local]
    except ValueError as e:
        parser.error(str(e))
    try:
        rc = report_command(lambda: evaluate(
            args.data, args.output, endpoints, locals_, max_tokens=args.max_tokens, concurrency=args.concurrency,
            timeout=args.timeout, retries=args.retries, backoff=args.backoff, baseline=args.baseline,
            bootstrap=args.bootstrap, limit=args.limit, n_examples=args.examples, batch_size=args.batch_size,
            tokenize=args.tokenize, overwrite=args.overwrite, progress=not args.no_progress,
            vocabulary=args.vocabulary), args.output)
        return rc if rc else log_results_to_mlflow(args)
    except KeyboardInterrupt:
        print(f"interrupted: finished items are cached in {Path(args.output) / 'cache'}; rerun the same command "
              "to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
