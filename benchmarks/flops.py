"""Model FLOPs per training token, and GPU peak throughput for MFU.

Counting convention ("model FLOPs", as in MFU): the matrix multiplies the model needs per token, one
multiply-add = 2 FLOPs, no activation recomputation, no elementwise ops (norms, RoPE, softmax,
SwiGLU) and the full (not causally halved) attention score matrix, as Megatron-LM and the NeMo
performance summary count it. For a Llama/Qwen2 decoder read from the run's HF ``config.json``
(h = hidden_size, f = intermediate_size, L = num_hidden_layers, V = vocab_size,
q = num_attention_heads * head_dim, kv = num_key_value_heads * head_dim)::

    N        = L * (h*q + 2*h*kv + q*h + 3*h*f) + V*h
               the weights that take part in a matmul per token: attention q/k/v/o and SwiGLU
               gate/up/down projections, plus the LM head (V*h, a real matmul even when it is tied
               to the input embedding); the input embedding itself is a lookup (0 FLOPs)
    attn(s)  = 12 * L * q * s   per token of a sequence of length s: Q.K^T and P.V are 2*s*q FLOPs
               each per token forward (4*s*q), x3 for forward + backward (both attention gradients
               are activation gradients, so this term is the same for LoRA and full SFT)

    full SFT : 6*N + attn(s)             forward 2N, weight gradients 2N, activation gradients 2N
    LoRA     : 4*N + 6*N_lora + attn(s)  frozen weights need no weight gradients (forward 2N +
                                         activation gradients 2N); the adapters are trained in full
    N_lora   = r * sum(in + out) over the adapted layers, NeMo shapes for both backends (the same
               model work is credited to both; HF's separate q/k/v and gate/up adapters have a few
               more parameters, see recipes/config.py):
               linear_qkv r*(h + q + 2*kv), linear_proj r*(q + h), linear_fc1 r*(h + 2*f),
               linear_fc2 r*(f + h), per layer

Per optimizer step the benchmark knows the real tokens T and the sequences n of the step, not each
sequence's length, so attention is counted at the mean length s = T/n: 12*L*q*T^2/n for the step,
a slight under-estimate for mixed lengths (sum s_i^2 >= (sum s_i)^2/n), so MFU is never inflated.
Padding tokens are not model FLOPs (the report shows padded throughput separately).

Sources:
- Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1: forward FLOPs per token
  2N + 2*n_layer*n_ctx*d_attn (+ 2*d_model*n_vocab for the de-embedding).
- Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM", sec. 5.1: 72*B*s*l*h^2*(1 + s/(6h) + V/(12*l*h)) without recomputation, i.e. per
  token 6*N_blocks + 12*l*h*s + 6*h*V (with N_blocks = 12*l*h^2 for a 4h MLP) — the formula above.
- Chowdhery et al. 2022, "PaLM", appendix B: MFU = achieved model FLOP/s / peak; 6N + 12*L*H*Q*T.
- Hu et al. 2021, "LoRA": frozen weights get no gradients; the 4N rule of thumb is the one in
  shared/reference/perf-anchors.md.

Peaks (:data:`PEAK_TFLOPS`) are dense BF16/FP16 tensor-core figures from NVIDIA datasheets (the
datasheets print the 2:4-sparsity number; dense is half of it), matched on the NVML device name.
On a CPU there is no MFU.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import families
from families.spec import DecoderShape

# LoRA targets (NeMo names, families.spec.NEMO_LORA_TARGETS) -> (in, out) in terms of the HF config.
_LORA_SHAPES = {
    "linear_qkv": lambda h, q, kv, f: (h, q + 2 * kv),
    "linear_proj": lambda h, q, kv, f: (q, h),
    "linear_fc1": lambda h, q, kv, f: (h, 2 * f),  # NeMo fuses gate and up into one fc1
    "linear_fc2": lambda h, q, kv, f: (f, h),
}

# (regex on the NVML device name, dense BF16 TFLOP/s, what it is). First match wins, so the more
# specific patterns come first. Datasheet numbers with sparsity / 2.
PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"GH200", 989.4, "GH200 (H100 SXM compute), dense BF16"),
    (r"H200 NVL", 835.5, "H200 NVL, dense BF16 (1,671 sparse)"),
    (r"H200", 989.4, "H200 SXM, dense BF16 (1,979 sparse)"),
    (r"H100 NVL", 835.5, "H100 NVL, dense BF16 (1,671 sparse)"),
    (r"H100 PCIe", 756.5, "H100 PCIe, dense BF16 (1,513 sparse)"),
    (r"H100", 989.4, "H100 SXM5 (NVML: 'NVIDIA H100 80GB HBM3'), dense BF16 (1,979 sparse)"),
    (r"A100", 312.0, "A100, dense BF16 (624 sparse)"),
    (r"L40S", 362.05, "L40S, dense BF16 (733 sparse)"),
    (r"\bL4\b", 121.0, "L4, dense BF16 (242 sparse)"),
)


# The shape the formula needs: the family's shape reader's (one reader for FLOPs and memory).
ModelShape = DecoderShape


def model_shape(hf_config: dict | str | Path) -> ModelShape:
    """:class:`ModelShape` of an HF decoder config of any registered family (a dict, a config.json,
    or a model dir), read by the family (``families.ModelFamily.shape``)."""
    where = "<config>"
    if not isinstance(hf_config, dict):
        p = Path(hf_config)
        p = p / "config.json" if p.is_dir() else p
        where = str(p)
        hf_config = json.loads(p.read_text(encoding="utf-8"))
    return families.for_hf(hf_config, where).shape(hf_config, where)


def matmul_params(shape: ModelShape) -> dict[str, int]:
    """N and its parts: ``blocks`` (attention + MLP weights), ``lm_head`` (V*h), ``n`` (their sum),
    ``embedding`` (V*h, a lookup: no FLOPs) and ``total`` parameters (embedding + untied head + blocks;
    norms are left out, they are < 0.01 % and do no matmul)."""
    h, q, kv, f = shape.hidden, shape.q_dim, shape.kv_dim, shape.ffn
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f
    blocks = shape.layers * per_layer
    head = shape.vocab * h
    return {"per_layer": per_layer, "blocks": blocks, "lm_head": head, "n": blocks + head,
            "embedding": head, "total": blocks + head + (0 if shape.tied_embeddings else head)}


def lora_params(shape: ModelShape, rank: int, targets) -> int:
    """Trainable LoRA parameters, NeMo shapes: r*(in + out) per adapted linear, per layer."""
    total = 0
    for t in targets:
        if t not in _LORA_SHAPES:
            raise ValueError(f"unknown LoRA target {t!r}; known: {sorted(_LORA_SHAPES)}")
        i, o = _LORA_SHAPES[t](shape.hidden, shape.q_dim, shape.kv_dim, shape.ffn)
        total += rank * (i + o)
    return shape.layers * total


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs of one method on one model: ``linear`` FLOPs per token plus ``attn_coef * s``."""

    method: str
    n: int
    n_lora: int
    linear_per_token: float  # 6N, or 4N + 6N_lora
    attn_coef: float  # 12 * L * q: attention FLOPs per token per unit of sequence length
    formula: str

    def per_token(self, seq_len: float) -> float:
        return self.linear_per_token + self.attn_coef * seq_len

    def step_flops(self, tokens: int, samples: int) -> float:
        """Model FLOPs of an optimizer step with ``tokens`` real tokens in ``samples`` sequences
        (attention at the mean length tokens/samples)."""
        if tokens <= 0 or samples <= 0:
            return 0.0
        return tokens * self.per_token(tokens / samples)

    def to_dict(self) -> dict:
        return asdict(self)


def flops_model(shape: ModelShape, method: str, lora_rank: int = 0, lora_targets=()) -> FlopsModel:
    """The per-token training FLOPs formula for ``method`` ("lora" or "sft") on this model."""
    n = matmul_params(shape)["n"]
    attn = 12.0 * shape.layers * shape.q_dim
    if method == "sft":
        return FlopsModel("sft", n, 0, 6.0 * n, attn, "6*N + 12*L*q*s")
    if method == "lora":
        nl = lora_params(shape, lora_rank, lora_targets)
        return FlopsModel("lora", n, nl, 4.0 * n + 6.0 * nl, attn, "4*N + 6*N_lora + 12*L*q*s")
    raise ValueError(f"method must be 'lora' or 'sft', got {method!r}")


def peak_tflops(device_name: Optional[str]) -> Optional[tuple[float, str]]:
    """(dense BF16 TFLOP/s, which entry) for an NVML device name, or None (unknown GPU, or CPU)."""
    if not device_name:
        return None
    for pattern, value, what in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return value, what
    return None
