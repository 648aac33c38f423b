"""ExperimentConfig -> a Megatron-Bridge ``ConfigContainer`` (Megatron-Bridge 0.3, NeMo 26.02; and 0.6), not run.

The same YAML that drives the NeMo 2.1 and HF backends, translated field by field in small functions, as
:mod:`recipes.nemo_recipe` does for ``llm.finetune``: :func:`model_provider` (the bridge's own translation
of the HF ``config.json``, ``AutoBridge.from_hf_pretrained(...).to_megatron_provider``, with the run's
sequence length and parallel layout), :func:`optimizer_config`, :func:`scheduler_config`,
:func:`dataset_config` (the prepared training/validation.jsonl read by the bridge's GPTSFTDataset with the
dataset settings of the NeMo backend: the same token ids, ``recipes.tokens.SFT_DATASET_KWARGS``),
:func:`peft_config`, :func:`checkpoint_config`; :func:`build_config` puts them together and
:func:`describe` is the ``--dry-run`` text.

On a CPU (``cpu=True``): gloo, fp32, the local (non-Transformer-Engine) layer spec and attention, every
fused kernel off, no distributed optimizer, synchronous checkpoints, ``num_workers=0``; the patches that
make the libraries run at all are :mod:`recipes.bridge_shim`'s.

Known differences from the NeMo 2.1 recipe (same config values, different formulas in the libraries):
Megatron's scheduler warms up as ``lr*s/warmup`` at step ``s`` (0-based; NeMo 2.1: ``lr*(s+1)/(warmup+1)``),
identical after warmup. The logged loss of a step with several micro-batches: NeMo 2.1 reports the mean of the
micro-batches' per-token means, the bridge the per-token mean of the whole global batch (measured: its step-1
loss with two micro-batches of 4 equals the one-micro-batch-of-8 value, NeMo's does not). LoRA's A is drawn by
each framework from its own RNG unless ``lora.a_init_seed`` sets the same one (``recipes.lora_init``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import families
from recipes.config import ExperimentConfig, LoraConfig, OptimConfig, TrainConfig, check_runs_on_cpu
from recipes.data import count_prepared
from recipes.tokens import SFT_DATASET_KWARGS

CHECKPOINT_SUBDIR = "bridge"  # checkpoints: <output_dir>/bridge/checkpoints/iter_0000010/
BASE_SUFFIX = "-megatron"  # the HF model saved once as a Megatron checkpoint by the bridge: <hf_path>-megatron
BRIDGE_PRECISION = {"fp32": None, "bf16-mixed": "bf16_mixed", "fp16-mixed": "fp16_mixed"}
# the config's scheduler -> megatron's OptimizerParamScheduler lr_decay_style (warmup is linear in all)
BRIDGE_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant"}
# settings the CPU needs on the model provider (fused kernels exist only as CUDA kernels)
CPU_MODEL_SETTINGS = dict(use_cpu_initialization=True, fp16=False, bf16=False, bias_activation_fusion=False,
                          masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
                          persist_layer_norm=False, bias_dropout_fusion=False, cross_entropy_loss_fusion=False)


def bridge_python() -> Path:
    """The Python of the bridge's environment: ``$FUNDCOMMENT_BRIDGE_PYTHON``, else this one when it has
    megatron.bridge (a NeMo 26.02 container), else ``.venv-bridge`` beside this checkout (``make bridge-install``).
    FileNotFoundError naming the way to build it."""
    import importlib.util
    import os
    import sys
    env = os.environ.get("FUNDCOMMENT_BRIDGE_PYTHON")
    if not env and importlib.util.find_spec("megatron") and importlib.util.find_spec("megatron.bridge"):
        return Path(sys.executable)  # this environment has the bridge (the image of Dockerfile.bridge)
    p = Path(env) if env else Path(__file__).resolve().parents[1] / ".venv-bridge" / "bin" / "python"
    if not p.exists():
        raise FileNotFoundError(f"{p}: the Megatron-Bridge environment is not installed; run `make bridge-install` "
                                "(or set FUNDCOMMENT_BRIDGE_PYTHON to a python that has megatron-bridge and this project)")
    return p


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir).absolute() / CHECKPOINT_SUBDIR / "checkpoints"


def default_base_path(hf_path: str | Path) -> Path:
    """Where the bridge keeps the HF model as a Megatron checkpoint (the base a LoRA run loads)."""
    p = Path(hf_path).absolute()
    return p.with_name(p.name + BASE_SUFFIX)


def model_provider(cfg: ExperimentConfig, cpu: bool):
    """The bridge's model provider for the HF dir (its own HF -> Megatron config translation), with the
    run's sequence length, parallel layout and precision; on a CPU fp32, the local spec, fusions off."""
    import torch
    from megatron.bridge import AutoBridge

    hf_config = Path(cfg.model.hf_path) / "config.json"
    if not hf_config.is_file():
        raise FileNotFoundError(f"{hf_config}: the bridge builds its model config from the HF dir; it is not there")
    families.for_hf(json.loads(hf_config.read_text(encoding="utf-8")), hf_config)  # a family this project knows
    dtype = torch.float32 if cpu or cfg.train.precision == "fp32" else (
        torch.bfloat16 if cfg.train.precision == "bf16-mixed" else torch.float16)
    bridge = AutoBridge.from_hf_pretrained(str(Path(cfg.model.hf_path).absolute()), torch_dtype=dtype)
    p = bridge.to_megatron_provider(load_weights=False)
    par = cfg.parallel
    p.seq_length = cfg.train.seq_length
    p.tensor_model_parallel_size = par.tensor_model_parallel_size
    p.pipeline_model_parallel_size = par.pipeline_model_parallel_size
    p.virtual_pipeline_model_parallel_size = par.virtual_pipeline_model_parallel_size
    p.context_parallel_size = par.context_parallel_size
    p.sequence_parallel = par.sequence_parallel
    if cfg.train.activation_checkpointing:  # HF gradient checkpointing = full recompute of every layer
        p.recompute_granularity, p.recompute_method, p.recompute_num_layers = "full", "uniform", 1
    if cpu:
        cpu_settings(p)
    return p


