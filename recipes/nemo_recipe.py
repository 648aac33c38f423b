"""ExperimentConfig -> a NeMo-Run ``run.Partial`` of ``llm.finetune`` (NeMo 2.1), not run.

Torchtune-style: small functions, each taking only the config node it needs:
:func:`build_recipe` = ``run.Partial(llm.finetune, model=, data=, trainer=, log=, optim=, peft=, resume=)``
from :func:`model_config` (the family's translation of the HF config.json), :func:`data_config`,
:func:`trainer_config`, :func:`optim_config`, :func:`peft_config`, :func:`log_config`,
:func:`resume_config`; :func:`optimizer_settings` reads the resolved hyperparameters back (the tests
compare them field by field with ``recipes.hf_backend.training_arguments``); :func:`describe` is the
``--dry-run`` text; :func:`last_checkpoint` finds a run's newest finished checkpoint.

On a CPU (``cpu=True``) the recipe uses gloo, fp32, no fused kernels, ``num_workers=0``, synchronous
checkpointing and no distributed optimizer; the ``cpu`` flag chooses those settings, nothing else does.
Rules that do not depend on the backend (min_lr only with cosine, a GPU precision on a CPU, ...) are
checked by ``recipes.config`` before any backend starts.

Known differences from the HF baseline (same config values, different formulas in the libraries):
NeMo's warmup gives step ``s`` (0-based) ``lr*(s+1)/(warmup+1)`` where HF gives ``lr*s/warmup``
(identical after warmup); NeMo's training loss is the mean of the micro-batches' per-token means,
HF's is the per-token mean over the whole global batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from recipes.config import ExperimentConfig, check_runs_on_cpu, LoraConfig, ModelConfig, OptimConfig, ParallelConfig, TrackingConfig, TrainConfig
from recipes.cpu_shim import is_cpu
from recipes.nemo_import import default_nemo_path, family_of
from recipes.nemo_metrics import IntStepMLFlowLogger, MetricsCallback
from recipes.tokens import SFT_DATASET_KWARGS  # noqa: F401 - also the NeMo recipe's public name

# config precision -> MegatronMixedPrecision(precision=...)
NEMO_PRECISION = {"fp32": "32", "bf16-mixed": "bf16-mixed", "fp16-mixed": "16-mixed"}
# config scheduler -> nemo.lightning.pytorch.optim scheduler class (same shapes as HF_SCHEDULERS)
NEMO_SCHEDULERS = {"cosine": "CosineAnnealingScheduler", "linear": "WarmupAnnealingScheduler",
                   "constant": "WarmupPolicyScheduler"}
UNFINISHED = "-unfinished"  # nemo.lightning.pytorch.callbacks.ModelCheckpoint.UNFINISHED_CHECKPOINT_SUFFIX
CHECKPOINT_SUBDIR = "nemo"  # NeMoLogger name: checkpoints go to <output_dir>/nemo/checkpoints/


def model_config(model: ModelConfig, train: TrainConfig, cpu: bool):
    """run.Config of the family's NeMo model from its translation of the HF config.json (the one
    ``convert.hf_to_nemo`` writes), with the run's sequence length and, on CPU, fp32 with every fused
    kernel off. Megatron-core 0.10 has sliding-window attention only in Transformer Engine: on a CPU
    a window that covers ``train.seq_length`` is dropped (the same attention), a shorter one refused."""
    import nemo_run as run
    import torch

    fam, hf = family_of(model.hf_path, model.family)
    cls_name, kw = fam.nemo_config(hf, Path(model.hf_path) / "config.json")
    kw["seq_length"] = train.seq_length
    if train.activation_checkpointing:  # HF gradient checkpointing = full recompute of every layer
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if cpu:
        window = kw.get("window_size")
        if window and window[0] < train.seq_length:
            raise ValueError(f"{model.hf_path}/config.json: sliding window {window[0]} < train.seq_length="
                             f"{train.seq_length}; megatron-core 0.10 runs sliding-window attention only with "
                             "Transformer Engine (GPU). Use train.seq_length <= the window on a CPU")
        if window:
            kw["window_size"] = None  # every position sees the whole sequence either way
        kw.update(bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
                  bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
                  cross_entropy_loss_fusion=False, use_cpu_initialization=True,
                  params_dtype=torch.float32, bf16=False, fp16=False)
    else:  # a CUDA host without Transformer Engine / Apex (the offline smoke bundle) lacks some kernels
        from recipes.nemo_kernels import missing_gpu_kernels
        for name, why in missing_gpu_kernels().items():
            print(f"nemo: {name}=False on this host: {why}", flush=True)
            kw[name] = False
    return run.Config(fam.nemo_class(), config=run.Config(fam.nemo_class(cls_name), **kw))


def tokenizer_config(model: ModelConfig):
    """NeMo's AutoTokenizer over the HF dir (its eos/pad are the model's: <|im_end|>, <|endoftext|>)."""
    import nemo_run as run
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    return run.Config(AutoTokenizer, pretrained_model_name=str(Path(model.hf_path).absolute()), use_fast=True)


def data_config(cfg: ExperimentConfig, output_dir: str | Path, cpu: bool):
    """FineTuningDataModule over the prepared training/validation/test.jsonl. The memmap index files
    go under ``<output_dir>/data_index`` so the prepared dataset dir is never written to."""
    import nemo_run as run
    from nemo.collections import llm

    t = cfg.train
    if t.packed_sequence:
        # nemo 2.1.0 packs with packed_sequence.tokenize_dataset, which ignores dataset_kwargs and uses
        # the default prompt template '{input} {output}': a space after the assistant header.
        raise ValueError("train.packed_sequence=true is not supported with NeMo 2.1.0: its packing step tokenizes "
                         "with the default prompt template '{input} {output}' (ignoring dataset_kwargs), so the "
                         "token ids would differ from the chat-formatted pairs; set train.packed_sequence=false")
    kwargs = dict(SFT_DATASET_KWARGS, index_mapping_dir=str(Path(output_dir).absolute() / "data_index"))
    if cpu:  # default True: get_samples_mapping all-reduces a torch.cuda.LongTensor
        kwargs["sanity_check_dist_workers"] = False
    return run.Config(
        llm.FineTuningDataModule, dataset_root=str(Path(cfg.data.dataset_dir).absolute()), seq_length=t.seq_length,
        tokenizer=tokenizer_config(cfg.model), micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size, seed=t.seed, memmap_workers=1,
        num_workers=0 if cpu else 4, pin_memory=not cpu, persistent_workers=False, dataset_kwargs=kwargs)


def strategy_config(parallel: ParallelConfig, cpu: bool):
    import nemo_run as run
    import torch
    from nemo import lightning as nl

    # No timeout= here (train.collective_timeout_min is HF's only): NeMo 2.1 serializes the strategy's kwargs
    # into every checkpoint's context and refuses a timedelta ("Unserializable value 0:30:00 ... at
    # <root>.trainer.strategy.kwargs['timeout']"), so NeMo keeps torch's and megatron-core's 30 minutes.
    return run.Config(
        nl.MegatronStrategy, tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size, sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=torch.float32 if cpu else torch.bfloat16,
        # CPU: no async/parallel writer threads and no device-side loading (they assume CUDA).
        ckpt_async_save=not cpu, ckpt_parallel_save=not cpu, ckpt_parallel_load=not cpu,
        ckpt_load_directly_on_device=not cpu, ddp="megatron", gradient_as_bucket_view=True)


def trainer_config(cfg: ExperimentConfig, output_dir: str | Path, cpu: bool):
    import nemo_run as run
    from nemo import lightning as nl

    t = cfg.train
    if cpu:
        check_runs_on_cpu(cfg)
    return run.Config(
        nl.Trainer, accelerator="cpu" if cpu else "gpu", devices=t.num_devices, num_nodes=cfg.parallel.num_nodes,
        max_steps=t.max_steps, log_every_n_steps=t.log_every_n_steps,
        # 0 = validate once, at the end (ExperimentConfig.train.val_check_interval)
        val_check_interval=t.val_check_interval or t.max_steps, limit_val_batches=t.limit_val_batches,
        # count val_check_interval in global steps: a resumed run's epoch holds only the remaining batches
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0, accumulate_grad_batches=1, use_distributed_sampler=False,
        enable_progress_bar=False,
        logger=False,  # only NeMoLogger's loggers (tracking); Lightning's default would write ./lightning_logs
        strategy=strategy_config(cfg.parallel, cpu),
        plugins=run.Config(nl.MegatronMixedPrecision, precision=NEMO_PRECISION[t.precision]),
        callbacks=[run.Config(MetricsCallback, output_dir=str(Path(output_dir).absolute()),
                              lora_a_init_seed=cfg.lora.a_init_seed if cfg.method == "lora" else None,
                              tensor_parallel_size=cfg.parallel.tensor_model_parallel_size)])


def optim_config(optim: OptimConfig, train: TrainConfig, parallel: ParallelConfig, cpu: bool):
    """MegatronOptimizerModule: Adam(W) with the config's values and the scheduler of the same shape
    as the HF backend's (cosine to min_lr / linear to 0 / constant, each after linear warmup)."""
    import nemo_run as run
    import torch
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl
    from nemo.lightning.pytorch.optim import lr_scheduler as nemo_sched

    bf16, fp16 = train.precision == "bf16-mixed", train.precision == "fp16-mixed"
    opt = run.Config(
        OptimizerConfig, optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=bf16, fp16=fp16,
        params_dtype=torch.bfloat16 if bf16 else (torch.float16 if fp16 else torch.float32),
        use_distributed_optimizer=parallel.use_distributed_optimizer and not cpu)  # needs CUDA collectives
    sched_kw = dict(warmup_steps=optim.warmup_steps, max_steps=train.max_steps)
    if optim.scheduler == "cosine":
        # constant_steps defaults to 80000, which switches CosineAnnealing to Megatron's
        # "warmup, cosine, then hold min_lr" variant that reaches min_lr 80000 steps early.
        sched_kw.update(min_lr=optim.min_lr, constant_steps=0)
    sched = run.Config(getattr(nemo_sched, NEMO_SCHEDULERS[optim.scheduler]), **sched_kw)
    return run.Config(nl.MegatronOptimizerModule, config=opt, lr_scheduler=sched)


