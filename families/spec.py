"""What a model family is: the base class every family file subclasses, and its building blocks.

Megatron-Bridge style (``models/llama/llama_bridge.py``): a family is registered by its HF
architecture names and owns, in one file,

* the **weight mapping**: rows ``megatron name <-> HF name(s) + transform`` with ``*`` for the
  decoder-layer index (:class:`Identity`, :class:`QKV` for HF q/k/v <-> the fused, GQA-interleaved
  ``linear_qkv``, :class:`GatedMLP` for gate/up <-> ``linear_fc1 = [gate; up]``; the maths is in
  :mod:`families.layout`). The rows are the same for both directions; nothing is derived twice;
* the **config translation** HF ``config.json`` <-> NeMo/Megatron ``TransformerConfig``
  (:meth:`ModelFamily.nemo_config`, :meth:`ModelFamily.hf_config_fields`) and the checks of what
  NeMo 2.1 can represent (:meth:`ModelFamily.check_supported`);
* the **shape reader** (:meth:`ModelFamily.shape`) that the memory estimator and the FLOPs count use;
* the **vocab padding rule** (:meth:`ModelFamily.make_vocab_size_divisible_by`,
  :meth:`ModelFamily.padded_vocab`, :meth:`ModelFamily.nemo_embedding_rows`);
* the **LoRA module names** NeMo <-> HF PEFT <-> NIM (:meth:`ModelFamily.lora_modules`), derived
  from the weight rows, so the adapter split is the weight split;
* its NeMo classes and, where NeMo 2.1's own importer needs a fix, the fixed importer;
* the known shapes of its production models (``known_architectures``) and config-name prefixes.

Megatron stores decoder-layer tensors stacked over layers under one name without the index
(``decoder.layers.self_attention.linear_qkv.weight`` has shape ``[num_layers, ...]``), so
:meth:`ParamMapping.dist_key` drops the ``*``. Layer norms use the Transformer-Engine names even for
the local layer spec (megatron maps ``input_layernorm`` onto ``linear_qkv.layer_norm_weight`` in its
sharded state dict). Sources: shared/reference/conversion.md; NeMo 2.1 ``HFLlamaImporter``/
``HFQwen2Importer``/``HFMistralImporter``; Megatron-Bridge ``llama_bridge.py``/``param_mapping.py``.

Nothing here imports NeMo at module level: the memory estimator, the FLOPs count and the config
validation use a family without NeMo installed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from families.layout import merge_fc1, merge_qkv, split_fc1, split_qkv


class UnsupportedModelError(ValueError):
    """The checkpoint is not of a supported family or uses a feature the converters do not handle."""


# ---------------------------------------------------------------------------------------------
# shapes


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


@dataclass(frozen=True)
class DecoderShape:
    """The dimensions of a decoder read from a HF ``config.json`` (one reader for every consumer:
    ``recipes.memory.Architecture.from_hf_config`` and ``benchmarks.flops.model_shape``)."""

    family: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = field(default=None, hash=False, compare=False)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    explicit_head_dim: bool = False  # config.json names a head_dim other than hidden / heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


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
        """The HF tensors of one layer's Megatron tensor, split by rows (also a LoRA B ``[rows, r]``)."""
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