def cpu_settings(provider):
    """The model provider set for a CPU: fp32, the local (non-Transformer-Engine) layer spec and attention
    (the default spec is TE's: "NameError: name 'TESpecProvider' is not defined" without TE), fusions off."""
    import torch
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.core.transformer.enums import AttnBackend
    for k, v in CPU_MODEL_SETTINGS.items():
        setattr(provider, k, v)
    provider.params_dtype = provider.pipeline_dtype = provider.autocast_dtype = torch.float32
    provider.transformer_layer_spec = local_layer_spec
    provider.attention_backend = AttnBackend.local
    return provider


def optimizer_config(optim: OptimConfig, train: TrainConfig, use_distributed_optimizer: bool, cpu: bool):
    """megatron-core's OptimizerConfig: Adam(W) with the config's values (the NeMo recipe's fields)."""
    import torch
    from megatron.core.optimizer import OptimizerConfig

    bf16, fp16 = train.precision == "bf16-mixed", train.precision == "fp16-mixed"
    return OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=bf16 and not cpu, fp16=fp16 and not cpu,
        params_dtype=torch.float32 if cpu or not (bf16 or fp16) else (torch.bfloat16 if bf16 else torch.float16),
        use_distributed_optimizer=use_distributed_optimizer and not cpu)


def scheduler_config(optim: OptimConfig, train: TrainConfig):
    from megatron.bridge.training.config import SchedulerConfig
    return SchedulerConfig(lr_decay_style=BRIDGE_SCHEDULERS[optim.scheduler], lr_warmup_iters=optim.warmup_steps,
                           lr_decay_iters=train.max_steps, lr_warmup_init=0.0,
                           start_weight_decay=optim.weight_decay, end_weight_decay=optim.weight_decay,
                           weight_decay_incr_style="constant")


def dataset_config(cfg: ExperimentConfig, output_dir: str | Path, cpu: bool):
    """The prepared training/validation.jsonl through the bridge's FinetuningDatasetConfig (GPTSFTDataset,
    batches padded per global batch); index files under ``<output_dir>/data_index``, never the data dir."""
    from megatron.bridge.training.config import FinetuningDatasetConfig
    if cfg.train.packed_sequence:
        raise ValueError("train.packed_sequence=true is not supported by the bridge backend yet (the NeMo 2.1 "
                         "backend refuses it too); set train.packed_sequence=false")
    kwargs = dict(SFT_DATASET_KWARGS, index_mapping_dir=str(Path(output_dir).absolute() / "data_index"))
    # no packing: 0.3 names it packed_sequence_specs (default None), 0.6 offline_packing_specs (default None)
    return FinetuningDatasetConfig(
        dataset_root=str(Path(cfg.data.dataset_dir).absolute()), seq_length=cfg.train.seq_length,
        seed=cfg.train.seed, dataloader_type="batch",
        # NeMo 2.1's FineTuningDataModule asks for ceil(GBS x max_steps x 1.005) samples; GPTSFTDataset's shuffled
        # sample mapping depends on that number, so the same number gives the NeMo backend's data order
        max_train_samples=math.ceil(cfg.train.global_batch_size * cfg.train.max_steps * 1.005), num_workers=0 if cpu else 4, pin_memory=not cpu,
        persistent_workers=False, memmap_workers=1, do_validation=validates(cfg), do_test=False,
        dataset_kwargs=kwargs)