def peft_config(method: str, lora: LoraConfig):
    """llm.peft.LoRA for method lora; None (full SFT) otherwise."""
    if method != "lora":
        return None
    import nemo_run as run
    from nemo.collections import llm
    return run.Config(llm.peft.LoRA, dim=lora.dim, alpha=lora.alpha, dropout=lora.dropout,
                      target_modules=list(lora.target_modules))


def log_config(train: TrainConfig, output_dir: str | Path, tracking: TrackingConfig | None = None,
               mlflow: Optional[dict] = None):
    """Checkpoints under ``<output_dir>/nemo/checkpoints``: every ``checkpoint_every_n_steps`` (0: at
    the end only), keeping the newest two and a ``-last`` one that resume picks up. With
    ``tracking.tensorboard`` NeMo's logger gets Lightning's TensorBoardLogger writing to
    ``<output_dir>/tb`` (the HF backend's directory too), where MetricsCallback logs the shared
    per-step metrics beside NeMo's own (``reduced_train_loss``, ...). With ``mlflow``
    (:func:`benchmarks.tracking.settings` of ``tracking.mlflow``) it also gets Lightning's MLFlowLogger
    (``extra_loggers``; integer steps: recipes.nemo_metrics.IntStepMLFlowLogger), which receives the same
    metrics; MetricsCallback adds the config as parameters."""
    import nemo_run as run
    from lightning.pytorch.loggers import TensorBoardLogger
    from nemo import lightning as nl

    from benchmarks.metrics import TB_DIR

    every = train.checkpoint_every_n_steps or train.max_steps
    ckpt = run.Config(nl.ModelCheckpoint, every_n_train_steps=every, save_last="link", save_top_k=2,
                      monitor="step", mode="max", save_on_train_epoch_end=True,
                      save_optim_on_train_end=True, filename="{step}")
    tracking = tracking or TrackingConfig()
    tb = run.Config(TensorBoardLogger, save_dir=str(Path(output_dir).absolute() / TB_DIR), name="", version="",
                    default_hp_metric=False) if tracking.tensorboard else None
    # update_logger_directory=False: the TensorBoard dir is the one given, not moved under nemo/
    extra = [run.Config(IntStepMLFlowLogger, tracking_uri=mlflow["uri"], experiment_name=mlflow["experiment"],
                        run_name=mlflow["run_name"])] if mlflow else []
    return run.Config(nl.NeMoLogger, log_dir=str(Path(output_dir).absolute()), name=CHECKPOINT_SUBDIR,
                      use_datetime_version=False, ckpt=ckpt, tensorboard=tb, wandb=None, extra_loggers=extra,
                      update_logger_directory=False)


