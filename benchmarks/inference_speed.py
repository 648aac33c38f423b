"""Serving speed of OpenAI-compatible endpoints (NIM vs vLLM): streamed greedy chat requests at
several concurrency levels, per-request latencies and tokens/s, and the ratio between endpoints.

    python -m benchmarks.inference_speed \\
        --endpoint http://nim:8000/v1 --model swallow-lora --label NIM \\
        --endpoint http://vllm:8000/v1 --model swallow-lora --label vLLM \\
        --prompts data/prepared/hf/test.jsonl --concurrency 1,4,16 --max-tokens 256 --output runs/speed

Endpoints are measured one after the other, never at the same time. For each endpoint: ``--warmup``
requests first (not counted: they pay for CUDA graphs, LoRA loading, caches), then for each
concurrency level C, ``--requests`` requests (default 4*C, at least 8) from C closed-loop workers
(a worker sends its next request when its previous answer is complete). Prompts are the test items
(``benchmarks.model_eval.load_examples``: hf/ chat rows, raw pairs; NeMo-format rows go to
/completions), cycled. Requests are greedy (temperature 0) with ``max_tokens`` and no ``ignore_eos``,
so answers end where the model ends them, as in production.

Per request (``benchmarks.openai_client.OpenAIClient.stream_chat``): TTFT (request sent -> first
token chunk), inter-token latency (gaps between token chunks: one chunk per token on vLLM, maybe
several tokens per chunk elsewhere, reported as tokens/chunk), end-to-end latency, output tokens.
Output tokens come from the server's ``usage`` (``stream_options.include_usage``) when it sends it,
else from ``--tokenizer DIR`` (re-tokenising the text), else the count of token chunks -- the report
says which was used for every endpoint.

Per concurrency level: output tokens/s per request (tokens / E2E, the figure a single user sees: the
team's NIM 23.3 vs vLLM 16.9 tok/s), decode tokens/s per request ((tokens-1) / (E2E-TTFT)),
aggregate output tokens/s (all tokens / wall time of the level), TTFT / ITL / E2E p50, p90, p99
(linear interpolation), and errors. With two or more endpoints every figure is also given as a ratio
to the first endpoint. Output (``--output DIR``, written whole at the end): results.md, results.json,
requests.jsonl (every request) and throughput.png (tok/s vs concurrency per endpoint).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # --tokenizer never downloads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import itertools
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

import numpy as np

from benchmarks.openai_client import DEFAULT_TIMEOUT, EndpointError, OpenAIClient, StreamResult, report_command
from recipes.fileio import atomic_dir, write_json_atomic, write_text_atomic

PERCENTILES = (50, 90, 99)
TOKEN_SOURCES = ("usage", "tokenizer", "chunks")


# ---------------------------------------------------------------------------------------------
# statistics


def distribution(values: Sequence[float]) -> dict:
    """mean and p50/p90/p99 of ``values`` (``numpy.percentile``, linear interpolation: numpy's
    default); all None when empty."""
    vals = list(values)
    qs = np.percentile(vals, PERCENTILES).tolist() if vals else [None] * len(PERCENTILES)
    return {"mean": sum(vals) / len(vals) if vals else None, "n": len(vals),
            **{f"p{q}": v for q, v in zip(PERCENTILES, qs)}}


@dataclass
class RequestRecord:
    """One measured request. Times in seconds; ``start_s`` from the start of its level."""
    endpoint: str
    concurrency: int
    index: int
    ok: bool
    start_s: float
    e2e_s: float | None = None
    ttft_s: float | None = None
    itl_s: list[float] | None = None
    output_tokens: int | None = None
    token_source: str | None = None
    token_chunks: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    attempts: int | None = None
    error: str | None = None

    @property
    def tok_per_s(self) -> float | None:
        """Output tokens over the whole request, as the user experiences it."""
        if not self.ok or not self.e2e_s or self.output_tokens is None:
            return None
        return self.output_tokens / self.e2e_s

    @property
    def decode_tok_per_s(self) -> float | None:
        """Tokens after the first over the time after the first: the decode speed alone."""
        if not self.ok or self.output_tokens is None or self.output_tokens < 2 or self.ttft_s is None:
            return None
        span = self.e2e_s - self.ttft_s
        return (self.output_tokens - 1) / span if span > 0 else None


def count_tokens(result: StreamResult, tokenizer=None, prefer: str = "auto") -> tuple[int, str]:
    """``(output tokens, source)``: the server's usage.completion_tokens if it sent it (unless
    ``prefer='tokenizer'``), else the tokenizer's count of the text, else the number of token chunks."""
    usage = result.usage or {}
    if prefer != "tokenizer" and isinstance(usage.get("completion_tokens"), int):
        return usage["completion_tokens"], "usage"
    if tokenizer is not None:
        return len(tokenizer(result.text, add_special_tokens=False)["input_ids"]), "tokenizer"
    if prefer in ("usage", "tokenizer"):
        raise ValueError(f"token count source {prefer!r} is not available (no usage in the answer / no --tokenizer)")
    return len(result.chunk_times), "chunks"