# The rows of a pre-norm, RMSNorm, SwiGLU, RoPE decoder in HF's ``model.layers.N.{self_attn,mlp}``
# naming: what most families share. A family adds or replaces rows (Qwen2's q/k/v biases).
DECODER_ROWS: tuple[ParamMapping, ...] = (
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
QKV_BIAS_ROW = QKV("decoder.layers.*.self_attention.linear_qkv.bias", "model.layers.*.self_attn.q_proj.bias",
                   "model.layers.*.self_attn.k_proj.bias", "model.layers.*.self_attn.v_proj.bias")

# NeMo's LoRA target names (megatron-core module names; llm.peft.LoRA target_modules).
NEMO_LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class LoraModule:
    """One NeMo LoRA target and what it is in HF PEFT / NIM terms (read off the weight row)."""

    target: str  # NeMo name, e.g. linear_qkv
    nemo_path: str  # inside a megatron decoder layer, e.g. self_attention.linear_qkv
    hf_paths: tuple[str, ...]  # inside a HF decoder layer, e.g. self_attn.q_proj, ... (PEFT key paths)
    row: ParamMapping  # the weight row: its to_hf splits a LoRA B matrix exactly as the weight

    @property
    def hf_modules(self) -> tuple[str, ...]:
        """PEFT ``target_modules`` / NIM names: the last component (q_proj, ...)."""
        return tuple(p.rsplit(".", 1)[-1] for p in self.hf_paths)


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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# HF defaults for fields a config.json may leave out
HF_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "initializer_range": 0.02,
               "tie_word_embeddings": False, "max_position_embeddings": 2048}
# NeMo model-config fields that follow the checkpoint's dtype, not the architecture
DTYPE_FIELDS = ("params_dtype", "bf16", "fp16")


@dataclass(frozen=True)
class BridgeRecipe:
    """One Megatron-Bridge recipe function (``"module:function"``) and the keyword arguments that make it a
    method's recipe; :func:`bridge_recipes_for` names them for a model."""
    function: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.function.split(':')[1]}({', '.join(f'{k}={v!r}' for k, v in self.kwargs)})"


def bridge_recipes_for(module: str, model: str) -> dict[str, tuple[BridgeRecipe, ...]]:
    """A model's finetune recipes on each Megatron-Bridge line, by method, in the order they are tried (the first
    one the installed bridge has is used): 0.3 (NeMo 26.02) has ``{model}_finetune_config(peft=...)`` for both
    methods; 0.4 and later have ``{model}_peft_config(peft_scheme=...)`` and ``{model}_sft_config()``, aliases of
    their H100 recipes (0.6.2: ``llama31_8b_peft_1gpu_h100_bf16_config``, ``..._sft_2gpu_h100_bf16_config``)."""
    return {"lora": (BridgeRecipe(f"{module}:{model}_finetune_config", (("peft", "lora"),)),
                     BridgeRecipe(f"{module}:{model}_peft_config", (("peft_scheme", "lora"),))),
            "sft": (BridgeRecipe(f"{module}:{model}_finetune_config", (("peft", None),)),
                    BridgeRecipe(f"{module}:{model}_sft_config"))}


