"""Merge a PEFT LoRA adapter into its Hugging Face base model: one plain HF model dir for serving.

    python -m convert.merge --base artifacts/models/small --adapter out/hf_adapter --output out/merged \\
        [--dtype float32|bfloat16] [--overwrite]

peft ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` adds ``B @ A * alpha / r`` into
each target weight; the merge is done in float32 and cast to ``--dtype`` afterwards (merging in
bf16 would round the small LoRA update away). The output holds config.json, safetensors weights
(never .bin), generation_config.json and the base's tokenizer files (chat template included), and is
written to a temp dir beside ``--output`` then renamed: a killed run leaves no dir that looks complete,
and an existing output is refused without ``--overwrite`` (:func:`recipes.fileio.atomic_dir`).
"""
from __future__ import annotations

import os

# Merging never downloads; set before transformers/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import shutil
import sys
from pathlib import Path

from convert.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from recipes.fileio import atomic_dir

DTYPES = ("float32", "bfloat16", "float16")
# Files of a HF tokenizer (any family); the ones present in the base are copied verbatim.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


class MergeError(ValueError):
    """The base model or adapter cannot be merged (the message names the file)."""


def check_adapter(adapter_dir: str | Path) -> dict:
    """The adapter's config, after checking both files exist and the weights file is readable
    safetensors; a problem raises MergeError naming the file."""
    from safetensors import safe_open

    d = Path(adapter_dir)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not d.is_dir():
        raise MergeError(f"{d}: adapter dir not found")
    for p in (cfg_path, w_path):
        if not p.is_file():
            hint = " (only adapter_model.bin: re-save it with safe_serialization=True)" \
                if p == w_path and (d / "adapter_model.bin").is_file() else ""
            raise MergeError(f"{p}: missing, not a PEFT adapter dir{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise MergeError(f"{cfg_path}: peft_type must be 'LORA', got {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r}")
    try:
        with safe_open(str(w_path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise MergeError(f"{w_path}: not a readable safetensors file: {e}") from None
    if not any(".lora_A." in k for k in keys):
        raise MergeError(f"{w_path}: holds no lora_A tensors ({len(keys)} tensors)")
    return cfg


def merge(base: str | Path, adapter: str | Path, output: str | Path, *, overwrite: bool = False,
          dtype: str = "float32") -> Path:
    """Write ``base`` + ``adapter`` (merged) to ``output`` as a HF model dir; returns ``output``."""
    import torch
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    base, adapter = Path(base), Path(adapter)
    if not (base / "config.json").is_file():
        raise MergeError(f"{base / 'config.json'}: missing, not a Hugging Face model dir")
    check_adapter(adapter)
    with atomic_dir(output, overwrite, inputs=(base, adapter), allow_empty=False) as tmp:
        model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32, local_files_only=True)
        try:
            peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        except RuntimeError as e:  # torch's size mismatch: the adapter belongs to another base
            raise MergeError(f"{adapter / ADAPTER_WEIGHTS}: does not fit the base {base}: {e}") from None
        # peft loads with strict=False: a key that matches no module would be silently dropped.
        loaded = set(get_peft_model_state_dict(peft_model).keys())
        stray = sorted(set(load_file(str(adapter / ADAPTER_WEIGHTS)).keys()) - loaded)
        if stray:
            raise MergeError(f"{adapter / ADAPTER_WEIGHTS}: {len(stray)} tensors match no module of {base}, "
                             f"e.g. {stray[0]}")
        merged = peft_model.merge_and_unload()
        merged = merged.to(getattr(torch, dtype))
        merged.config.torch_dtype = getattr(torch, dtype)
        merged.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        if (base / "generation_config.json").is_file():  # verbatim: keeps eos lists / sampling defaults
            shutil.copy2(base / "generation_config.json", tmp / "generation_config.json")
        leftovers = sorted(p.name for p in tmp.glob("*.bin"))
        if leftovers:
            raise MergeError(f"{output}: save_pretrained wrote pickle weights {leftovers}; expected safetensors only")
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.merge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="HF base model dir (config.json, safetensors, tokenizer)")
    ap.add_argument("--adapter", required=True, help="PEFT adapter dir (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--output", required=True, help="merged model dir to write (must not exist unless --overwrite)")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights (merge is fp32)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    args = ap.parse_args(argv)
    try:
        out = merge(args.base, args.adapter, args.output, overwrite=args.overwrite, dtype=args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
