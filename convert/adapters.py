"""The Hugging Face PEFT LoRA adapter format: the one module that writes and reads it.

On disk (what peft, vLLM and NIM read): ``adapter_config.json`` (peft_type "LORA", r, lora_alpha,
target_modules, base_model_name_or_path, ...) and ``adapter_model.safetensors`` with keys
``base_model.model.model.layers.{L}.{self_attn|mlp}.{proj}.lora_A.weight`` ([r, in]) and
``...lora_B.weight`` ([out, r]); the update is ``B @ A * lora_alpha / r``.
Written atomically (recipes.fileio.atomic_dir): a temp dir next to the output, renamed at the end.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from recipes.fileio import atomic_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model.model.layers"


def lora_key(layer: int, module_path: str, which: str) -> str:
    """PEFT tensor name of a module inside a decoder layer, e.g. lora_key(0, "self_attn.q_proj", "A")
    (the paths are the family's: ``families.ModelFamily.lora_modules``)."""
    if which not in ("A", "B"):
        raise ValueError(f"which must be 'A' or 'B', got {which!r}")
    return f"{KEY_PREFIX}.{layer}.{module_path}.lora_{which}.weight"


def adapter_config(*, r: int, alpha: float, dropout: float, target_modules: list[str],
                   base_model: str | None) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(r), "lora_alpha": alpha,
        "lora_dropout": float(dropout), "target_modules": sorted(target_modules), "bias": "none",
        "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }


def write_adapter(output_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict, *,
                  overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write a PEFT adapter directory atomically. ``extra_files``: name -> text (e.g. a README)."""
    out = Path(output_dir)
    with atomic_dir(out, overwrite, allow_empty=False) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    d = Path(adapter_dir)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (not a PEFT adapter directory)")
    return json.loads(cfg_path.read_text(encoding="utf-8")), load_file(str(w_path))