def resume_config(restore_path: str | Path):
    """Resume from this run's own last checkpoint when there is one, else start from the import."""
    import nemo_run as run
    from nemo import lightning as nl
    return run.Config(nl.AutoResume, restore_config=run.Config(nl.RestoreConfig, path=str(restore_path)),
                      resume_if_exists=True, resume_ignore_no_checkpoint=True)


def build_recipe(cfg: ExperimentConfig, output_dir: str | Path | None = None, nemo_path: str | Path | None = None,
                 cpu: Optional[bool] = None, with_model: bool = True):
    """``run.Partial(llm.finetune, ...)`` for this experiment (not run). ``nemo_path`` is the imported
    base checkpoint (default: :func:`default_nemo_path` of the HF dir); nothing is read from it here.
    ``with_model=False`` leaves the model out (for :func:`describe` before the model exists)."""
    import nemo_run as run
    from nemo.collections import llm

    from benchmarks.tracking import settings

    cpu = is_cpu() if cpu is None else cpu
    out = Path(output_dir or cfg.output_dir)
    restore = Path(nemo_path) if nemo_path else default_nemo_path(cfg.model.hf_path)
    parts = dict(data=data_config(cfg, out, cpu), trainer=trainer_config(cfg, out, cpu),
                 log=log_config(cfg.train, out, cfg.tracking, settings(cfg.tracking, cfg.name, cfg.method, "nemo")),
                 optim=optim_config(cfg.optim, cfg.train, cfg.parallel, cpu),
                 peft=peft_config(cfg.method, cfg.lora), resume=resume_config(restore))
    if with_model:
        parts["model"] = model_config(cfg.model, cfg.train, cpu)
    return run.Partial(llm.finetune, **parts)