def validation_rows(cfg: ExperimentConfig) -> int:
    return count_prepared(Path(cfg.data.dataset_dir) / "validation.jsonl")


def validates(cfg: ExperimentConfig) -> bool:
    """Whether the bridge can validate: its batch sampler drops an incomplete global batch, so a validation
    file with fewer rows than ``train.global_batch_size`` gives an empty loader, and the bridge's
    ``cyclic_iter`` then loops forever at the first evaluation (measured: a hang, no error). Such a run
    trains without validation (the run's log says so)."""
    if not (Path(cfg.data.dataset_dir) / "validation.jsonl").is_file():
        return True  # not prepared yet (a dry run): the run decides once the data exists
    return validation_rows(cfg) >= cfg.train.global_batch_size


def eval_iters(cfg: ExperimentConfig) -> int:
    """Global batches per validation, NeMo's (``TrainConfig.validation_batches``): ``train.limit_val_batches``, at
    most the whole global batches that validation.jsonl holds. The bridge's validation iterator is cyclic and goes on from where the last validation
    stopped, so asked for more it would count rows twice (``recipes.bridge_backend.EvalOnce`` reads past the rest
    of a cycle, so each validation starts at the first row, as NeMo's). 0 where it cannot validate
    (:func:`validates`)."""
    if not validates(cfg):
        return 0
    rows = validation_rows(cfg)
    return cfg.train.validation_batches(rows) if rows else cfg.train.limit_val_batches  # no file yet: a dry run


def peft_config(method: str, lora: LoraConfig):
    """The bridge's LoRA (one A for the fused QKV and fc1, as NeMo 2) for method lora; None for full SFT."""
    if method != "lora":
        return None
    from megatron.bridge.peft.lora import LoRA
    return LoRA(target_modules=list(lora.target_modules), dim=lora.dim, alpha=lora.alpha, dropout=lora.dropout)


def checkpoint_config(cfg: ExperimentConfig, output_dir: str | Path, base: Optional[str | Path], cpu: bool):
    """Checkpoints every ``checkpoint_every_n_steps`` (0: at the end) in ``<output_dir>/bridge/checkpoints``;
    rerunning the same command loads the newest one (``load`` = ``save``). ``base``: the HF model as a
    Megatron checkpoint (:func:`default_base_path`), loaded before training starts."""
    from megatron.bridge.training.config import CheckpointConfig
    ckpt = str(checkpoint_dir(output_dir))
    return CheckpointConfig(
        save=ckpt, load=ckpt, save_interval=cfg.train.checkpoint_every_n_steps or cfg.train.max_steps,
        pretrained_checkpoint=None if base is None else str(base), ckpt_format="torch_dist",
        fully_parallel_save=not cpu, async_save=False, most_recent_k=2)


def build_config(cfg: ExperimentConfig, output_dir: str | Path, base: Optional[str | Path], cpu: bool):
    """The whole ConfigContainer the bridge's ``pretrain``/``finetune`` runs."""
    import torch
    from megatron.bridge.training.config import (ConfigContainer, DistributedDataParallelConfig, LoggerConfig,
                                                 RNGConfig, TokenizerConfig, TrainingConfig)
    from benchmarks.metrics import TB_DIR

    if cpu:
        check_runs_on_cpu(cfg)
    out = Path(output_dir).absolute()
    t = cfg.train
    model = model_provider(cfg, cpu)
    c = ConfigContainer(
        model=model,
        train=TrainingConfig(train_iters=t.max_steps, global_batch_size=t.global_batch_size,
                             micro_batch_size=t.micro_batch_size, eval_interval=t.val_check_interval or t.max_steps,
                             eval_iters=eval_iters(cfg), manual_gc=False),
        optimizer=optimizer_config(cfg.optim, t, cfg.parallel.use_distributed_optimizer, cpu),
        scheduler=scheduler_config(cfg.optim, t),
        ddp=DistributedDataParallelConfig(
            check_for_nan_in_grad=True, grad_reduce_in_fp32=not cpu and t.precision != "fp32",
            overlap_grad_reduce=False, overlap_param_gather=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer and not cpu),
        dataset=dataset_config(cfg, out, cpu),
        logger=LoggerConfig(log_interval=t.log_every_n_steps,
                            tensorboard_dir=str(out / TB_DIR) if cfg.tracking.tensorboard else None,
                            log_timers_to_tensorboard=False),
        tokenizer=TokenizerConfig(tokenizer_type="HuggingFaceTokenizer",
                                  tokenizer_model=str(Path(cfg.model.hf_path).absolute())),
        checkpoint=checkpoint_config(cfg, out, base, cpu),
        rng=RNGConfig(seed=t.seed),
        peft=peft_config(cfg.method, cfg.lora),
        mixed_precision=None if cpu else BRIDGE_PRECISION[t.precision],
    )
    if cpu:
        c.dist.distributed_backend = "gloo"
        c.optimizer.params_dtype = torch.float32
    return c


