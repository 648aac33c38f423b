"""Verify a conversion by running the same prompts through both sides and comparing logits.

    python -m convert.verify --hf BASE_HF_DIR --nemo NEMO_CKPT [--adapter PEFT_DIR] [--atol 1e-4]

* ``--nemo`` a full NeMo 2 checkpoint: compared with the HF model in ``--hf``.
* ``--nemo`` a NeMo 2 LoRA checkpoint (weights/adapter_metadata.json): the NeMo side is its base
  checkpoint with the LoRA update ``W += alpha/dim * B @ A`` added in NeMo's own fused layout
  (linear_qkv, linear_fc1 — no split involved), and the HF side is ``--hf`` plus the PEFT adapter
  ``--adapter`` (e.g. written by convert.lora_to_peft), merged by peft (``--unmerged``: peft's adapter
  forward). Agreement therefore checks the QKV/fc1 split.
Reports max |Δlogits|, mean cosine similarity and argmax agreement per prompt (for a LoRA also
``base_max_abs_diff``: the same measure between the two base models, the fp32 kernel floor) (Megatron-Bridge's
check: cosine >= 0.99 and equal argmax; ours is stricter: fp32 max |Δ| <= atol); exits 1 over tolerance.
Runs on CPU with the NeMo CPU shim when there is no GPU; initialises torch.distributed (gloo).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PROMPTS = (
    "<|im_start|>user\n当月の国内株式市場は上昇しました。<|im_end|>\n<|im_start|>assistant\n",
    "今後の運用につきましては、分散投資を継続する方針です。",
    "The fund outperformed its benchmark by 0.4% in the month.",
)


def merge_nemo_lora_(model, lora_ckpt) -> int:
    """Add the LoRA update of a NeMo LoRA checkpoint into a loaded NeMo base model, in place.
    Returns the number of weight matrices changed."""
    import torch

    import families
    modules = families.for_nemo(lora_ckpt.model_yaml, lora_ckpt.context_dir / "model.yaml").lora_modules()
    s = lora_ckpt.lora_settings()
    scale = s["alpha"] / s["dim"]
    params = {n.removeprefix("module."): p for n, p in model.named_parameters()}
    changed = 0
    with torch.no_grad():
        for target in s["target_modules"]:
            path = modules[target].nemo_path
            a_all = lora_ckpt.load(f"decoder.layers.{path}.adapter.linear_in.weight")
            b_all = lora_ckpt.load(f"decoder.layers.{path}.adapter.linear_out.weight")
            for layer in range(a_all.shape[0]):
                name = f"decoder.layers.{layer}.{path}.weight"
                w = next((p for n, p in params.items() if n.endswith(name)), None)
                if w is None:
                    raise KeyError(f"model has no parameter ending in {name!r}")
                w += scale * (b_all[layer].float() @ a_all[layer].float()).to(w.dtype)
                changed += 1
    return changed


def compare(ref, got) -> dict:
    """ref/got: logits [1, seq, vocab] (got may be padded in vocab)."""
    import torch
    got = got[..., : ref.shape[-1]]
    cos = torch.nn.functional.cosine_similarity(ref.flatten(0, 1), got.flatten(0, 1), dim=-1)
    return {"max_abs_diff": float((ref - got).abs().max()), "cosine_mean": float(cos.mean()),
            "argmax_agree": float((ref.argmax(-1) == got.argmax(-1)).float().mean())}


def verify(hf_dir: str | Path, nemo_dir: str | Path, adapter_dir: str | Path | None = None,
           prompts=DEFAULT_PROMPTS, atol: float = 1e-4, family: str | None = None, merge_adapter: bool = True) -> dict:
    """The report (``ok``: within ``atol`` and the same argmax). ``family``, when given, must be the
    checkpoint's (``context/model.yaml``); the family comes from the checkpoint either way."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import families
    from convert import nemo_model
    from convert.nemo_ckpt import NemoCheckpoint
    from recipes import cpu_shim

    ckpt = NemoCheckpoint(nemo_dir)
    fam = families.for_nemo(ckpt.model_yaml, ckpt.context_dir / "model.yaml")
    if family is not None and family != fam.name:
        raise ValueError(f"{nemo_dir}: a {fam.name} checkpoint, not --family {family}")
    cpu_shim.prepare_process()
    is_lora = ckpt.adapter_metadata is not None
    if is_lora and adapter_dir is None:
        raise ValueError(f"{nemo_dir} is a LoRA checkpoint: pass the exported PEFT adapter with --adapter")
    base_nemo = Path(ckpt.adapter_metadata["model_ckpt_path"]) if is_lora else Path(nemo_dir)

    tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32, local_files_only=True).eval()
    model, _ = nemo_model.load_nemo_model(base_nemo)
    inputs = [tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"] for text in prompts]

    def diffs(hf_model) -> list[dict]:
        out = []
        for ids in inputs:
            with torch.no_grad():
                ref = hf_model(input_ids=ids).logits.float()
            out.append(compare(ref, nemo_model.nemo_logits(model, ids)))
        return out

    base_diffs = None
    if adapter_dir is not None:
        from peft import PeftModel
        if is_lora:  # the floor: how far the two frameworks' fp32 kernels differ without any adapter
            base_diffs = diffs(hf)
        hf = PeftModel.from_pretrained(hf, str(adapter_dir))
        if merge_adapter:  # W + s*B@A, like the NeMo side: the two differ only by the conversion
            hf = hf.merge_and_unload()
        hf.eval()
    changed = merge_nemo_lora_(model, ckpt) if is_lora else 0
    per_prompt = diffs(hf)
    report = {
        "hf": str(hf_dir), "adapter": str(adapter_dir) if adapter_dir else None, "nemo": str(nemo_dir),
        "lora_matrices_merged": changed, "hf_adapter_merged": bool(adapter_dir) and merge_adapter, "prompts": len(per_prompt), "atol": atol,
        "max_abs_diff": max(p["max_abs_diff"] for p in per_prompt),
        "cosine_min": min(p["cosine_mean"] for p in per_prompt),
        "argmax_agree_min": min(p["argmax_agree"] for p in per_prompt),
        "per_prompt": per_prompt,
        "base_max_abs_diff": max(p["max_abs_diff"] for p in base_diffs) if base_diffs else None,
    }
    report["ok"] = report["max_abs_diff"] <= atol and report["argmax_agree_min"] == 1.0
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.verify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF model dir (the base model when checking a LoRA)")
    ap.add_argument("--nemo", required=True, help="NeMo 2 checkpoint dir (full model or LoRA)")
    ap.add_argument("--adapter", help="HF PEFT adapter dir (needed with a NeMo LoRA checkpoint)")
    ap.add_argument("--atol", type=float, default=1e-4, help="max |logit difference| allowed (fp32)")
    ap.add_argument("--family", default=None, help="expected model family (default: the checkpoint's own)")
    ap.add_argument("--unmerged", action="store_true",
                    help="run the HF side with peft's unmerged adapter (x@W + s*B(Ax)); its fp32 rounding differs "
                         "from the merged NeMo side by ~1e-4 on a 30-layer model")
    ap.add_argument("--json", help="also write the report as JSON here")
    args = ap.parse_args(argv)
    report = verify(args.hf, args.nemo, args.adapter, atol=args.atol, family=args.family,
                    merge_adapter=not args.unmerged)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    if not report["ok"]:
        print(f"FAIL: max |Δlogits| {report['max_abs_diff']:.3g} > {args.atol} or argmax differs", file=sys.stderr)
        return 1
    print(f"OK: max |Δlogits| {report['max_abs_diff']:.3g} <= {args.atol}, argmax agree", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