def summarize_level(records: list[RequestRecord], wall_s: float) -> dict:
    """Figures of one concurrency level of one endpoint."""
    ok = [r for r in records if r.ok]
    tokens = sum(r.output_tokens or 0 for r in ok)
    chunks = sum(r.token_chunks or 0 for r in ok)
    itl = [x for r in ok for x in (r.itl_s or [])]
    sources = sorted({r.token_source for r in ok if r.token_source})
    return {
        "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
        "wall_s": wall_s, "output_tokens": tokens,
        "mean_output_tokens": tokens / len(ok) if ok else None,
        "tokens_per_chunk": tokens / chunks if chunks else None,
        "token_source": "+".join(sources) if sources else None,
        "aggregate_tok_per_s": tokens / wall_s if wall_s > 0 and ok else None,
        "request_tok_per_s": distribution([r.tok_per_s for r in ok if r.tok_per_s is not None]),
        "decode_tok_per_s": distribution([r.decode_tok_per_s for r in ok if r.decode_tok_per_s is not None]),
        "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": distribution(itl),
        "e2e_s": distribution([r.e2e_s for r in ok]),
        "errors_sample": [r.error for r in records if not r.ok][:3],
    }


RATIO_FIELDS = (("request_tok_per_s", "mean"), ("decode_tok_per_s", "mean"), ("aggregate_tok_per_s", None),
                ("ttft_s", "p50"), ("itl_s", "p50"), ("e2e_s", "p50"))


def ratios(summaries: dict[str, dict[int, dict]], reference: str) -> dict[str, dict[int, dict]]:
    """Each endpoint's figures divided by the reference endpoint's, per concurrency level (>1 means
    more tokens/s, or longer latencies, than the reference)."""
    out: dict[str, dict[int, dict]] = {}
    for name, levels in summaries.items():
        if name == reference:
            continue
        out[name] = {}
        for c, s in levels.items():
            ref = summaries[reference].get(c)
            if ref is None:
                continue
            row = {}
            for key, sub in RATIO_FIELDS:
                a, b = _get(s, key, sub), _get(ref, key, sub)
                row[key if sub is None else f"{key}_{sub}"] = a / b if a is not None and b else None
            out[name][c] = row
    return out


def _get(summary: dict, key: str, sub: str | None) -> float | None:
    v = summary.get(key)
    return v.get(sub) if sub is not None and isinstance(v, dict) else v


# ---------------------------------------------------------------------------------------------
# load generation


@dataclass(frozen=True)
class Target:
    label: str
    url: str
    model: str
    api_key_env: str | None = None


def make_request_fn(client: OpenAIClient, target: Target, max_tokens: int) -> Callable:
    """``fn(example) -> StreamResult``: streamed chat (or completion for a rendered prompt)."""
    def fn(example) -> StreamResult:
        if example.messages is not None:
            return client.stream_chat(list(example.messages), target.model, max_tokens=max_tokens, temperature=0.0)
        return client.stream_complete(example.prompt, target.model, max_tokens=max_tokens, temperature=0.0)
    return fn


