"""Per-GPU memory estimate for NeMo 2.1 / megatron-core 0.10 fine-tuning (LoRA and full SFT).

What is here:

- :class:`Architecture` and :data:`ARCHITECTURES` — the shapes of the candidate models (taken from
  their Hugging Face ``config.json``), so a config can be checked before the weights are downloaded;
  :func:`resolve_architecture` finds the shape of an :class:`~recipes.config.ExperimentConfig`
  (the HF dir's ``config.json`` when it exists, else the table) and :func:`compare_with_hf` names
  every field in which a downloaded model differs from the model the config is named after;
- :class:`Layout` — the parallelism and batch settings that matter for memory (from a config or by hand);
- :func:`estimate` — bytes per GPU for each pipeline stage: weights, gradients, optimizer states,
  activations, logits and a fixed overhead; :func:`estimate_config` does it for a config.

Units: bytes internally; reports in GiB (2**30 B, what ``nvidia-smi`` and ``torch.cuda`` show; an
"80 GB" H100 SXM has 81,559 MiB = 79.6 GiB). Notation: L layers, h hidden, a heads, g query (KV)
groups, d_h head dim, f FFN size, V vocab padded as Megatron pads it, s sequence length per GPU
(``seq_length / CP``), b micro-batch, t TP, p PP, v virtual stages per pipeline rank (VP), c CP,
d DP, n micro-batches per step and DP rank (``gbs / (mbs * d)``).

Parameters (exact, per module; Megatron's ``compute_weight_and_optimizer_memory`` [2] counts the same
terms): per layer ``h*(a+2g)*d_h`` (fused QKV, + ``(a+2g)*d_h`` bias for Qwen2) + ``a*d_h*h``
(proj) + ``3*h*f`` (SwiGLU fc1 = gate+up, fc2) + ``2h`` (norms); embedding ``V*h``, output layer
``V*h`` unless tied. TP splits every linear weight (norms stay replicated); PP gives each stage
``L/p`` layers, the first stage also the embedding, the last the output layer (both when p = 1).
V is padded to a multiple of ``make_vocab_size_divisible_by * t`` (``nemo.lightning.base.get_vocab_size``);
NeMo's Qwen2 config fixes ``vocab_size`` instead (no padding; it must divide by t).

Bytes per parameter with bf16-mixed (Megatron distributed-optimizer table [3]; NeMo's
``MegatronMixedPrecision`` keeps ``grad_reduce_in_fp32=True``): bf16 weight 2 + fp32 main grad 4 +
fp32 master 4 + Adam m, v 8 = 18; with the distributed optimizer the last 12 are sharded over the
DP x CP group: ``6 + 12/(d*c)``. fp32 training: 4 + 4 + 8 (no master copy). With
``grad_reduce_in_fp32=False`` (NeMo's performance recipes for full SFT) the grad buffer is bf16 (2 B);
the optimizer's fp32 copy of a bf16 grad shard lives only around the optimizer step, when the
activations are already freed, so it is not added to the peak. LoRA: the frozen base is
bf16 weights only (Megatron DDP allocates grad buffers for trainable parameters only); the adapters
(A: r x in, B: out x r per target, split over TP like their base layer, NeMo's
ParallelLinearAdapter) pay the full 18 B.

Activations per layer and micro-batch, bf16 [1, 2], with flash attention (TE fused attention on
H100: no s x s score matrix is stored, Korthikanti's ``5as/h`` term vanishes), Llama blocks (RMSNorm,
no dropout, GQA, SwiGLU) counted tensor by tensor in bytes per ``s*b*h``:

    norm inputs 2+2, norm outputs (= QKV and fc1 inputs) 2+2            -> 8   (replicated over TP)
    Q 2, K and V 4*g*d_h/h, attention output (= proj input) 2           -> TP-split
    fc1 output (2f wide) 4f/h, SwiGLU output (= fc2 input) 2f/h         -> TP-split

i.e. ``A = 12 + 4*g*d_h/h + 6*f/h`` (33.5 for Llama 3.1 70B; Korthikanti's GPT value is 34, Megatron's
``18 + 4f/h`` gives 32). With sequence parallelism everything is divided by t; without it only the
TP-split part: ``8 + (A - 8)/t``. Full recompute (``recompute_granularity=full``, uniform, 1 layer)
keeps only each layer's input (``2 s b h``, /t with SP) plus one layer's full activations during
its backward. Unfused attention (not used here) would add ``2*a*s/h`` per layer.

Pipeline schedules [2, 4] (``megatron/core/pipeline_parallel/schedules.py``): without PP one micro-batch
is live at a time; 1F1B stage r holds ``min(n, p - r)`` micro-batches of ``L/p`` layers; the
interleaved schedule holds ``min(n*v, 2(p - r - 1) + (v - 1)p + 1)`` chunks of ``L/(p v)`` layers —
on stage 0 that is ``L * (1 + (p-1)/(p v))`` layers, Korthikanti's interleaving penalty. The last
stage also holds the final-norm input/output (``4 s b h / t``) and the logits: ``V/t`` columns in bf16
(2 B) plus the fp32 copy the vocab-parallel cross entropy keeps (4 B).

Overhead: a fixed :data:`DEFAULT_OVERHEAD_GIB` for the CUDA context, cuBLAS/cuDNN/TE workspaces and
NCCL communicator buffers, plus :data:`FRAGMENTATION` of the tensor total for the caching allocator
(Megatron's own estimate adds 5 % [2]). Everything else (data loader pinned memory, checkpoint
staging buffers of async saves) is not modelled.

Sources:
[1] V. Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022, Table 2, §4.
[2] Megatron-LM ``megatron/training/theoretical_memory_usage.py`` (weights+optimizer of the most loaded
    shard, activations of the first stage, interleaved-schedule penalty).
[3] Megatron-core distributed optimizer documentation: 18 / ``6 + 12/d`` bytes per parameter.
[4] D. Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
    Megatron-LM", 2021 (1F1B and interleaved schedules).
Model shapes: each family file's ``known_architectures`` (``families/``), from the models' Hugging Face
``config.json`` files (Meta Llama 3.1 8B/70B, tokyotech-llm
Llama-3.1-Swallow 8B/70B, Qwen2.5-72B-Instruct, Nexusflow Athene-V2-Chat).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import families
from families.spec import NEMO_LORA_TARGETS

GIB = 2**30
# CUDA context (~0.5 GiB on H100), cuBLAS/cuDNN/TE workspaces and NCCL buffers of the TP/PP/DP groups.
DEFAULT_OVERHEAD_GIB = 2.5
FRAGMENTATION = 0.05  # caching-allocator slack on top of the tensors (Megatron's estimate uses 5 %)
LORA_TARGETS = NEMO_LORA_TARGETS


# ---------------------------------------------------------------------------------------------
# model shapes


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only model, named as in Hugging Face ``config.json`` where possible."""

    key: str
    family: str  # a families.names() name: owns the vocab rule and the config.json layout
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # num_key_value_heads
    ffn_hidden_size: int  # intermediate_size
    vocab_size: int
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    qkv_bias: bool = False  # q/k/v biases (the family's rows have them)
    tie_embeddings: bool = False
    rope_theta: float = 500000.0
    rope_scaling: Optional[dict] = field(default=None, hash=False)
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    published_params: Optional[float] = None  # model-card parameter count, for the tests
    examples: tuple[str, ...] = ()  # HF repos of this shape

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    # -- vocabulary padding, as NeMo 2.1 builds the model (the family's rule) ----------------
    @property
    def spec(self) -> families.ModelFamily:
        return families.get(self.family)

    @property
    def make_vocab_size_divisible_by(self) -> int:
        return self.spec.make_vocab_size_divisible_by(self.vocab_size)

    @property
    def vocab_is_preset(self) -> bool:
        """The family's NeMo config sets ``vocab_size`` itself, so Megatron does not pad it."""
        return self.spec.vocab_is_preset

    def padded_vocab(self, tp: int) -> int:
        """Rows of the embedding/output layer with TP = ``tp`` (``nemo.lightning.base.get_vocab_size``)."""
        return self.spec.padded_vocab(self.vocab_size, tp)

    # -- parameter counts --------------------------------------------------------------------------
    @property
    def qkv_out(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    def layer_params(self) -> dict[str, int]:
        """Parameters of one decoder layer by module (TP-split ones and the replicated norms)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        q_size = self.num_attention_heads * self.kv_channels
        return {"linear_qkv": h * self.qkv_out + (self.qkv_out if self.qkv_bias else 0),
                "linear_proj": q_size * h, "linear_fc1": h * 2 * f, "linear_fc2": f * h, "norms": 2 * h}

    def layer_param_count(self) -> int:
        return sum(self.layer_params().values())

    def total_params(self, vocab: Optional[int] = None) -> int:
        """All parameters with ``vocab`` rows (default: the true vocab, as the HF checkpoint has them)."""
        v = self.vocab_size if vocab is None else vocab
        emb = v * self.hidden_size
        return (self.num_layers * self.layer_param_count() + emb + (0 if self.tie_embeddings else emb)
                + self.hidden_size)

    def lora_layer_params(self, dim: int, targets=LORA_TARGETS) -> int:
        """Adapter parameters of one layer: A (dim x in) + B (out x dim) per target module
        (NeMo's fused QKV and fc1 have ONE adapter each)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        q_size = self.num_attention_heads * self.kv_channels
        shapes = {"linear_qkv": (h, self.qkv_out), "linear_proj": (q_size, h), "linear_fc1": (h, 2 * f),
                  "linear_fc2": (f, h)}
        return sum(dim * (shapes[t][0] + shapes[t][1]) for t in targets)

    # -- HF config.json ------------------------------------------------------------------------------
    def to_hf_config(self) -> dict:
        """A ``config.json`` of this shape (what a download of the model would hold), e.g. to build a
        recipe or a random-weight model without the weights."""
        return self.spec.hf_config_of(self)

    @classmethod
    def from_hf_config(cls, hf: dict, key: str = "hf") -> "Architecture":
        """The shape described by a Hugging Face ``config.json`` (any registered family), read by the
        family's shape reader (``families.ModelFamily.shape``, the one the FLOPs count uses)."""
        try:
            s = families.for_hf(hf).shape(hf)
        except KeyError as e:
            raise ValueError(f"config.json has no {e.args[0]!r}") from None
        return cls(key=key, family=s.family, num_layers=s.layers, hidden_size=s.hidden, num_attention_heads=s.heads,
                   num_query_groups=s.kv_heads, ffn_hidden_size=s.ffn, vocab_size=s.vocab,
                   head_dim=s.head_dim if s.explicit_head_dim else hf.get("head_dim"), qkv_bias=s.qkv_bias,
                   tie_embeddings=s.tied_embeddings, rope_theta=s.rope_theta, rope_scaling=s.rope_scaling,
                   max_position_embeddings=s.max_position_embeddings, rms_norm_eps=s.rms_norm_eps)

    def summary(self) -> str:
        return (f"{self.family}: {self.num_layers} layers, hidden {self.hidden_size}, {self.num_attention_heads} heads / "
                f"{self.num_query_groups} KV groups, FFN {self.ffn_hidden_size}, vocab {self.vocab_size}"
                f"{', q/k/v bias' if self.qkv_bias else ''}{', tied embeddings' if self.tie_embeddings else ''}, "
                f"{self.total_params() / 1e9:.2f}B params")


# The known production shapes, from the family files (each family lists its models' config.json shapes).
ARCHITECTURES: dict[str, Architecture] = {
    kw["key"]: Architecture(family=f.name, **kw) for f in families.all_families() for kw in f.known_architectures}

# Config-name prefixes -> architecture (the longest matching prefix wins), also from the family files.
# A config field `model.architecture` would take precedence over this (see named_architecture).
NAME_PREFIXES: dict[str, str] = {p: k for f in families.all_families() for p, k in f.config_prefixes.items()}
# model.preset -> architecture of the preset's default build (used until the preset is built; a built
# preset dir may have other dimensions, e.g. `recipes.models tiny --layers 4`, and is then read as is)
PRESETS = {"tiny": "tiny", "small": "smollm2_135m"}

# Fields compared between a downloaded model and the architecture its config names.
_COMPARED = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "tie_word_embeddings")


def named_architecture(cfg) -> tuple[Optional[str], str]:
    """(architecture key, what named it) for a config: ``model.architecture`` when the config has
    that field, else the longest :data:`NAME_PREFIXES` prefix of ``cfg.name``, else ``model.preset``;
    (None, "") when nothing names one."""
    explicit = getattr(cfg.model, "architecture", None)
    if explicit:
        if explicit not in ARCHITECTURES:
            raise KeyError(f"model.architecture={explicit!r}: unknown (known: {', '.join(ARCHITECTURES)})")
        return explicit, "model.architecture"
    matches = [p for p in NAME_PREFIXES if cfg.name == p or cfg.name.startswith(p + "_")]
    if matches:
        prefix = max(matches, key=len)
        return NAME_PREFIXES[prefix], f"config name {cfg.name!r}"
    if cfg.model.preset in PRESETS:
        return PRESETS[cfg.model.preset], f"model.preset={cfg.model.preset}"
    return None, ""


def read_hf_config(hf_path: str | Path) -> Optional[dict]:
    """``<hf_path>/config.json`` as a dict, or None when it does not exist."""
    p = Path(hf_path) / "config.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None


def compare_with_hf(hf: dict, arch: Architecture) -> list[str]:
    """``field: config.json has X, <arch.key> has Y`` for every shape field that differs."""
    want = arch.to_hf_config()
    diffs = []
    for hf_key in _COMPARED:
        got = hf.get(hf_key, False if hf_key == "tie_word_embeddings" else None)
        if hf_key == "num_key_value_heads" and got is None:
            got = hf.get("num_attention_heads")
        if got != want[hf_key]:
            diffs.append(f"{hf_key}: config.json has {got!r}, {arch.key} has {want[hf_key]!r}")
    return diffs


def resolve_architecture(cfg) -> tuple[Architecture, str]:
    """(shape, where it came from) for a config.

    The downloaded model's ``config.json`` wins when it exists (that is what will be trained); it must
    then match the architecture the config names (ValueError listing the differing fields). Without it
    the named architecture from :data:`ARCHITECTURES` is used. LookupError when neither is known.
    """
    key, named_by = named_architecture(cfg)
    hf = read_hf_config(cfg.model.hf_path)
    if hf is not None:
        where = str(Path(cfg.model.hf_path) / "config.json")
        if key is not None and not named_by.startswith("model.preset"):
            diffs = compare_with_hf(hf, ARCHITECTURES[key])
            if diffs:
                raise ValueError(f"model.hf_path: {where} does not describe {key} (named by {named_by}): "
                                 + "; ".join(diffs))
        return Architecture.from_hf_config(hf, key=key or Path(cfg.model.hf_path).name), where
    if key is None:
        raise LookupError(f"config {cfg.name!r}: cannot tell the model shape: {cfg.model.hf_path}/config.json does not "
                          f"exist and the name starts with none of {sorted(NAME_PREFIXES)}")
    return ARCHITECTURES[key], f"{key} (named by {named_by}; {cfg.model.hf_path} not downloaded yet)"


# ---------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class Layout:
    """What determines memory besides the model: method, parallelism, batch, precision."""

    method: str  # "lora" | "sft"
    tp: int = 1
    pp: int = 1
    vp: Optional[int] = None  # model chunks per pipeline rank (NeMo's virtual_pipeline_model_parallel_size)
    cp: int = 1
    sp: bool = False
    dp: int = 1
    micro_batch_size: int = 1
    seq_length: int = 2048
    num_microbatches: int = 1  # per optimizer step and DP rank
    recompute: bool = False  # full activation recompute of every layer
    distributed_optimizer: bool = False
    precision: str = "bf16-mixed"
    lora_dim: int = 8
    lora_targets: tuple[str, ...] = LORA_TARGETS
    flash_attention: bool = True
    # NeMo's MegatronMixedPrecision default; NeMo's performance recipes switch it off for full SFT
    grad_reduce_in_fp32: bool = True

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @classmethod
    def from_config(cls, cfg) -> "Layout":
        p, t = cfg.parallel, cfg.train
        dp = cfg.data_parallel_size
        return cls(method=cfg.method, tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                   vp=p.virtual_pipeline_model_parallel_size, cp=p.context_parallel_size, sp=p.sequence_parallel,
                   dp=dp, micro_batch_size=t.micro_batch_size, seq_length=t.seq_length,
                   num_microbatches=max(1, t.global_batch_size // (t.micro_batch_size * dp)),
                   recompute=t.activation_checkpointing, distributed_optimizer=p.use_distributed_optimizer,
                   precision=t.precision, lora_dim=cfg.lora.dim, lora_targets=tuple(cfg.lora.target_modules))

    def describe(self) -> str:
        method = f"LoRA r{self.lora_dim} ({','.join(self.lora_targets)})" if self.method == "lora" else "full SFT"
        return (f"{method}; TP{self.tp} PP{self.pp} VP{self.vp or '-'} CP{self.cp} SP {'on' if self.sp else 'off'} "
                f"DP{self.dp} = {self.gpus} GPUs; mbs {self.micro_batch_size} x {self.num_microbatches} micro-batches "
                f"x DP{self.dp} = gbs {self.micro_batch_size * self.num_microbatches * self.dp}; "
                f"seq {self.seq_length}; recompute {'full' if self.recompute else 'off'}; "
                f"distributed optimizer {'on' if self.distributed_optimizer else 'off'}; {self.precision}")


# ---------------------------------------------------------------------------------------------
# estimate


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of pipeline stage ``stage``."""

    stage: int
    layers: int
    params: int  # parameters held (weights of this stage, TP shard)
    trainable: int  # of which trainable (all for SFT, the adapters for LoRA)
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    live_layers: float  # layer-micro-batches whose activations are held at the peak

    @property
    def tensors(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits

    @property
    def total(self) -> float:
        return self.tensors + self.overhead


@dataclass(frozen=True)
class MemoryEstimate:
    arch: Architecture
    layout: Layout
    stages: tuple[StageMemory, ...]
    padded_vocab: int
    notes: tuple[str, ...] = ()

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def total_gib(self) -> float:
        return self.peak.total / GIB

    def fits(self, gpu_memory_gb: float = 80.0) -> bool:
        return self.total_gib <= gpu_memory_gb

    def table(self) -> str:
        """One row per distinct pipeline stage (first, middle, last), GiB."""
        head = f"{'stage':>5} {'layers':>6} {'weights':>8} {'grads':>7} {'optim':>7} {'activ.':>7} {'logits':>7} " \
               f"{'overhd':>7} {'total':>7}  GiB"
        rows = [head]
        for s in self.stages:
            rows.append(f"{s.stage:>5} {s.layers:>6} {s.weights / GIB:>8.2f} {s.grads / GIB:>7.2f} "
                        f"{s.optimizer / GIB:>7.2f} {s.activations / GIB:>7.2f} {s.logits / GIB:>7.2f} "
                        f"{s.overhead / GIB:>7.2f} {s.total / GIB:>7.2f}")
        return "\n".join(rows)


def _bytes_per_element(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def activation_bytes_per_layer(arch: Architecture, layout: Layout) -> float:
    """Bytes one layer keeps for one micro-batch without recompute (see the module docstring)."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    s = layout.seq_length / layout.cp
    sbh = s * layout.micro_batch_size * h
    elem = _bytes_per_element(layout.precision) / 2  # coefficients below are for 2-byte activations
    replicated = 8.0  # norm inputs and outputs
    split = 4.0 + 4.0 * arch.num_query_groups * arch.kv_channels / h + 6.0 * f / h
    if not layout.flash_attention:
        split += 2.0 * arch.num_attention_heads * s / h  # stored softmax probabilities
    t = layout.tp
    per_sbh = (replicated + split) / t if layout.sp else replicated + split / t
    lora = 0.0
    if layout.method == "lora":  # x @ A for each adapter: s*b*r values, kept for B's gradient
        lora = 2.0 * s * layout.micro_batch_size * layout.lora_dim * len(layout.lora_targets)
    return (per_sbh * sbh + lora) * elem


def live_layers(arch: Architecture, layout: Layout, stage: int) -> float:
    """Layer-micro-batch activations held by pipeline stage ``stage`` at its peak (1F1B / interleaved)."""
    p, n, L = layout.pp, layout.num_microbatches, arch.num_layers
    if p == 1:
        return float(L)
    v = layout.vp or 1
    if v == 1:
        return min(n, p - stage) * L / p
    warmup = 2 * (p - stage - 1) + (v - 1) * p
    return min(n * v, warmup + 1) * L / (p * v)


def estimate(arch: Architecture, layout: Layout, *, overhead_gib: float = DEFAULT_OVERHEAD_GIB,
             fragmentation: float = FRAGMENTATION) -> MemoryEstimate:
    """Per-GPU memory of every pipeline stage (first, last and, with PP > 2, a middle one)."""
    t, p = layout.tp, layout.pp
    vocab = arch.padded_vocab(t)
    h = arch.hidden_size
    fp32 = layout.precision == "fp32"
    w_bytes = 4 if fp32 else 2
    # Adam m and v, plus an fp32 master copy unless the weights are fp32 already; sharded by the
    # distributed optimizer over the DP x CP group (megatron's data_parallel_group_with_cp).
    opt_bytes = (8 if fp32 else 12) / (layout.dp * layout.cp if layout.distributed_optimizer else 1)
    # main-grad buffer: fp32 with grad_reduce_in_fp32 (NeMo's default), else the training dtype. The
    # optimizer's transient fp32 copy of bf16 grads exists only around the step, when activations are freed.
    grad_bytes = 4 if (fp32 or layout.grad_reduce_in_fp32) else 2
    layers_per_stage = arch.num_layers // p if arch.num_layers % p == 0 else math.ceil(arch.num_layers / p)
    layer = arch.layer_params()
    layer_split = sum(v for k, v in layer.items() if k != "norms")
    per_layer = layer_split / t + layer["norms"]
    emb = vocab * h / t
    lora_per_layer = arch.lora_layer_params(layout.lora_dim, layout.lora_targets) / t if layout.method == "lora" else 0
    act_layer = activation_bytes_per_layer(arch, layout)
    elem = _bytes_per_element(layout.precision)
    s = layout.seq_length / layout.cp
    sbh = s * layout.micro_batch_size * h
    sp_div = t if layout.sp else 1
    notes = []
    stages = sorted({0, p - 1} | ({p // 2} if p > 2 else set()))
    out = []
    for r in stages:
        params = layers_per_stage * per_layer
        if r == 0:
            params += emb
        if r == p - 1:
            params += h  # final norm
            if not arch.tie_embeddings or p > 1:  # tied + PP: the last stage keeps its own copy
                params += emb
        trainable = params if layout.method == "sft" else layers_per_stage * lora_per_layer
        weights = params * w_bytes + (trainable * w_bytes if layout.method == "lora" else 0)
        grads = trainable * grad_bytes
        optimizer = trainable * opt_bytes
        live = live_layers(arch, layout, r)
        if layout.recompute:  # layer inputs only, plus one layer recomputed during its backward
            activations = live * elem * sbh / sp_div + act_layer
        else:
            activations = live * act_layer
        logits = 0.0
        if r == p - 1:
            activations += 2 * elem * sbh / sp_div  # final-norm input and output
            logits = s * layout.micro_batch_size * vocab / t * (2 + 4)  # bf16 logits + fp32 copy for the loss
        tensors = weights + grads + optimizer + activations + logits
        overhead = overhead_gib * GIB + fragmentation * tensors
        out.append(StageMemory(stage=r, layers=layers_per_stage, params=int(params), trainable=int(trainable),
                               weights=weights, grads=grads, optimizer=optimizer, activations=activations,
                               logits=logits, overhead=overhead, live_layers=live))
    if vocab != arch.vocab_size:
        notes.append(f"vocab {arch.vocab_size} padded to {vocab} (multiple of "
                     f"{arch.make_vocab_size_divisible_by} x TP{t}); exports must cut it back to {arch.vocab_size}")
    return MemoryEstimate(arch=arch, layout=layout, stages=tuple(out), padded_vocab=vocab, notes=tuple(notes))


def estimate_config(cfg, arch: Optional[Architecture] = None, **kwargs) -> MemoryEstimate:
    """:func:`estimate` for an ExperimentConfig (shape from :func:`resolve_architecture` unless given)."""
    arch = arch or resolve_architecture(cfg)[0]
    return estimate(arch, Layout.from_config(cfg), **kwargs)


def with_layout(layout: Layout, **changes: Any) -> Layout:
    """A copy of ``layout`` with fields changed (for what-if tables)."""
    return dataclasses.replace(layout, **changes)
