"""Pure tensor layout maths between Hugging Face and Megatron/NeMo decoder weights (every family).

No I/O, no sharding. Megatron fuses q/k/v into one ``linear_qkv`` and gate/up into one ``linear_fc1``:

* ``linear_qkv`` rows are grouped per KV group (GQA): with ``n`` query heads, ``g`` groups, head
  dim ``d`` and ``hpg = n // g`` heads per group, group ``i`` holds its ``hpg`` query heads, then
  key head ``i``, then value head ``i`` -> ``[(n + 2g) * d, hidden]``. Biases (Qwen2) and LoRA B
  matrices (``[rows, r]``) follow the same rule: the functions work on any trailing shape.
* ``linear_fc1`` = ``cat([gate_proj, up_proj], dim=0)`` (gate first).
No RoPE permutation is needed between HF and Megatron (that exists only for Meta's original files).
Source: shared/reference/conversion.md; Megatron-Bridge ``merge_qkv_weights``/``split_qkv_weights``.
"""
from __future__ import annotations

import torch


def _check_heads(n_heads: int, n_groups: int) -> int:
    if n_heads % n_groups:
        raise ValueError(f"num_attention_heads={n_heads} is not divisible by num_query_groups={n_groups}")
    return n_heads // n_groups


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, n_heads: int, n_groups: int,
              head_dim: int) -> torch.Tensor:
    """HF q/k/v ([n*d, ...], [g*d, ...], [g*d, ...]) -> Megatron fused, GQA-interleaved qkv."""
    hpg = _check_heads(n_heads, n_groups)
    rest = q.shape[1:]
    if q.shape[0] != n_heads * head_dim or k.shape[0] != n_groups * head_dim or v.shape != k.shape:
        raise ValueError(f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} do not fit "
                         f"{n_heads} heads, {n_groups} groups, head_dim {head_dim}")
    qg = q.reshape(n_groups, hpg * head_dim, *rest)
    kg = k.reshape(n_groups, head_dim, *rest)
    vg = v.reshape(n_groups, head_dim, *rest)
    out = torch.cat([qg, kg, vg], dim=1).reshape((n_heads + 2 * n_groups) * head_dim, *rest)
    assert out.numel() == q.numel() + k.numel() + v.numel()
    return out


def split_qkv(qkv: torch.Tensor, *, n_heads: int, n_groups: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron fused qkv -> HF (q, k, v); the inverse of :func:`merge_qkv`."""
    hpg = _check_heads(n_heads, n_groups)
    rows = (n_heads + 2 * n_groups) * head_dim
    if qkv.shape[0] != rows:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected (heads {n_heads} + 2*groups {n_groups}) "
                         f"* head_dim {head_dim} = {rows}")
    rest = qkv.shape[1:]
    g = qkv.reshape(n_groups, (hpg + 2) * head_dim, *rest)
    q = g[:, : hpg * head_dim].reshape(n_heads * head_dim, *rest)
    k = g[:, hpg * head_dim: (hpg + 1) * head_dim].reshape(n_groups * head_dim, *rest)
    v = g[:, (hpg + 1) * head_dim:].reshape(n_groups * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return torch.cat([gate, up], dim=0)


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 has an odd number of rows ({fc1.shape[0]})")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()