def run_level(request: Callable, prompts: Sequence, concurrency: int, n_requests: int, *, label: str = "",
              tokenizer=None, token_source: str = "auto", start_index: int = 0, progress: bool = True
              ) -> tuple[list[RequestRecord], float]:
    """``n_requests`` requests from ``concurrency`` closed-loop workers; returns (records, wall seconds).

    Prompts are taken in turn from ``prompts`` (cycled, starting at ``start_index``). A failed
    request is recorded with its error and the run goes on.
    """
    from tqdm.auto import tqdm

    if concurrency <= 0 or n_requests <= 0:
        raise ValueError(f"concurrency={concurrency} and requests={n_requests} must be > 0")
    order = list(itertools.islice(itertools.cycle(range(len(prompts))), start_index, start_index + n_requests))
    lock = threading.Lock()
    next_job = iter(enumerate(order))
    records: list[RequestRecord] = []
    bar = tqdm(total=n_requests, desc=f"{label} c={concurrency}", unit="req", disable=not progress)
    t_level = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                job = next(next_job, None)
            if job is None:
                return
            i, p = job
            t0 = time.perf_counter()
            rec = RequestRecord(endpoint=label, concurrency=concurrency, index=i, ok=False, start_s=t0 - t_level)
            try:
                res = request(prompts[p])
                n, src = count_tokens(res, tokenizer, token_source)
                rec.ok, rec.e2e_s, rec.ttft_s, rec.itl_s = True, res.e2e_s, res.ttft_s, res.inter_chunk_s
                rec.output_tokens, rec.token_source, rec.token_chunks = n, src, len(res.chunk_times)
                rec.prompt_tokens = (res.usage or {}).get("prompt_tokens")
                rec.finish_reason, rec.attempts = res.finish_reason, res.attempts
            except (EndpointError, ValueError) as e:
                rec.error, rec.e2e_s = str(e), time.perf_counter() - t0
            with lock:
                records.append(rec)
                bar.update(1)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="speed") as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t_level
    bar.close()
    return sorted(records, key=lambda r: r.index), wall


def benchmark_endpoint(target: Target, prompts: Sequence, levels: Sequence[int], *, max_tokens: int,
                       requests: int | None = None, warmup: int = 1, timeout: float = DEFAULT_TIMEOUT,
                       retries: int = 0, tokenizer=None, token_source: str = "auto", progress: bool = True
                       ) -> tuple[dict[int, dict], list[RequestRecord], dict]:
    """Warm-up, then every concurrency level on one endpoint: (summaries by level, records, info).

    ``retries`` defaults to 0: a retried request would hide its failure inside a longer latency.
    A failing warm-up request aborts this endpoint with EndpointError (nothing would work after it).
    """
    info: dict = {"label": target.label, "url": target.url, "model": target.model, "warmup_requests": warmup}
    summaries: dict[int, dict] = {}
    all_records: list[RequestRecord] = []
    with OpenAIClient(target.url, name=target.label, api_key_env=target.api_key_env, timeout=timeout,
                      retries=retries, max_connections=max(levels) + 2) as client:
        request = make_request_fn(client, target, max_tokens)
        for i in range(warmup):
            request(prompts[i % len(prompts)])
        start = warmup
        for c in levels:
            n = requests if requests is not None else max(8, 4 * c)
            recs, wall = run_level(request, prompts, c, n, label=target.label, tokenizer=tokenizer,
                                   token_source=token_source, start_index=start % len(prompts), progress=progress)
            start += n
            summaries[c] = summarize_level(recs, wall)
            all_records.extend(recs)
        info["client"] = client.stats.to_dict()
    return summaries, all_records, info


# ---------------------------------------------------------------------------------------------
# report