def optimizer_settings(cfg: ExperimentConfig, cpu: bool = True) -> dict:
    """The hyperparameters the NeMo recipe resolves to, read back from the built run.Config objects
    (tests/test_nemo_backend.py maps the HF backend's SFTConfig values to the same names and compares
    them field by field)."""
    trainer = trainer_config(cfg, cfg.output_dir, cpu)
    optim = optim_config(cfg.optim, cfg.train, cfg.parallel, cpu)
    data = data_config(cfg, cfg.output_dir, cpu)
    peft = peft_config(cfg.method, cfg.lora)
    o, s = optim.config, optim.lr_scheduler
    sched = {v: k for k, v in NEMO_SCHEDULERS.items()}[s.__fn_or_cls__.__name__]
    dp = cfg.data_parallel_size
    out = dict(
        lr=o.lr, min_lr=getattr(s, "min_lr", 0.0), scheduler=sched, warmup_steps=s.warmup_steps,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, weight_decay=o.weight_decay,
        clip_grad=o.clip_grad, max_steps=trainer.max_steps, micro_batch_size=data.micro_batch_size,
        global_batch_size=data.global_batch_size,
        grad_accumulation_steps=data.global_batch_size // (data.micro_batch_size * dp),
        seq_length=data.seq_length, seed=data.seed,
        precision={v: k for k, v in NEMO_PRECISION.items()}[trainer.plugins.precision],
        bf16=o.bf16, fp16=o.fp16,
        activation_checkpointing=cfg.train.activation_checkpointing,  # -> recompute_granularity in model_config
    )
    if peft is not None:
        out.update(lora_dim=peft.dim, lora_alpha=peft.alpha, lora_dropout=peft.dropout,
                   lora_targets=list(peft.target_modules))
    return out