# ---------------------------------------------------------------------------------------------
# the bridge's own recipe for the same model, as the reference


# (label, attribute path in a ConfigContainer): what a production config is compared on; the parallel layout first
COMPARED = (
    ("tensor_model_parallel_size", "model.tensor_model_parallel_size"),
    ("pipeline_model_parallel_size", "model.pipeline_model_parallel_size"),
    ("virtual_pipeline_model_parallel_size", "model.virtual_pipeline_model_parallel_size"),
    ("context_parallel_size", "model.context_parallel_size"),
    ("sequence_parallel", "model.sequence_parallel"),
    ("lora dim", "peft.dim"), ("lora alpha", "peft.alpha"), ("lora dropout", "peft.dropout"),
    ("lora target_modules", "peft.target_modules"),
    ("lr", "optimizer.lr"), ("min_lr", "optimizer.min_lr"), ("weight_decay", "optimizer.weight_decay"),
    ("adam_beta1", "optimizer.adam_beta1"), ("adam_beta2", "optimizer.adam_beta2"), ("adam_eps", "optimizer.adam_eps"),
    ("clip_grad", "optimizer.clip_grad"), ("use_distributed_optimizer", "optimizer.use_distributed_optimizer"),
    ("lr_decay_style", "scheduler.lr_decay_style"), ("lr_warmup_iters", "scheduler.lr_warmup_iters"),
    ("train_iters", "train.train_iters"), ("global_batch_size", "train.global_batch_size"),
    ("micro_batch_size", "train.micro_batch_size"), ("eval_interval", "validation.eval_interval|train.eval_interval"),
    ("seq_length", "model.seq_length"), ("save_interval", "checkpoint.save_interval"), ("seed", "rng.seed"),
)
LAYOUT = COMPARED[:4]  # TP, PP, VPP, CP: how the model is cut over the GPUs (sequence parallel is listed as a value)


def _get(container, path: str):
    """The value at ``path``; ``a|b``: the first of them that is set (Megatron-Bridge 0.4+ moved
    ``train.eval_interval`` to ``validation.eval_interval``)."""
    if "|" in path:
        return next((v for v in (_get(container, p) for p in path.split("|")) if v is not None), None)
    node = container
    for part in path.split("."):
        node = getattr(node, part, None) if node is not None else None
    return list(node) if isinstance(node, tuple) else node


def _hf_dir_for(cfg: ExperimentConfig, tmp: Path) -> tuple[Path, str]:
    """The model's HF dir, or (not downloaded yet) a dir with the config.json of the architecture the config
    names (recipes.memory, from the family files): the bridge builds its provider from config.json alone."""
    from recipes.memory import resolve_architecture
    arch, where = resolve_architecture(cfg)
    hf = Path(cfg.model.hf_path)
    if (hf / "config.json").is_file():
        return hf, arch.key
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=1) + "\n", encoding="utf-8")
    return tmp, arch.key


def reference_recipe(cfg: ExperimentConfig, hf_dir: Path, arch_key: str):
    """(name, ConfigContainer) of the bridge's own recipe for this model and method: the first of the family
    file's ``bridge_recipes`` (0.3's ``*_finetune_config``, then 0.4+'s ``*_peft_config``/``*_sft_config``) that
    this Megatron-Bridge has; (None, None) when the family names none, (what was looked for, None) when this
    bridge has none of them. The recipe loads ``AutoBridge.from_hf_pretrained(<hub id>)``: it is pointed at
    ``hf_dir`` instead."""
    import importlib
    import unittest.mock
    from megatron.bridge import AutoBridge

    family = families.for_hf(json.loads((hf_dir / "config.json").read_text()), hf_dir / "config.json")
    candidates = family.bridge_recipes.get(arch_key, {}).get(cfg.method, ())
    if not candidates:
        return None, None
    missing = []
    for candidate in candidates:
        module, fn = candidate.function.split(":")
        try:
            recipe = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            missing.append(f"{candidate.function} ({type(e).__name__}: {e})")
            continue
        original = AutoBridge.from_hf_pretrained.__func__
        with unittest.mock.patch.object(AutoBridge, "from_hf_pretrained",
                                        classmethod(lambda cls, path, **kw: original(cls, str(hf_dir), **kw))):
            return candidate.label, recipe(**dict(candidate.kwargs))
    return "; ".join(missing), None