def _fmt(v: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
    return "–" if v is None else format(v * scale, spec)


def results_markdown(result: dict) -> str:
    s = result["summaries"]
    lines = ["# Serving speed", "",
             f"Prompts `{result['prompts']}` ({result['n_prompts']} items, cycled); streamed chat, greedy "
             f"(temperature 0), max_tokens {result['max_tokens']}, no ignore_eos (answers end where the model "
             f"ends them). {result['warmup']} warm-up request(s) per endpoint not counted. Closed-loop: C workers, "
             "each sends its next request when the previous answer is complete. Endpoints measured one after "
             "the other.", "",
             "| endpoint | URL | model | output tokens counted from |", "|---|---|---|---|"]
    for name, info in result["endpoints"].items():
        srcs = sorted({lv["token_source"] for lv in s[name].values() if lv["token_source"]})
        lines.append(f"| {name} | `{info['url']}` | `{info['model']}` | {', '.join(_source_text(x) for x in srcs) or '–'} |")
    lines += ["", "## Per concurrency level", "",
              "tok/s per request = output tokens / end-to-end latency (mean over requests); decode tok/s = "
              "(tokens−1) / (E2E − TTFT); aggregate = all output tokens / wall time of the level. "
              "ITL = gap between token chunks. Latencies in ms.", "",
              "| endpoint | C | requests | errors | tok/s per request | decode tok/s | aggregate tok/s | "
              "TTFT p50 / p90 / p99 | ITL p50 / p90 / p99 | E2E p50 / p90 / p99 | tokens/request | tokens/chunk |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, levels in s.items():
        for c, lv in levels.items():
            lat = [" / ".join(_fmt(lv[k][f"p{q}"], ".0f", 1000) for q in PERCENTILES) for k in ("ttft_s", "itl_s", "e2e_s")]
            lines.append(f"| {name} | {c} | {lv['requests']} | {lv['errors']} | {_fmt(lv['request_tok_per_s']['mean'])} "
                         f"| {_fmt(lv['decode_tok_per_s']['mean'])} | {_fmt(lv['aggregate_tok_per_s'])} | {lat[0]} | "
                         f"{lat[1]} | {lat[2]} | {_fmt(lv['mean_output_tokens'])} | {_fmt(lv['tokens_per_chunk'], '.2f')} |")
    if result.get("ratios"):
        ref = result["reference"]
        lines += ["", f"## Ratio to {ref}", "",
                  f"Each figure divided by {ref}'s at the same concurrency (tok/s: >1 is faster; latencies: <1 is faster).",
                  "", "| endpoint | C | tok/s per request | decode tok/s | aggregate tok/s | TTFT p50 | ITL p50 | E2E p50 |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, levels in result["ratios"].items():
            for c, r in levels.items():
                lines.append(f"| {name} / {ref} | {c} | {_fmt(r['request_tok_per_s_mean'], '.2f')} | "
                             f"{_fmt(r['decode_tok_per_s_mean'], '.2f')} | {_fmt(r['aggregate_tok_per_s'], '.2f')} | "
                             f"{_fmt(r['ttft_s_p50'], '.2f')} | {_fmt(r['itl_s_p50'], '.2f')} | {_fmt(r['e2e_s_p50'], '.2f')} |")
    errs = [(n, c, e) for n, lv in s.items() for c, x in lv.items() for e in x["errors_sample"]]
    if errs:
        lines += ["", "## Errors (first ones per level)", ""] + [f"- {n} C={c}: {e}" for n, c, e in errs]
    lines += ["", "![tokens/s vs concurrency](throughput.png)", "",
              "Every request: `requests.jsonl`. Figures: `results.json`."]
    return "\n".join(lines) + "\n"


def _source_text(src: str) -> str:
    return {"usage": "server usage field (stream_options.include_usage)",
            "tokenizer": "tokenizer (re-tokenised text)",
            "chunks": "token chunks (approximate: no usage, no --tokenizer)"}.get(src, src)


def write_throughput_chart(path: Path, summaries: dict[str, dict[int, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.report import savefig_atomic

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, levels in summaries.items():
        cs = list(levels)
        per_req = [levels[c]["request_tok_per_s"]["mean"] for c in cs]
        agg = [levels[c]["aggregate_tok_per_s"] for c in cs]
        for ax, ys in zip(axes, (per_req, agg)):
            ax.plot(cs, [math.nan if y is None else y for y in ys], marker="o", label=name)
            for c, y in zip(cs, ys):
                if y is not None:
                    ax.annotate(f"{y:.1f}", (c, y), xytext=(0, 5), textcoords="offset points", ha="center", fontsize=8)
    for ax, title in zip(axes, ("output tok/s per request (tokens / E2E)", "aggregate output tok/s")):
        ax.set_xscale("log", base=2)
        all_c = sorted({c for lv in summaries.values() for c in lv})
        ax.set_xticks(all_c, [str(c) for c in all_c])
        ax.set_xlabel("concurrent requests")
        ax.set_title(title, fontsize=11)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    savefig_atomic(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# driver


def parse_levels(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16] (positive, no repeats)."""
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency {text!r}: expected comma-separated integers, e.g. 1,4,16") from None
    if not levels or any(c <= 0 for c in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"--concurrency {text!r}: expected distinct positive integers, e.g. 1,4,16")
    return levels


def make_targets(endpoints: Sequence[str], models: Sequence[str], labels: Sequence[str] | None = None,
                 api_key_env: str | None = None) -> list[Target]:
    """Pair ``--endpoint`` with ``--model`` (one model for all endpoints is allowed); labels default
    to MODEL@HOST:PORT and must be unique."""
    if not endpoints:
        raise ValueError("give at least one --endpoint")
    if len(models) == 1:
        models = list(models) * len(endpoints)
    if len(models) != len(endpoints):
        raise ValueError(f"{len(endpoints)} --endpoint but {len(models)} --model: give one --model per --endpoint "
                         "(or a single one for all)")
    labels = list(labels or [])
    if labels and len(labels) != len(endpoints):
        raise ValueError(f"{len(endpoints)} --endpoint but {len(labels)} --label")
    from benchmarks.openai_client import normalize_base_url

    targets = []
    for i, (url, model) in enumerate(zip(endpoints, models)):
        url = normalize_base_url(url)
        label = labels[i] if labels else f"{model}@{urlparse(url).netloc}"
        targets.append(Target(label=label, url=url, model=model, api_key_env=api_key_env))
    names = [t.label for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"endpoint labels must be unique ({', '.join(names)}): use --label")
    return targets


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--tokenizer {path}: not a directory")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def run_benchmark(targets: Sequence[Target], prompts_path: str | Path, output: str | Path, *, levels: Sequence[int],
                  max_tokens: int = 256, requests: int | None = None, warmup: int = 1, timeout: float = DEFAULT_TIMEOUT,
                  retries: int = 0, tokenizer_dir: str | Path | None = None, token_source: str = "auto",
                  limit: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Measure every target, write the report dir (atomically, whole), return results.json's content."""
    from benchmarks.model_eval import load_examples

    if max_tokens <= 0 or warmup < 0 or (requests is not None and requests <= 0):
        raise ValueError(f"max_tokens={max_tokens} and requests={requests} must be > 0, warmup={warmup} >= 0")
    if token_source not in ("auto",) + TOKEN_SOURCES[:2]:
        raise ValueError(f"token_source={token_source!r}: use auto, usage or tokenizer")
    if token_source == "tokenizer" and tokenizer_dir is None:
        raise ValueError("token_source='tokenizer' needs --tokenizer DIR")
    prompts = load_examples(prompts_path, limit)
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    with atomic_dir(output, overwrite=overwrite, inputs=(prompts_path,)) as tmp:
        summaries, infos, records = {}, {}, []
        for t in targets:
            print(f"{t.label}: {t.url} model {t.model}", file=sys.stderr)
            summaries[t.label], recs, infos[t.label] = benchmark_endpoint(
                t, prompts, levels, max_tokens=max_tokens, requests=requests, warmup=warmup, timeout=timeout,
                retries=retries, tokenizer=tokenizer, token_source=token_source, progress=progress)
            records.extend(recs)
        reference = targets[0].label
        result = {"prompts": str(prompts_path), "n_prompts": len(prompts), "max_tokens": max_tokens,
                  "warmup": warmup, "levels": list(levels), "requests_per_level": requests,
                  "temperature": 0.0, "reference": reference, "endpoints": infos,
                  "summaries": summaries, "ratios": ratios(summaries, reference) if len(targets) > 1 else {}}
        write_text_atomic(tmp / "requests.jsonl",
                          "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records))
        write_json_atomic(tmp / "results.json", result)
        write_text_atomic(tmp / "results.md", results_markdown(result))
        write_throughput_chart(tmp / "throughput.png", summaries)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference_speed", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", action="append", required=True, help="server base URL .../v1 (repeatable)")
    parser.add_argument("--model", action="append", required=True,
                        help="served model (or LoRA adapter) name, one per --endpoint or one for all")
    parser.add_argument("--label", action="append", help="name of each endpoint in the report (default MODEL@HOST:PORT)")
    parser.add_argument("--api-key-env", help="environment variable holding the API key (sent as Bearer token)")
    parser.add_argument("--prompts", required=True, help="test items (prepared hf/test.jsonl or raw pairs)")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrency levels (default 1,4,16)")
    parser.add_argument("--requests", type=int, help="measured requests per level (default max(8, 4*C))")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens per request (default 256)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted requests per endpoint first (default 1)")
    parser.add_argument("--tokenizer", help="HF tokenizer dir to count output tokens when the server sends no usage")
    parser.add_argument("--token-count", default="auto", choices=("auto", "usage", "tokenizer"),
                        help="auto: usage if sent, else --tokenizer, else token chunks (default auto)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=f"s per request (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--retries", type=int, default=0, help="retries per request (default 0: failures are counted)")
    parser.add_argument("--limit", type=int, help="use only the first N prompts")
    parser.add_argument("--output", required=True, help="report dir (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report dir")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        levels = parse_levels(args.concurrency)
        targets = make_targets(args.endpoint, args.model, args.label, args.api_key_env)
    except ValueError as e:
        parser.error(str(e))
    return report_command(lambda: run_benchmark(
        targets, args.prompts, args.output, levels=levels, max_tokens=args.max_tokens, requests=args.requests,
        warmup=args.warmup, timeout=args.timeout, retries=args.retries, tokenizer_dir=args.tokenizer,
        token_source=args.token_count, limit=args.limit, overwrite=args.overwrite,
        progress=not args.no_progress), args.output)


if __name__ == "__main__":
    sys.exit(main())
