"""The same LoRA starting point in every Megatron backend: ``lora.a_init_seed``.

NeMo 2.1 and Megatron-Bridge both initialise LoRA's A matrix (``adapter.linear_in``) with Xavier-uniform and B
with zeros, but each draws A from its own RNG stream, so the two runs start from different adapters and their
loss curves part after the first step. With ``lora.a_init_seed: N`` both backends overwrite every A, right after
the adapters are created and before the first step, with the same values: Xavier-uniform
(``bound = sqrt(6 / (fan_in + fan_out))``) from a generator seeded with ``N`` and the module's decoder-relative
name (``decoder.layers.3.self_attention.linear_qkv.adapter.linear_in.weight``), so the values do not depend on
how a framework wraps or orders its modules. A resumed run keeps its checkpoint's adapters.

Only whole (tensor-parallel size 1) adapters: a TP shard would need the full matrix's slice.
"""
from __future__ import annotations

import math
import zlib

A_SUFFIX = "adapter.linear_in.weight"  # NeMo 2.1's and Megatron-Bridge's LoRA A parameter
ANCHOR = "decoder.layers."


def canonical_name(name: str) -> str | None:
    """The decoder-relative name of a LoRA A parameter (wrapper prefixes such as ``module.`` dropped), else None."""
    if not name.endswith(A_SUFFIX) or ANCHOR not in name:
        return None
    return name[name.index(ANCHOR):]


def seeded_a(name: str, shape, seed: int):
    """The A matrix of the module ``name`` (canonical) for ``seed``: Xavier-uniform, float32, on the CPU."""
    import torch
    out_features, in_features = int(shape[0]), int(shape[1])
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    bound = math.sqrt(6.0 / (in_features + out_features))
    return (torch.rand((out_features, in_features), generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def apply_seeded_lora_a(module, seed: int, tensor_parallel_size: int = 1, optimizer=None) -> int:
    """Overwrite every LoRA A parameter of ``module`` (a model or a list of model chunks) with :func:`seeded_a`;
    returns how many. ``optimizer``: a megatron-core optimizer whose main (fp32) copies are reloaded from the
    model afterwards (mixed precision). ValueError for a sharded adapter or a module with no LoRA A at all."""
    import torch
    if tensor_parallel_size != 1:
        raise ValueError(f"lora.a_init_seed needs parallel.tensor_model_parallel_size=1 (got {tensor_parallel_size}): "
                         "a tensor-parallel shard of A is not set")
    chunks = module if isinstance(module, (list, tuple)) else [module]
    n = 0
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                key = canonical_name(name)
                if key is None:
                    continue
                p.copy_(seeded_a(key, p.shape, seed).to(device=p.device, dtype=p.dtype))
                n += 1
    if n == 0:
        raise ValueError("lora.a_init_seed is set but the model has no LoRA A parameter "
                         f"(*{A_SUFFIX}): is this a LoRA run?")
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()
    return n


def apply_seeded_lora_a_hf(model, seed: int, family) -> int:
    """The same starting adapter in an HF PEFT model: each ``lora_A`` of an HF module gets the A of the Megatron
    module it is part of (the family's LoRA names: q/k/v_proj -> linear_qkv, gate/up_proj -> linear_fc1, ...),
    so q, k and v start with the one A the fused module has (the same initial model; HF then trains the three
    separately). Returns how many were set."""
    import re
    import torch
    by_hf = {p: m.nemo_path for m in family.lora_modules().values() for p in m.hf_paths}  # self_attn.q_proj -> ...
    pattern = re.compile(r"layers\.(\d+)\.(.+)\.lora_A\.[^.]+\.weight$")
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            m = pattern.search(name)
            if not m or m.group(2) not in by_hf:
                continue
            key = f"{ANCHOR}{m.group(1)}.{by_hf[m.group(2)]}.{A_SUFFIX}"
            p.copy_(seeded_a(key, p.shape, seed).to(device=p.device, dtype=p.dtype))
            n += 1
    if n == 0:
        raise ValueError("lora.a_init_seed is set but the model has no LoRA A parameter (lora_A): is this a LoRA run?")
    return n
