"""NeMo 2 LoRA checkpoint -> Hugging Face PEFT adapter (what peft, vLLM and NIM load).

    python -m convert.lora_to_peft --lora runs/x/nemo/checkpoints/<step>-last --output out/adapter \\
        [--base-hf artifacts/models/small] [--overwrite]

NeMo 2.1 has no LoRA export (``llm.peft.export_lora`` arrives in 2.2). NeMo's LoRA on the fused
``linear_qkv`` has ONE A (``linear_in``, [r, hidden]) and ONE B (``linear_out``, [(n+2g)d, r]); HF
has separate q/k/v projections, so A is copied to q/k/v and B is split by the GQA interleave rule
(``families.layout.split_qkv``, the weight row's own split); ``linear_fc1`` likewise becomes gate/up
(B split in halves). Module names come from the checkpoint's family (``families``).
Scaling is unchanged: NeMo multiplies by alpha/dim, PEFT by lora_alpha/r.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import families
from convert.adapters import adapter_config, lora_key, write_adapter
from convert.nemo_ckpt import NemoCheckpoint
from families.spec import AttentionShape


def nemo_lora_to_peft_tensors(ckpt: NemoCheckpoint) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT tensors and settings of a NeMo LoRA checkpoint. The family of the checkpoint names the
    modules (``families.ModelFamily.lora_modules``); a B matrix is split by its weight row's ``to_hf``,
    the same split as the weights (GQA interleave for linear_qkv, halves for linear_fc1)."""
    fam = families.for_nemo(ckpt.model_yaml, ckpt.context_dir / "model.yaml")
    modules = fam.lora_modules()
    settings = ckpt.lora_settings()
    shape = ckpt.attention_shape()
    attn = AttentionShape(shape["n_heads"], shape["n_groups"], shape["head_dim"])
    tensors: dict[str, torch.Tensor] = {}
    hf_targets: list[str] = []
    for target in settings["target_modules"]:
        if target not in modules:
            raise ValueError(f"{ckpt.path}: LoRA target {target!r} has no HF PEFT equivalent "
                             f"(known: {sorted(modules)})")
        m = modules[target]
        a_all = ckpt.load(f"decoder.layers.{m.nemo_path}.adapter.linear_in.weight")    # [L, r, in]
        b_all = ckpt.load(f"decoder.layers.{m.nemo_path}.adapter.linear_out.weight")   # [L, out, r]
        if a_all.shape[0] != shape["num_layers"] or a_all.shape[1] != settings["dim"]:
            raise ValueError(f"{ckpt.path}: {m.nemo_path} adapter A has shape {tuple(a_all.shape)}, expected "
                             f"[{shape['num_layers']}, {settings['dim']}, in]")
        for layer in range(shape["num_layers"]):
            a = a_all[layer].float()
            for path, b in zip(m.hf_paths, m.row.to_hf(b_all[layer].float(), attn)):
                tensors[lora_key(layer, path, "A")] = a.clone()
                tensors[lora_key(layer, path, "B")] = b.contiguous()
        hf_targets += m.hf_modules
    settings["hf_target_modules"] = hf_targets
    return tensors, settings


def convert(lora_dir: str | Path, output_dir: str | Path, *, base_hf: str | None = None,
            overwrite: bool = False) -> Path:
    ckpt = NemoCheckpoint(lora_dir)
    if ckpt.adapter_metadata is None:
        raise ValueError(f"{lora_dir}: weights/adapter_metadata.json missing — not a NeMo LoRA checkpoint")
    tensors, s = nemo_lora_to_peft_tensors(ckpt)
    cfg = adapter_config(r=s["dim"], alpha=s["alpha"], dropout=s["dropout"], target_modules=s["hf_target_modules"],
                         base_model=str(base_hf) if base_hf else None)
    note = (f"Converted from the NeMo 2 LoRA checkpoint {Path(lora_dir).resolve()} by convert.lora_to_peft.\n"
            f"NeMo base checkpoint: {ckpt.adapter_metadata.get('model_ckpt_path')}\n")
    return write_adapter(output_dir, tensors, cfg, overwrite=overwrite, extra_files={"README.md": note})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.lora_to_peft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora", required=True, help="NeMo 2 LoRA checkpoint dir (context/ + weights/)")
    ap.add_argument("--output", required=True, help="PEFT adapter dir to write")
    ap.add_argument("--base-hf", help="HF base model dir, recorded as base_model_name_or_path")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    args = ap.parse_args(argv)
    try:
        out = convert(args.lora, args.output, base_hf=args.base_hf, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