def compare_with_reference(cfg: ExperimentConfig, ours, ref) -> list[dict]:
    """One row per :data:`COMPARED` field: ours, the bridge recipe's, same or not."""
    rows = []
    for label, path in COMPARED:
        if path.startswith("peft.") and (ours.peft is None and ref.peft is None):
            continue
        a, b = _get(ours, path), _get(ref, path)
        same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9))
        rows.append({"field": label, "ours": a, "bridge_recipe": b, "same": bool(same), "layout": (label, path) in LAYOUT})
    return rows


def library_versions() -> dict[str, str]:
    """The Megatron-Bridge and megatron-core versions of this environment; empty without Megatron-Bridge (the
    main venv, which looks for a base checkpoint before a launch, has NeMo 2.1's megatron-core, not the bridge's:
    there only the source files are compared, and the bridge's own processes compare the versions)."""
    from importlib import metadata
    try:
        return {"megatron-bridge": metadata.version("megatron-bridge"),
                "megatron-core": metadata.version("megatron-core")}
    except metadata.PackageNotFoundError:
        return {}


def reference_report(cfg: ExperimentConfig, ours, hf_dir: Path, arch_key: str) -> tuple[str, dict]:
    name, ref = reference_recipe(cfg, hf_dir, arch_key)
    version = library_versions().get("megatron-bridge")
    if ref is None and name is None:
        return (f"# Megatron-Bridge {version} has no {cfg.method} recipe for {arch_key}: nothing to compare with",
                {"recipe": None, "architecture": arch_key})
    if ref is None:
        return (f"# Megatron-Bridge {version} has none of this model's recipes: {name}; nothing to compare with",
                {"recipe": None, "missing": name, "architecture": arch_key})
    rows = compare_with_reference(cfg, ours, ref)
    layout_same = all(r["same"] for r in rows if r["layout"])
    lines = [f"# the bridge's own recipe for this model: {name} ({arch_key}, Megatron-Bridge {version}); parallel layout "
             f"{'the same' if layout_same else 'DIFFERENT'}; where this config differs from it:",
             "# | field | this config | bridge recipe |", "# |---|---|---|"]
    lines += [f"# | {r['field']} | {r['ours']!r} | {r['bridge_recipe']!r} |" for r in rows if not r["same"]]
    return "\n".join(lines), {"recipe": name, "architecture": arch_key, "layout_same": layout_same, "rows": rows}


def describe(cfg: ExperimentConfig, output_dir: str | Path | None = None, cpu: bool = True,
             report: Optional[dict] = None) -> str:
    """``--dry-run``: the config as YAML, the resolved ConfigContainer (the bridge's own YAML dump) and, for a
    model the bridge has a finetune recipe of, where this config differs from that recipe. A model that is not
    downloaded yet is described from the architecture the config names (its config.json written to a temp
    dir). ``report``, when given, receives the comparison as data."""
    import contextlib
    import dataclasses
    import io
    import tempfile
    out = Path(output_dir or cfg.output_dir)
    with tempfile.TemporaryDirectory(prefix="bridge-dry-run-") as tmp:
        hf_dir, arch_key = _hf_dir_for(cfg, Path(tmp) / "hf")
        note = "" if hf_dir == Path(cfg.model.hf_path) else (
            f" ({cfg.model.hf_path} not downloaded: described from the {arch_key} architecture's config.json)")
        run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_path=str(hf_dir)))
        base = default_base_path(cfg.model.hf_path)
        c = build_config(run_cfg, out, base, cpu)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            c.print_yaml()
        text, data = reference_report(cfg, c, hf_dir, arch_key)
    if report is not None:
        report.update(data)
    return "\n".join([cfg.to_yaml(), f"# Megatron-Bridge ConfigContainer for {cfg.name} ({cfg.method}), "
                      f"{'CPU' if cpu else 'GPU'}; base checkpoint: {base}{note}", buf.getvalue(), text])
