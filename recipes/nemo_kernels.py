"""Which of NeMo's fused-kernel settings a GPU host can run, for hosts without Transformer Engine or Apex.

NeMo 2.1's Llama / Qwen2 configs switch on fused kernels that the nemo:24.12 container builds (Transformer
Engine, Apex). A plain CUDA host with pip's torch (the offline smoke bundle's target, ``benchmarks/gpu_bundle``)
has neither: NeMo then takes megatron-core's local layer spec (``default_layer_spec`` without TE), and
megatron-core 0.10 stops on each setting whose compiled module is missing:

- ``apply_rope_fusion``: ``TransformerConfig.__post_init__`` raises "apply_rope_fusion is not available.
  Please install TE >= 1.4 or Apex." (it checks ``rope_utils.fused_apply_rotary_pos_emb``);
- ``persist_layer_norm``: the local spec's norm without Apex is ``WrappedTorchNorm``, which asserts
  "persist_layer_norm not supported by torch LayerNorm";
- ``masked_softmax_fusion``: the local spec's ``FusedScaleMaskSoftmax`` imports
  ``scaled_upper_triang_masked_softmax_cuda`` at the first bf16 forward (ModuleNotFoundError);
- ``gradient_accumulation_fusion``: the first backward needs ``fused_weight_gradient_mlp_cuda``.

:func:`missing_gpu_kernels` names the ones this host cannot run, with why; ``recipes.nemo_recipe`` turns
those off on a GPU (the others, e.g. SwiGLU and bias-dropout fusion, are torch.jit code and stay on).
Unfused kernels are slower: a smoke run on such a host says so in its report.

Sequence parallelism cannot be turned off the same way (it is a layout choice): without Transformer Engine
or Apex, the local spec's ``WrappedTorchNorm`` asserts "sequence parallel not supported by torch LayerNorm"
(seen on a CPU with gloo at TP=2; gloo itself has the reduce-scatter in torch 2.13).
:func:`check_sequence_parallel` refuses such a run before it starts, on every rank.
"""
from __future__ import annotations

import importlib.util
from typing import Callable


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _fused_rope() -> bool:
    """megatron-core's own test: a fused RoPE from Transformer Engine or Apex imported."""
    from megatron.core.models.common.embeddings import rope_utils
    return rope_utils.fused_apply_rotary_pos_emb is not None or rope_utils.fused_apply_rotary_pos_emb_thd is not None


def missing_gpu_kernels(have: Callable[[str], bool] = importable,
                        fused_rope: Callable[[], bool] = _fused_rope) -> dict[str, str]:
    """{NeMo config field: why it must be off on this host}; empty in the nemo:24.12 container."""
    te, apex = have("transformer_engine"), have("apex")
    off = {}
    if not fused_rope():
        off["apply_rope_fusion"] = "no fused RoPE (needs Transformer Engine >= 1.4 or Apex)"
    if not te and not apex:
        off["persist_layer_norm"] = "megatron-core's local layer spec without Apex uses torch's norm"
    if not te and not have("scaled_upper_triang_masked_softmax_cuda"):
        off["masked_softmax_fusion"] = "no scaled_upper_triang_masked_softmax_cuda (Apex / megatron fused kernels)"
    if not have("fused_weight_gradient_mlp_cuda"):
        off["gradient_accumulation_fusion"] = "no fused_weight_gradient_mlp_cuda (Apex)"
    return off


def check_sequence_parallel(recipe, have: Callable[[str], bool] = importable) -> None:
    """ValueError when ``recipe`` — the ``llm.finetune`` run.Partial, or the functools.partial NeMo-Run
    builds from it on each rank — uses sequence parallelism on a host whose megatron-core layer spec
    cannot run it (no Transformer Engine, no Apex: every CPU)."""
    trainer = recipe.keywords.get("trainer") if hasattr(recipe, "keywords") else getattr(recipe, "trainer", None)
    strategy = getattr(trainer, "strategy", None)  # none: not an llm.finetune recipe, nothing to check
    if getattr(strategy, "sequence_parallel", False) and not (have("transformer_engine") or have("apex")):
        raise ValueError("parallel.sequence_parallel=true needs Transformer Engine or Apex on this host: without "
                         "them megatron-core 0.10's local layer spec uses torch's norm, which asserts 'sequence "
                         "parallel not supported by torch LayerNorm' (set parallel.sequence_parallel=false here)")