def dtype_kwargs(hf: dict) -> dict:
    """``params_dtype``/``bf16``/``fp16`` for a HF config's ``torch_dtype`` (what NeMo's importers set)."""
    dtype = DTYPES[hf.get("torch_dtype", "float32")]
    return {"params_dtype": dtype, "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def largest_pow2_divisor(vocab_size: int, cap: int = 128) -> int:
    """The largest power of two <= ``cap`` dividing ``vocab_size`` (NeMo's HFLlamaImporter rule)."""
    base = cap
    while vocab_size % base:
        base //= 2
    return base


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# the family base class


class ModelFamily:
    """A model family. Subclass it in ``families/<name>.py`` and decorate with
    :func:`families.register`; override only what differs from a Llama-style decoder."""

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]  # HF ``architectures`` values it accepts
    model_type: ClassVar[str]  # HF ``model_type`` (AutoConfig.for_model)
    nemo_module: ClassVar[str]  # module of the NeMo config/model classes
    nemo_model: ClassVar[str]  # NeMo model class name
    nemo_config_class: ClassVar[str]  # the NeMo config class for a plain config
    rows: ClassVar[tuple[ParamMapping, ...]] = DECODER_ROWS
    # HF tensors that are buffers, not weights, and may be present in older files: skipped.
    ignored_hf: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    # Modules whose ``_extra_state`` megatron-core stores per layer (TE fp8 metadata; None with the
    # local spec). core_attention only has one with the Transformer-Engine spec; writing it anyway
    # lets a TE model load the checkpoint, and the local spec ignores the unexpected key.
    extra_state: ClassVar[tuple[str, ...]] = (
        "self_attention.core_attention", "self_attention.linear_proj", "self_attention.linear_qkv",
        "mlp.linear_fc1", "mlp.linear_fc2")
    lora_targets: ClassVar[tuple[str, ...]] = NEMO_LORA_TARGETS
    # Known production shapes: recipes.memory.Architecture keyword arguments without ``family``.
    known_architectures: ClassVar[tuple[dict, ...]] = ()
    # Config-name prefixes (nemo_configs/<prefix>_*.yaml) -> known architecture key.
    config_prefixes: ClassVar[dict[str, str]] = {}
    # known architecture key -> method -> the Megatron-Bridge recipes of that model, 0.3's first then 0.4+'s
    # (bridge_recipes_for): the reference recipes.bridge_recipe compares a production config with
    bridge_recipes: ClassVar[dict[str, dict[str, tuple[BridgeRecipe, ...]]]] = {}
    # HF config fields a random test model of this family sets beyond the shape (recipes.models tiny)
    tiny_hf_overrides: ClassVar[dict] = {}

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- weights ------------------------------------------------------------------------------
    @property
    def qkv_bias(self) -> bool:
        return any(r.megatron.endswith("linear_qkv.bias") for r in self.rows)

    def rows_for(self, tied: bool) -> list[ParamMapping]:
        return [r for r in self.rows if not (tied and r.untied_only)]

    def expected_hf_shapes(self, hf: dict) -> dict[str, tuple[int, ...]]:
        """HF tensor name pattern -> the shape config.json implies (for every name a row may use)."""
        attn = AttentionShape.from_hf(hf)
        hidden, ffn, vocab = (int(hf[k]) for k in ("hidden_size", "intermediate_size", "vocab_size"))
        q_rows, kv_rows = attn.n_heads * attn.head_dim, attn.n_groups * attn.head_dim
        return {
            "model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
            "model.norm.weight": (hidden,), "model.layers.*.input_layernorm.weight": (hidden,),
            "model.layers.*.post_attention_layernorm.weight": (hidden,),
            "model.layers.*.self_attn.q_proj.weight": (q_rows, hidden),
            "model.layers.*.self_attn.k_proj.weight": (kv_rows, hidden),
            "model.layers.*.self_attn.v_proj.weight": (kv_rows, hidden),
            "model.layers.*.self_attn.q_proj.bias": (q_rows,), "model.layers.*.self_attn.k_proj.bias": (kv_rows,),
            "model.layers.*.self_attn.v_proj.bias": (kv_rows,),
            "model.layers.*.self_attn.o_proj.weight": (hidden, q_rows),
            "model.layers.*.mlp.gate_proj.weight": (ffn, hidden), "model.layers.*.mlp.up_proj.weight": (ffn, hidden),
            "model.layers.*.mlp.down_proj.weight": (hidden, ffn),
        }

    def lora_modules(self) -> dict[str, LoraModule]:
        """NeMo LoRA target -> :class:`LoraModule`, read off the decoder-layer weight rows."""
        out = {}
        for t in self.lora_targets:
            row = next((r for r in self.rows if r.per_layer and r.megatron.endswith(f".{t}.weight")), None)
            if row is None:
                raise UnsupportedModelError(f"family {self.name}: no weight row for LoRA target {t}")
            nemo_path = row.megatron.removeprefix("decoder.layers.*.").removesuffix(".weight")
            hf_paths = tuple(n.removeprefix("model.layers.*.").removesuffix(".weight") for n in row.hf)
            out[t] = LoraModule(t, nemo_path, hf_paths, row)
        return out

    def hf_lora_modules(self, targets) -> list[str]:
        """HF PEFT ``target_modules`` for these NeMo targets (q/k/v for linear_qkv, ...), in order."""
        mods = self.lora_modules()
        bad = [t for t in targets if t not in mods]
        if bad:
            raise UnsupportedModelError(f"family {self.name}: LoRA target(s) {bad} unknown (known: {sorted(mods)})")
        return [m for t in targets for m in mods[t].hf_modules]

    def hf_lora_paths(self) -> dict[str, str]:
        """HF PEFT module name (q_proj) -> its path inside a decoder layer (self_attn.q_proj)."""
        return {p.rsplit(".", 1)[-1]: p for m in self.lora_modules().values() for p in m.hf_paths}

    # -- config -------------------------------------------------------------------------------
    def check_supported(self, hf: dict, path) -> None:
        """Raise :class:`UnsupportedModelError` for what NeMo 2.1's model of this family cannot hold."""
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{path}: hidden_act {act!r} is not supported (only silu/SwiGLU)")
        rs = hf.get("rope_scaling")
        if rs:
            self.check_rope_scaling(rs, path)
        dt = hf.get("torch_dtype", "float32")
        if dt not in DTYPES:
            raise UnsupportedModelError(f"{path}: torch_dtype {dt!r} is not supported (known: {sorted(DTYPES)})")

    def check_rope_scaling(self, rope_scaling: dict, path) -> None:
        raise UnsupportedModelError(f"{path}: rope_scaling {rope_scaling} is not supported for {self.name}")

    def nemo_config(self, hf: dict, path: str | Path = "config.json") -> tuple[str, dict]:
        """(NeMo config class name, constructor kwargs) for a HF config.json dict: the architecture
        only (no dtype: :func:`dtype_kwargs`; ``seq_length`` = max_position_embeddings). Fused-kernel
        switches keep their defaults (a GPU run uses them)."""
        self.check_supported(hf, path)
        missing = [k for k, _ in CONFIG_FIELDS if k not in hf and k not in HF_DEFAULTS and k != "num_key_value_heads"]
        missing += [] if "vocab_size" in hf else ["vocab_size"]
        if missing:
            raise UnsupportedModelError(f"{path}: missing field(s) {missing}")
        kw: dict[str, Any] = {nemo: hf.get(h, HF_DEFAULTS.get(h)) for h, nemo in CONFIG_FIELDS}
        kw["num_query_groups"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        kw["share_embeddings_and_output_weights"] = bool(kw["share_embeddings_and_output_weights"])
        kw["gated_linear_unit"] = True
        attn = AttentionShape.from_hf(hf)
        if attn.head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
            kw["kv_channels"] = attn.head_dim
        kw["make_vocab_size_divisible_by"] = self.make_vocab_size_divisible_by(int(hf["vocab_size"]))
        if self.vocab_is_preset:
            kw["vocab_size"] = int(hf["vocab_size"])
        return self.nemo_config_class, kw

    def hf_config_fields(self, cfg: dict, *, vocab_size: int, torch_dtype: str) -> dict:
        """The HF config.json fields that follow from a NeMo model config (``context/model.yaml``'s
        ``config``); ``vocab_size`` is the true vocab (megatron's padding cut off)."""
        out = {h: cfg[nemo] for h, nemo in CONFIG_FIELDS if cfg.get(nemo) is not None}
        out["num_key_value_heads"] = cfg.get("num_query_groups") or cfg["num_attention_heads"]
        out["tie_word_embeddings"] = bool(cfg.get("share_embeddings_and_output_weights"))
        out.update(architectures=list(self.architectures[:1]), model_type=self.model_type, hidden_act="silu",
                   vocab_size=int(vocab_size), torch_dtype=torch_dtype)
        return out

    def hf_config_of(self, arch: Any) -> dict:
        """A ``config.json`` of a ``recipes.memory.Architecture`` (what a download would hold)."""
        cfg = {"architectures": list(self.architectures[:1]), "model_type": self.model_type,
               "hidden_size": arch.hidden_size, "intermediate_size": arch.ffn_hidden_size,
               "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_attention_heads,
               "num_key_value_heads": arch.num_query_groups, "vocab_size": arch.vocab_size,
               "rms_norm_eps": arch.rms_norm_eps, "rope_theta": arch.rope_theta,
               "max_position_embeddings": arch.max_position_embeddings,
               "tie_word_embeddings": arch.tie_embeddings, "hidden_act": "silu", "initializer_range": 0.02,
               "torch_dtype": "bfloat16"}
        if arch.head_dim and arch.head_dim != arch.hidden_size // arch.num_attention_heads:
            cfg["head_dim"] = arch.head_dim
        if arch.rope_scaling:
            cfg["rope_scaling"] = dict(arch.rope_scaling)
        return cfg

    # -- shape --------------------------------------------------------------------------------
    def shape(self, hf: dict, where: str = "<config>") -> DecoderShape:
        """The decoder shape of a HF config.json of this family."""
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"{where}: HF config lacks {', '.join(missing)}")
        heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
        return DecoderShape(
            family=self.name, layers=int(hf["num_hidden_layers"]), hidden=int(hf["hidden_size"]),
            ffn=int(hf["intermediate_size"]), heads=heads, kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim, vocab=int(hf["vocab_size"]), tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=self.qkv_bias or bool(hf.get("attention_bias", False)),
            rope_theta=float(hf.get("rope_theta", HF_DEFAULTS["rope_theta"])), rope_scaling=hf.get("rope_scaling"),
            max_position_embeddings=int(hf.get("max_position_embeddings", HF_DEFAULTS["max_position_embeddings"])),
            rms_norm_eps=float(hf.get("rms_norm_eps", HF_DEFAULTS["rms_norm_eps"])),
            explicit_head_dim=head_dim != int(hf["hidden_size"]) // heads)

    # -- vocabulary padding, as NeMo 2.1 builds the model -----------------------------------
    vocab_is_preset: ClassVar[bool] = False  # the NeMo config carries vocab_size (no padding)

    def make_vocab_size_divisible_by(self, vocab_size: int) -> int:
        """NeMo 2.1's importer choice: the largest power of two <= 128 dividing the vocab, so an
        imported embedding is normally not padded (HFLlamaImporter.config)."""
        return largest_pow2_divisor(vocab_size)

    def padded_vocab(self, vocab_size: int, tp: int = 1) -> int:
        """Rows of the embedding/output layer with TP = ``tp`` (``nemo.lightning.base.get_vocab_size``)."""
        if self.vocab_is_preset:
            return vocab_size
        return round_up(vocab_size, self.make_vocab_size_divisible_by(vocab_size) * tp)

    def nemo_embedding_rows(self, hf: dict, tokenizer_len: int) -> int:
        """Rows of the embedding NeMo 2.1 builds for this HF config (TP 1). A config without
        ``vocab_size`` (Llama's) is sized by GPTConfig from the tokenizer length, padded."""
        if self.vocab_is_preset:
            return int(hf["vocab_size"])
        return round_up(tokenizer_len, self.make_vocab_size_divisible_by(int(hf["vocab_size"])))

    # -- NeMo classes -------------------------------------------------------------------------
    @property
    def nemo_target(self) -> str:
        """The ``_target_`` of the model in a NeMo checkpoint's ``context/model.yaml``."""
        return f"{self.nemo_module}.{self.nemo_model}"

    def nemo_class(self, name: Optional[str] = None):
        """A class of the family's NeMo module (default: the model class); imports NeMo."""
        return getattr(importlib.import_module(self.nemo_module), name or self.nemo_model)

    def nemo_importer(self, hf_path: Path):
        """NeMo 2.1's importer of a HF dir for this family (``llm.import_ckpt`` picks the registered
        one); a family whose 2.1.0 importer is wrong returns a fixed one here."""
        from nemo.collections import llm
        # the importer builds the model config from config.json; this placeholder only selects it
        placeholder = self.nemo_class(self.nemo_config_class)(num_layers=1, hidden_size=64, num_attention_heads=1)
        model = self.nemo_class()(placeholder)

        def run(output_path):
            return llm.import_ckpt(model=model, source=f"hf://{hf_path}", output_path=output_path)
        return run

    def nemo_importer_vocab(self) -> Optional[int]:
        """A vocab size NeMo 2.1.0's own importer hard-codes for this family (None: it reads config.json)."""
        return None
