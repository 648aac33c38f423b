"""A NeMo 2 checkpoint as a model for inference on CPU, its logits, and the HF-vs-NeMo logits check.

- :func:`load_nemo_model` — (LightningModule, trainer) with weights loaded through NeMo's own
  restore path (``ModelConnector.nemo_load``, what ``llm.export_ckpt`` uses);
- :func:`nemo_logits` — logits of right-aligned, unpadded ids;
- :func:`import_logits_check` — max |logit difference| between a HF model and its NeMo checkpoint.

Call :func:`recipes.cpu_shim.prepare_process` first (on a CPU it applies the shim); these initialise
torch.distributed (gloo, world size 1) in the calling process.
"""
from __future__ import annotations

import os
from pathlib import Path

import families
from convert.nemo_ckpt import NemoCheckpoint
from recipes.cpu_shim import is_cpu

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_nemo_model(nemo_path: str | Path):
    """(LightningModule, trainer) of a NeMo checkpoint with weights loaded, on CPU, for inference.

    Uses the checkpoint's own ``context/`` (model config + tokenizer) and NeMo's ModelConnector.nemo_load,
    the path ``llm.export_ckpt`` takes; initialises torch.distributed (gloo, world size 1).
    """
    ckpt = NemoCheckpoint(nemo_path)
    fam = families.for_nemo(ckpt.model_yaml, ckpt.context_dir / "model.yaml")
    exporter = fam.nemo_class().exporter("hf", str(nemo_path))
    model, trainer = exporter.nemo_load(Path(nemo_path), cpu=is_cpu())
    model.eval()
    return model, trainer


def nemo_logits(model, input_ids):
    """Logits [batch, seq, padded_vocab] of a NeMo GPT model for right-aligned, unpadded ids."""
    import torch
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    b, s = ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s).expand(b, 1, s, s)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, attention_mask=mask).float()


DEFAULT_CHECK_PROMPTS = (
    "当月の国内株式市場は上昇しました。",
    "今後の運用につきましては、分散投資を継続する方針です。",
    "The fund outperformed its benchmark by 0.4% in the month.",
)


def import_logits_check(hf_path: str | Path, nemo_path: str | Path, prompts=DEFAULT_CHECK_PROMPTS,
                        atol: float = 1e-4) -> dict:
    """Max |logit difference| between the HF model and the imported NeMo checkpoint, fp32, per prompt.

    Raises AssertionError when any prompt differs by more than ``atol``. Needs the CPU shim on a CPU
    (call :func:`recipes.cpu_shim.prepare_process` first) and initialises torch.distributed in this process.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_path), local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_path), torch_dtype=torch.float32, local_files_only=True).eval()
    model, _ = load_nemo_model(nemo_path)
    diffs = []
    for text in prompts:
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = hf(input_ids=ids).logits.float()
        got = nemo_logits(model, ids)[..., : ref.shape[-1]]
        diffs.append(float((got - ref).abs().max()))
    report = {"prompts": len(diffs), "max_abs_diff": max(diffs), "per_prompt": diffs, "atol": atol}
    if max(diffs) > atol:
        raise AssertionError(f"{nemo_path}: NeMo logits differ from {hf_path} by {max(diffs):.3g} > {atol}: {report}")
    return report

