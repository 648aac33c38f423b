"""One experiment config for both backends.

A YAML file in ``nemo_configs/`` is loaded with omegaconf (so ``${...}`` interpolation works),
``key=value`` overrides are applied on top (as NeMo-Run / Hydra do), and the result is validated
into a frozen, typed :class:`ExperimentConfig`. Every hyperparameter is defined here once; the NeMo
and HF backends only *translate* it (``recipes/nemo_backend.py``, ``recipes/hf_backend.py``).

Unknown keys and invalid values raise :class:`ConfigError` naming the dotted key, e.g.
``train.micro_batch_size: expected int, got 'two'``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import families
# NeMo names for the LoRA targets; each family maps them to its HF projections (q/k/v/o/gate/up/down).
from families.spec import NEMO_LORA_TARGETS


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    # Directory of a Hugging Face model (config.json, safetensors, tokenizer with chat template).
    hf_path: str
    # Build hf_path with `python -m recipes.models <preset>` when it does not exist yet:
    # "tiny" (random Llama + local tokenizer, for tests) or "small" (SmolLM2-135M-Instruct from GGUF).
    preset: Optional[Literal["tiny", "small"]] = None
    # Model family (families.names(): llama, qwen2, mistral); it must match config.json's architectures.
    family: str = families.DEFAULT_FAMILY
    # Shape key in recipes.memory.ARCHITECTURES (e.g. llama31_8b) for memory estimates and validation
    # without the weights; default: config.json in hf_path, else the config name's prefix.
    architecture: Optional[str] = None


@dataclass(frozen=True)
class LoraConfig:
    dim: int = 8  # rank r
    alpha: int = 16  # scaling = alpha / dim
    dropout: float = 0.0
    # NeMo module names. HF: linear_qkv -> q_proj,k_proj,v_proj; linear_proj -> o_proj;
    # linear_fc1 -> gate_proj,up_proj; linear_fc2 -> down_proj. NeMo's fused QKV LoRA shares one A
    # across q/k/v, so HF has 2*r*hidden more trainable parameters per layer for linear_qkv.
    target_modules: tuple[str, ...] = NEMO_LORA_TARGETS
    # None: each framework initialises A itself. An int: every backend starts from the same A matrices (recipes.
    # lora_init: seeded Xavier-uniform per module; HF's q/k/v (gate/up) get the fused module's A), so runs of
    # different frameworks start from the same model. Needs tensor_model_parallel_size 1.
    a_init_seed: Optional[int] = None


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98  # NeMo finetune recipe default
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 20
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 512
    seed: int = 1234
    # fp32 on CPU; bf16-mixed on H100. Never switched silently by a backend.
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed"] = "fp32"
    activation_checkpointing: bool = False
    log_every_n_steps: int = 1
    val_check_interval: int = 0  # 0: validate only at the end
    limit_val_batches: int = 2
    checkpoint_every_n_steps: int = 0  # 0: only at the end (HF: none, the final adapter/model only); a rerun resumes
    num_devices: int = 1  # GPUs per node (1 on CPU); the world size is num_devices * parallel.num_nodes
    # NeMo only: pack several short sequences into one seq_length row (NeMo's packed SFT dataset).
    packed_sequence: bool = False
    warmup_steps_excluded: int = 1  # steps left out of step-time statistics
    # HF: torch.distributed collectives give up after this many minutes instead of waiting on a dead rank
    # (ddp_timeout). NeMo keeps torch's / megatron-core's 30: NeMo 2.1 cannot checkpoint a strategy given a
    # timeout (recipes.nemo_recipe.strategy_config says why)
    collective_timeout_min: int = 30

    def validation_batches(self, rows: int) -> int:
        """Global batches a validation of a ``rows``-row validation split evaluates, in every backend: NeMo's -
        ``limit_val_batches``, whole global batches only (its sequential validation sampler does not run an
        incomplete one), so 0 with less than one."""
        return min(self.limit_val_batches, rows // self.global_batch_size)


@dataclass(frozen=True)
class DataConfig:
    # Directory written by `python -m recipes.prepare_data` (training/validation/test.jsonl).
    dataset_dir: str
    # Raw draft->final file (CSV/XLSX/JSONL) to prepare into dataset_dir when it is missing.
    source: Optional[str] = None
    # Time split used when preparing: the latest test_months -> test, the val_months before -> validation.
    test_months: int = 1
    val_months: int = 1


@dataclass(frozen=True)
class ParallelConfig:
    # Only used by the NeMo backend (the HF baseline runs every process as a data-parallel rank).
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    num_nodes: int = 1
    # Shard optimizer states over data-parallel ranks (Megatron distributed optimizer); GPU only.
    use_distributed_optimizer: bool = True


# MLflow tracking URIs the client in this environment (mlflow-skinny) can write to; a sqlite: or other
# database store needs the full mlflow package: run `mlflow server` on it and give its http:// address.
MLFLOW_SCHEMES = ("http", "https", "file")


@dataclass(frozen=True)
class TrackingConfig:
    # TensorBoard event files under <output_dir>/tb, written by each backend's own logger (NeMo's
    # NeMoLogger with Lightning's TensorBoardLogger; HF's report_to="tensorboard").
    tensorboard: bool = True
    # MLflow tracking URI (off when null): http(s)://HOST:PORT of an MLflow server, or file:PATH for a local
    # store (file:./mlruns, file:///abs/mlruns; the client's file store is in maintenance mode, so
    # benchmarks.tracking sets MLFLOW_ALLOW_FILE_STORE=true for it). NeMo: Lightning's MLFlowLogger
    # through NeMoLogger; HF: transformers' MLflowCallback. Same train/<name> metrics as TensorBoard.
    mlflow: Optional[str] = None
    # MLflow experiment (default: the config's name) and run name (default: <backend>-<method>-<UTC time>,
    # e.g. nemo-lora-20250101T120000Z).
    experiment: Optional[str] = None
    run_name: Optional[str] = None


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    method: Literal["lora", "sft"]
    model: ModelConfig
    data: DataConfig
    output_dir: str
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def world_size(self) -> int:
        return self.train.num_devices * self.parallel.num_nodes

    @property
    def targets_gpu(self) -> bool:
        """True when the config is meant for GPUs (bf16/fp16 or more than one device), whatever this machine
        has: the launchers ask for GPUs and the dry runs describe a GPU run then."""
        return self.train.precision != "fp32" or self.world_size > 1

    @property
    def data_parallel_size(self) -> int:
        p = self.parallel
        return max(1, self.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                                          * p.context_parallel_size))

    @property
    def grad_accumulation_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.data_parallel_size)

    def to_dict(self) -> dict[str, Any]:
        def conv(v):
            if dataclasses.is_dataclass(v):
                return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            return v
        return conv(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))

    def replace(self, **overrides: str) -> "ExperimentConfig":
        """A copy with dotted overrides applied (validated like a file)."""
        return from_dict(_merge(self.to_dict(), [f"{k}={v}" for k, v in overrides.items()]), "<replace>")


# ---------------------------------------------------------------------------------------------
# loading and validation


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML config, apply ``key=value`` overrides, validate. Raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OmegaConfBaseException, OSError, ValueError) as e:  # yaml errors are ValueError subclasses
        raise ConfigError(f"{path}: cannot read YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return from_dict(_merge(raw, list(overrides)), str(path))


def _merge(raw: dict, overrides: list[str]) -> dict:
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected key=value")
    conf = OmegaConf.create(raw)
    try:
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve config: {e}") from None


def from_dict(raw: dict, where: str = "<config>") -> ExperimentConfig:
    return _build(ExperimentConfig, raw, prefix="", where=where)


def _build(cls, raw: Any, prefix: str, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {key}")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], key, where)
    obj = cls(**kwargs)
    _check(obj, prefix, where)
    return obj


def _coerce(tp, value, key: str, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key}: expected a non-empty string, got {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported type {tp}")  # pragma: no cover


def _positive(obj, names, prefix, where, allow_zero=False):
    for n in names:
        v = getattr(obj, n)
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{where}: {prefix}{n}: must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def _check(obj, prefix: str, where: str) -> None:
    """Value checks that types cannot express; each names its key."""
    if isinstance(obj, LoraConfig):
        _positive(obj, ["dim", "alpha"], prefix, where)
        if not 0.0 <= obj.dropout < 1.0:
            raise ConfigError(f"{where}: {prefix}dropout: must be in [0, 1), got {obj.dropout}")
        bad = [t for t in obj.target_modules if t not in NEMO_LORA_TARGETS]
        if bad or not obj.target_modules:
            raise ConfigError(f"{where}: {prefix}target_modules: {bad or 'empty'}; allowed {list(NEMO_LORA_TARGETS)}")
        if obj.a_init_seed is not None and obj.a_init_seed < 0:
            raise ConfigError(f"{where}: {prefix}a_init_seed: must be >= 0 or null, got {obj.a_init_seed}")
    elif isinstance(obj, OptimConfig):
        _positive(obj, ["lr"], prefix, where)
        _positive(obj, ["min_lr", "warmup_steps", "weight_decay", "clip_grad"], prefix, where, allow_zero=True)
        if obj.min_lr > obj.lr:
            raise ConfigError(f"{where}: {prefix}min_lr: {obj.min_lr} is above lr {obj.lr}")
        if obj.scheduler != "cosine" and obj.min_lr > 0:
            raise ConfigError(f"{where}: {prefix}min_lr={obj.min_lr} is only supported with {prefix}scheduler=cosine "
                              f"(got {obj.scheduler})")
        for n in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(obj, n) < 1.0:
                raise ConfigError(f"{where}: {prefix}{n}: must be in [0, 1), got {getattr(obj, n)}")
    elif isinstance(obj, TrainConfig):
        _positive(obj, ["max_steps", "micro_batch_size", "global_batch_size", "seq_length", "log_every_n_steps",
                        "num_devices", "collective_timeout_min"], prefix, where)
        _positive(obj, ["val_check_interval", "limit_val_batches", "checkpoint_every_n_steps",
                        "warmup_steps_excluded"], prefix, where, allow_zero=True)
    elif isinstance(obj, ModelConfig):
        if obj.family not in families.names():
            raise ConfigError(f"{where}: {prefix}family: must be one of {families.names()}, got {obj.family!r}")
    elif isinstance(obj, DataConfig):
        _positive(obj, ["test_months", "val_months"], prefix, where)
    elif isinstance(obj, TrackingConfig):
        if obj.mlflow is not None:
            scheme = obj.mlflow.split(":", 1)[0].lower() if ":" in obj.mlflow else ""
            if scheme not in MLFLOW_SCHEMES or obj.mlflow.rstrip("/").lower() == f"{scheme}:":
                hint = (" (a sqlite: store needs the full mlflow package: serve it with `mlflow server "
                        "--backend-store-uri sqlite:///...` and give its http:// address)" if scheme == "sqlite"
                        else " (a local directory is file:PATH, e.g. file:./mlruns)" if scheme == "" else "")
                raise ConfigError(f"{where}: {prefix}mlflow: expected an MLflow tracking URI with scheme "
                                  f"{'/'.join(s + ':' for s in MLFLOW_SCHEMES)}, got {obj.mlflow!r}{hint}")
    elif isinstance(obj, ParallelConfig):
        _positive(obj, ["tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                        "num_nodes"], prefix, where)
    elif isinstance(obj, ExperimentConfig):
        t, p = obj.train, obj.parallel
        model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        if obj.world_size % model_parallel:
            raise ConfigError(f"{where}: world size {obj.world_size} (train.num_devices={t.num_devices} x "
                              f"parallel.num_nodes={p.num_nodes}) is not divisible by TP*PP*CP={model_parallel}")
        per_step = t.micro_batch_size * obj.data_parallel_size
        if t.global_batch_size % per_step:
            raise ConfigError(f"{where}: train.global_batch_size={t.global_batch_size} is not divisible by "
                              f"micro_batch_size*data_parallel={t.micro_batch_size}*{obj.data_parallel_size}")
        if obj.optim.warmup_steps > t.max_steps:
            raise ConfigError(f"{where}: optim.warmup_steps={obj.optim.warmup_steps} exceeds train.max_steps={t.max_steps}")


def check_runs_on_cpu(cfg: "ExperimentConfig") -> None:
    """The rules for a run without a GPU, for every backend: processes on this machine only (gloo;
    ``train.num_devices`` of them, e.g. under torchrun), fp32. ConfigError otherwise."""
    t, p = cfg.train, cfg.parallel
    if p.num_nodes != 1:
        raise ConfigError(f"parallel.num_nodes={p.num_nodes}: a CPU run uses processes on this machine "
                          "(set parallel.num_nodes=1; train.num_devices processes, gloo)")
    if t.precision != "fp32":
        raise ConfigError(f"train.precision={t.precision} needs a GPU; use train.precision=fp32 on CPU")
