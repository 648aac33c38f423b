"""Declarative HF <-> Megatron/NeMo 2 tables, one per model family (Llama, Qwen2): weights and config.

Megatron-Bridge style: each family is a list of rows ``megatron name <-> HF name(s) + transform``,
with ``*`` standing for the decoder-layer index. Three transforms exist (the maths is in
:mod:`convert.layout`, pure functions):

* :class:`Identity` — the same tensor under another name;
* :class:`QKV` — HF ``q_proj``/``k_proj``/``v_proj`` <-> Megatron's fused, GQA-interleaved ``linear_qkv``
  (weights, and Qwen2's biases);
* :class:`GatedMLP` — HF ``gate_proj``/``up_proj`` <-> ``linear_fc1 = [gate; up]``.

Megatron stores decoder-layer tensors stacked over layers under one name without the index
(``decoder.layers.self_attention.linear_qkv.weight`` has shape ``[num_layers, ...]``), so
:meth:`ParamMapping.dist_key` drops the ``*``. The rows are the same for both directions; nothing
is derived twice. Layer norms use the Transformer-Engine names even for the local layer spec
(megatron maps ``input_layernorm`` onto ``linear_qkv.layer_norm_weight`` in its sharded state dict).

The config tables map HF ``config.json`` fields to NeMo/Megatron ``TransformerConfig`` fields and
back (:func:`nemo_config_kwargs`, :func:`hf_config_fields`), including tied embeddings, Llama 3.1
``rope_scaling``, q/k/v bias and head_dim/kv_channels. Vocab padding follows NeMo 2.1's importers:
Llama's embedding is sized from the tokenizer rounded up to ``make_vocab_size_divisible_by`` (the
largest power of two <= 128 dividing the HF vocab, so normally no padding); Qwen2 records
``vocab_size`` itself. Sources: shared/reference/conversion.md; NeMo 2.1 ``HFLlamaImporter``/
``HFQwen2Importer``; Megatron-Bridge ``llama_bridge.py``/``param_mapping.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from convert.layout import merge_fc1, merge_qkv, split_fc1, split_qkv


class UnsupportedModelError(ValueError):
    """The checkpoint is not of a supported family or uses a feature the converters do not handle."""


# ---------------------------------------------------------------------------------------------
# attention shape


@dataclass(frozen=True)
class AttentionShape:
    """Heads, KV groups and head dim: what the QKV interleave needs."""

    n_heads: int
    n_groups: int
    head_dim: int

    @classmethod
    def from_hf(cls, hf: dict) -> "AttentionShape":
        n = int(hf["num_attention_heads"])
        return cls(n, int(hf.get("num_key_value_heads") or n), int(hf.get("head_dim") or hf["hidden_size"] // n))

    @classmethod
    def from_nemo(cls, cfg: dict) -> "AttentionShape":
        n = int(cfg["num_attention_heads"])
        return cls(n, int(cfg.get("num_query_groups") or n), int(cfg.get("kv_channels") or cfg["hidden_size"] // n))

    @property
    def kw(self) -> dict:
        return {"n_heads": self.n_heads, "n_groups": self.n_groups, "head_dim": self.head_dim}


# ---------------------------------------------------------------------------------------------
# weight rows


@dataclass(frozen=True)
class ParamMapping:
    """One row: a Megatron parameter and the HF tensor(s) it is made of. Names use ``*`` for the layer."""

    megatron: str
    hf: tuple[str, ...]
    untied_only: bool = False  # only present when the output layer is not tied to the embeddings

    @property
    def per_layer(self) -> bool:
        return "*" in self.megatron

    @property
    def dist_key(self) -> str:
        """The dist-checkpoint key (without ``module.``): layer tensors are stacked under one name."""
        return self.megatron.replace("*.", "")

    def hf_names(self, layer: int | None = None) -> list[str]:
        if self.per_layer and layer is None:
            raise ValueError(f"{self.megatron}: a layer index is needed")
        return [n.replace("*", str(layer)) for n in self.hf]

    def megatron_shape(self, hf_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """Shape of one layer's Megatron tensor made from HF tensors of these shapes."""
        return tuple(hf_shapes[0])

    def hf_shapes(self, shape: tuple[int, ...], attn: AttentionShape) -> list[tuple[int, ...]]:
        return [tuple(shape)]

    def to_megatron(self, tensors: list[torch.Tensor], attn: AttentionShape) -> list[tuple[int, torch.Tensor]]:
        """``(row offset, chunk)`` pieces of one layer's Megatron tensor, as megatron-core stores them."""
        return [(0, tensors[0])]

    def to_hf(self, tensor: torch.Tensor, attn: AttentionShape) -> list[torch.Tensor]:
        return [tensor]