def describe(cfg: ExperimentConfig, output_dir: str | Path | None = None) -> str:
    """The resolved recipe as text for ``--dry-run``: the LoRA and optimizer values, then the printed
    run.Partial. Needs neither the model nor a GPU; when the HF dir does not exist yet the model
    section is left out and a comment says where it will come from. A config that asks for a GPU
    (bf16/fp16, several devices) is described as its GPU recipe even on a CPU machine."""
    cpu = is_cpu() and cfg.train.precision == "fp32" and cfg.world_size == 1
    out = Path(output_dir or cfg.output_dir)
    note = None
    try:
        recipe = build_recipe(cfg, out, cpu=cpu)
    except FileNotFoundError as e:
        recipe = build_recipe(cfg, out, cpu=cpu, with_model=False)
        note = f"# model: {cfg.model.family} config from {cfg.model.hf_path}/config.json at run time ({e})"
    s = optimizer_settings(cfg, cpu)
    keys = ("lr", "min_lr", "scheduler", "warmup_steps", "adam_beta1", "adam_beta2", "adam_eps", "weight_decay",
            "clip_grad", "max_steps", "micro_batch_size", "global_batch_size", "grad_accumulation_steps",
            "seq_length", "seed", "precision")
    where = "CPU (recipes.cpu_shim applied at run time)" if cpu else "GPU"
    lines = [f"# NeMo 2.1 recipe for {cfg.name} ({cfg.method}) on {where}",
             f"# base checkpoint: {default_nemo_path(cfg.model.hf_path)} (convert.hf_to_nemo of {cfg.model.hf_path})",
             "# optimizer: " + ", ".join(f"{k}={s[k]}" for k in keys),
             (f"# LoRA: dim={s['lora_dim']} alpha={s['lora_alpha']} dropout={s['lora_dropout']} "
              f"target_modules={','.join(s['lora_targets'])}") if cfg.method == "lora" else "# full SFT (no PEFT)"]
    if note:
        lines.append(note)
    lines.append(str(recipe))
    return "\n".join(lines)



# ---------------------------------------------------------------------------------------------
# running


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_SUBDIR / "checkpoints"


def checkpoint_step(path: str | Path) -> int:
    """The global step in a checkpoint dir name such as ``step=19-last``."""
    import re
    m = re.search(r"step=(\d+)", Path(path).name)
    if not m:
        raise ValueError(f"{path}: no step=N in the checkpoint name")
    return int(m.group(1))


def last_checkpoint(output_dir: str | Path) -> Path:
    """The newest finished checkpoint of a run (highest step; ``-last`` preferred on ties). One whose
    ``<name>-unfinished`` marker is still there (NeMo's ModelCheckpoint writes it before saving and removes it
    after; a run killed while saving leaves it) is not finished, whatever its directory holds."""
    d = checkpoint_dir(output_dir)
    ckpts = [p for p in d.glob("*step=*") if p.is_dir() and (p / "weights").is_dir() and (p / "context").is_dir()
             and not p.with_name(p.name + UNFINISHED).exists()]
    if not ckpts:
        raise FileNotFoundError(f"{d}: no finished checkpoint")
    return max(ckpts, key=lambda p: (checkpoint_step(p), p.name.endswith("-last")))