class Identity(ParamMapping):
    """Same tensor, another name."""

    def __init__(self, megatron: str, hf: str, untied_only: bool = False):
        super().__init__(megatron, (hf,), untied_only)


class QKV(ParamMapping):
    """HF q, k, v -> one GQA-interleaved ``linear_qkv`` (weight ``[rows, hidden]`` or bias ``[rows]``)."""

    def __init__(self, megatron: str, q: str, k: str, v: str):
        super().__init__(megatron, (q, k, v))

    def megatron_shape(self, hf_shapes):
        return (sum(s[0] for s in hf_shapes), *hf_shapes[0][1:])

    def hf_shapes(self, shape, attn):
        rest = tuple(shape[1:])
        return [(attn.n_heads * attn.head_dim, *rest), (attn.n_groups * attn.head_dim, *rest),
                (attn.n_groups * attn.head_dim, *rest)]

    def to_megatron(self, tensors, attn):
        return [(0, merge_qkv(*tensors, **attn.kw))]

    def to_hf(self, tensor, attn):
        return list(split_qkv(tensor, **attn.kw))


class GatedMLP(ParamMapping):
    """HF gate, up -> ``linear_fc1 = [gate; up]``. Written as two chunks (gate rows, then up rows), the
    way megatron-core's swiglu sharded state dict stores it, so no concatenated copy is ever made."""

    def __init__(self, megatron: str, gate: str, up: str):
        super().__init__(megatron, (gate, up))

    def megatron_shape(self, hf_shapes):
        return (hf_shapes[0][0] + hf_shapes[1][0], *hf_shapes[0][1:])

    def hf_shapes(self, shape, attn):
        return [(shape[0] // 2, *shape[1:])] * 2

    def to_megatron(self, tensors, attn):
        gate, up = tensors
        if gate.shape != up.shape:
            merge_fc1(gate, up)  # raises the shape error
        return [(0, gate), (gate.shape[0], up)]

    def to_hf(self, tensor, attn):
        return list(split_fc1(tensor))


# ---------------------------------------------------------------------------------------------
# families


@dataclass(frozen=True)
class Family:
    """A model family: its HF architecture names, weight rows and NeMo classes."""

    name: str
    architectures: tuple[str, ...]
    model_type: str
    rows: tuple[ParamMapping, ...]
    nemo_model: str  # class name in nemo.collections.llm
    nemo_module: str  # module of the NeMo config/model classes
    qkv_bias: bool = False
    # HF tensors that are buffers, not weights, and may be present in older files: skipped.
    ignored_hf: tuple[str, ...] = ("rotary_emb.inv_freq",)
    # Modules whose ``_extra_state`` megatron-core stores per layer (TE fp8 metadata; None with the
    # local spec). core_attention only has one with the Transformer-Engine spec; writing it anyway
    # lets a TE model load the checkpoint, and the local spec ignores the unexpected key.
    extra_state: tuple[str, ...] = field(default=(
        "self_attention.core_attention", "self_attention.linear_proj", "self_attention.linear_qkv",
        "mlp.linear_fc1", "mlp.linear_fc2"))

    def rows_for(self, tied: bool) -> list[ParamMapping]:
        return [r for r in self.rows if not (tied and r.untied_only)]

    def hf_name_index(self) -> dict[str, tuple[ParamMapping, int]]:
        """HF name pattern -> (row, position among the row's HF names); the inverse table."""
        return {n: (r, i) for r in self.rows for i, n in enumerate(r.hf)}


_COMMON_ROWS = (
    Identity("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    Identity("decoder.layers.*.self_attention.linear_qkv.layer_norm_weight", "model.layers.*.input_layernorm.weight"),
    QKV("decoder.layers.*.self_attention.linear_qkv.weight", "model.layers.*.self_attn.q_proj.weight",
        "model.layers.*.self_attn.k_proj.weight", "model.layers.*.self_attn.v_proj.weight"),
    Identity("decoder.layers.*.self_attention.linear_proj.weight", "model.layers.*.self_attn.o_proj.weight"),
    Identity("decoder.layers.*.mlp.linear_fc1.layer_norm_weight", "model.layers.*.post_attention_layernorm.weight"),
    GatedMLP("decoder.layers.*.mlp.linear_fc1.weight", "model.layers.*.mlp.gate_proj.weight",
             "model.layers.*.mlp.up_proj.weight"),
    Identity("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight"),
    Identity("decoder.final_layernorm.weight", "model.norm.weight"),
    Identity("output_layer.weight", "lm_head.weight", untied_only=True),
)
_QKV_BIAS = QKV("decoder.layers.*.self_attention.linear_qkv.bias", "model.layers.*.self_attn.q_proj.bias",
                "model.layers.*.self_attn.k_proj.bias", "model.layers.*.self_attn.v_proj.bias")

LLAMA = Family("llama", ("LlamaForCausalLM",), "llama", _COMMON_ROWS, "LlamaModel",
               "nemo.collections.llm.gpt.model.llama")
QWEN2 = Family("qwen2", ("Qwen2ForCausalLM",), "qwen2", (*_COMMON_ROWS[:3], _QKV_BIAS, *_COMMON_ROWS[3:]),
               "Qwen2Model", "nemo.collections.llm.gpt.model.qwen2", qkv_bias=True)
FAMILIES = {f.name: f for f in (LLAMA, QWEN2)}


def family_of_hf(hf: dict, path: str | Path = "config.json") -> Family:
    """The family of a HF config.json (by ``architectures``, else ``model_type``)."""
    archs = hf.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs) or (not archs and hf.get("model_type") == fam.model_type):
            return fam
    known = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise UnsupportedModelError(f"{path}: architectures {archs!r} (model_type {hf.get('model_type')!r}) is not "
                                f"supported; known: {known}")


def family_of_nemo(model_yaml: dict, path: str | Path = "context/model.yaml") -> Family:
    """The family of a NeMo checkpoint from the ``_target_`` of its ``context/model.yaml``."""
    target = str(model_yaml.get("_target_", ""))
    for fam in FAMILIES.values():
        if target == f"{fam.nemo_module}.{fam.nemo_model}":
            return fam
    raise UnsupportedModelError(f"{path}: model {target!r} is not supported; known: "
                                f"{sorted(f'{f.nemo_module}.{f.nemo_model}' for f in FAMILIES.values())}")


# ---------------------------------------------------------------------------------------------
# config


# HF config.json field -> NeMo/Megatron config field, for fields copied as they are.
CONFIG_FIELDS: tuple[tuple[str, str], ...] = (
    ("num_hidden_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_query_groups"),
    ("rms_norm_eps", "layernorm_epsilon"),
    ("rope_theta", "rotary_base"),
    ("initializer_range", "init_method_std"),
    ("tie_word_embeddings", "share_embeddings_and_output_weights"),
    ("max_position_embeddings", "seq_length"),
)
# Llama 3.1 rope_scaling key -> Llama31Config field.
ROPE_LLAMA3_FIELDS: tuple[tuple[str, str], ...] = (
    ("factor", "scale_factor"), ("low_freq_factor", "low_freq_factor"),
    ("high_freq_factor", "high_freq_factor"), ("original_max_position_embeddings", "old_context_len"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# HF defaults for fields a config.json may leave out
_HF_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "initializer_range": 0.02,
                "tie_word_embeddings": False, "max_position_embeddings": 2048}


def vocab_divisor(vocab_size: int) -> int:
    """NeMo 2.1's HFLlamaImporter choice of make_vocab_size_divisible_by: the largest power of two
    <= 128 dividing the vocab, so an imported embedding is normally not padded."""
    base = 128
    while vocab_size % base:
        base //= 2
    return base


def padded_vocab(vocab_size: int, divisor: int) -> int:
    """Rows NeMo gives the embedding for this many tokens (megatron pads up to the divisor)."""
    return -(-vocab_size // divisor) * divisor


def _check_supported(hf: dict, fam: Family, path) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{path}: hidden_act {act!r} is not supported (only silu/SwiGLU)")
    if fam is LLAMA and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise UnsupportedModelError(f"{path}: attention_bias/mlp_bias=true Llama models are not supported "
                                    "(NeMo's LlamaModel has no q/k/v/o or MLP biases)")
    if fam is QWEN2 and hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{path}: use_sliding_window=true is not supported by NeMo 2.1's Qwen2Model")
    rs = hf.get("rope_scaling")
    if rs and rs.get("rope_type", rs.get("type")) != "llama3":
        raise UnsupportedModelError(f"{path}: rope_scaling {rs} is not supported (only rope_type llama3)")
    if rs and fam is not LLAMA:
        raise UnsupportedModelError(f"{path}: rope_scaling is only supported for Llama")
    dt = hf.get("torch_dtype", "float32")
    if dt not in DTYPES:
        raise UnsupportedModelError(f"{path}: torch_dtype {dt!r} is not supported (known: {sorted(DTYPES)})")


def nemo_config_kwargs(hf: dict, path: str | Path = "config.json") -> tuple[str, dict]:
    """(NeMo config class name, constructor kwargs) for a HF config.json dict.

    The class is ``LlamaConfig``, ``Llama31Config`` (llama3 rope_scaling) or ``Qwen2Config``, all in
    the family's NeMo module. Fused-kernel switches keep their defaults (a GPU run uses them).
    """
    fam = family_of_hf(hf, path)
    _check_supported(hf, fam, path)
    missing = [k for k, _ in CONFIG_FIELDS if k not in hf and k not in _HF_DEFAULTS and k != "num_key_value_heads"]
    missing += [] if "vocab_size" in hf else ["vocab_size"]
    if missing:
        raise UnsupportedModelError(f"{path}: missing field(s) {missing}")
    kw = {nemo: hf.get(h, _HF_DEFAULTS.get(h)) for h, nemo in CONFIG_FIELDS}
    kw["num_query_groups"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    kw["share_embeddings_and_output_weights"] = bool(kw["share_embeddings_and_output_weights"])
    attn = AttentionShape.from_hf(hf)
    if attn.head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        if fam is QWEN2:
            raise UnsupportedModelError(f"{path}: head_dim {attn.head_dim} != hidden_size / num_attention_heads")
        kw["kv_channels"] = attn.head_dim
    dtype = DTYPES[hf.get("torch_dtype", "float32")]
    kw.update(gated_linear_unit=True, params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    if fam is QWEN2:
        kw.update(vocab_size=int(hf["vocab_size"]), make_vocab_size_divisible_by=128)  # as NeMo's importer
        return "Qwen2Config", kw
    kw["make_vocab_size_divisible_by"] = vocab_divisor(int(hf["vocab_size"]))
    rs = hf.get("rope_scaling")
    if rs:
        defaults = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
        kw.update({nemo: rs.get(h, defaults[h]) for h, nemo in ROPE_LLAMA3_FIELDS})
        return "Llama31Config", kw
    return "LlamaConfig", kw


def nemo_embedding_rows(hf: dict, tokenizer_len: int) -> int:
    """Rows of the embedding NeMo 2.1 builds for this HF config (TP 1): Qwen2Config carries
    ``vocab_size``; LlamaConfig has none, so GPTConfig pads the tokenizer length."""
    if family_of_hf(hf) is QWEN2:
        return int(hf["vocab_size"])
    return padded_vocab(tokenizer_len, vocab_divisor(int(hf["vocab_size"])))


def hf_config_fields(cfg: dict, fam: Family, *, vocab_size: int, torch_dtype: str) -> dict:
    """The HF config.json fields that follow from a NeMo model config (``context/model.yaml``'s
    ``config``); ``vocab_size`` is the true vocab (megatron's padding cut off)."""
    out = {h: cfg[nemo] for h, nemo in CONFIG_FIELDS if cfg.get(nemo) is not None}
    out["num_key_value_heads"] = cfg.get("num_query_groups") or cfg["num_attention_heads"]
    out["tie_word_embeddings"] = bool(cfg.get("share_embeddings_and_output_weights"))
    out.update(architectures=list(fam.architectures[:1]), model_type=fam.model_type, hidden_act="silu",
               vocab_size=int(vocab_size), torch_dtype=torch_dtype)
    if fam is LLAMA:  # transformers' Qwen2Config has no head_dim (always hidden / heads)
        out.update(attention_bias=False, mlp_bias=False, head_dim=AttentionShape.from_nemo(cfg).head_dim)
    if cfg.get("scale_factor") is not None:  # Llama31Config and its subclasses
        out["rope_scaling"] = {"rope_type": "llama3", **{h: cfg[nemo] for h, nemo in ROPE_LLAMA3_FIELDS}}
    if fam is QWEN2:
        out["use_sliding_window"] = False
    return out
