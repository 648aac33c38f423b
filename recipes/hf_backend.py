"""Hugging Face baseline: ExperimentConfig -> TRL SFTTrainer (+ peft LoRA), same data and
hyperparameters as the NeMo backend.

What it does, in order (``HFRecipe.setup/train/cleanup``):
- loads the model (fp32 weights; LoRA under bf16-mixed: a bf16 frozen base, :func:`weights_dtype`) and the
  tokenizer from ``cfg.model.hf_path``; pad must differ from EOS
  (pad == eos masks the real end token, and a fine-tune that never learned to stop never stops);
- tokenises the prepared NeMo-format ``training.jsonl``/``validation.jsonl`` with
  :func:`recipes.tokens.tokenize_pair`, i.e. exactly the token ids NeMo's GPTSFTDataset builds:
  prompt (chat template already rendered) + completion + EOS, loss on the completion only;
- LoRA through ``peft.LoraConfig`` with the NeMo target names mapped to HF projections by the family;
- TRL ``SFTTrainer`` with every optimiser/schedule/precision knob set explicitly from the config
  (TRL/transformers defaults are never relied on: bf16 and gradient checkpointing stay off unless
  the config asks, also on CPU);
- one ``metrics.jsonl`` record per optimizer step (benchmarks.metrics), ``resolved_config.yaml``,
  and the adapter (``adapter/``) or full model (``model/``) in HF format;
- validation as NeMo does it: every ``train.val_check_interval`` steps (0: once, after the last), on the first
  ``train.limit_val_batches`` whole global batches of ``validation.jsonl`` in file order
  (:func:`validation_rows`); ``eval/loss`` is the mean over those micro-batches of each one's per-token mean
  loss, the number the NeMo and bridge callbacks log as ``eval/loss`` too (README, Environment notes);
- with ``train.checkpoint_every_n_steps`` > 0, Trainer checkpoints (weights, optimizer, scheduler, RNG and
  data position) every N steps in ``<output_dir>/hf/checkpoints/checkpoint-N``, the newest two kept; rerunning
  the same command resumes from the newest complete one, as the NeMo and bridge backends do (0: none, only the
  final adapter/model: a rerun starts again).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import families
from benchmarks.metrics import TB_DIR
from recipes.config import ConfigError, ExperimentConfig, check_runs_on_cpu
from recipes.fileio import write_text_atomic
from recipes.tokens import IGNORE_INDEX, tokenize_pair

# config scheduler -> transformers lr_scheduler_type
HF_SCHEDULERS = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}


def token_mean_loss_over_the_global_batch(trainer) -> bool:
    """Give every model the loss transformers gives Llama: the per-token mean over the whole global batch
    (sum over its micro-batches / their loss tokens). transformers 4.47.1 does that only for a model whose
    ``forward`` takes ``**kwargs`` (``num_items_in_batch`` reaches the loss); for one without
    (MistralForCausalLM) it trains on the mean of the micro-batch means and *reports* their sum
    (gradient_accumulation_steps times the loss). The same loss function as a ``compute_loss_func``
    restores the first, for training and reporting. Returns whether it was needed."""
    if trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None:
        return False
    from transformers.loss.loss_utils import ForCausalLMLoss

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        out = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)
        # the count is the global batch's (average_tokens_across_devices) and DDP averages the ranks'
        # gradients: scale back as transformers does for models that take the count themselves
        if trainer.args.average_tokens_across_devices:
            out = out * trainer.accelerator.num_processes
        return out
    trainer.compute_loss_func = loss
    return True


@contextmanager
def cpu_load_location(device):
    """Resuming on CPU with several processes (torchrun, gloo): transformers 4.47 loads the optimizer state with
    ``map_location=args.device``, ``torch.device("cpu", 0)`` there, which torch.load refuses ("don't know how to
    restore data location of torch.storage.UntypedStorage (tagged with cpu:0)", seen). Inside this block
    torch.load reads such a location as plain ``cpu``. Nothing changes on a GPU (``cuda:N``) or in one process."""
    import torch
    if device is None or device.type != "cpu" or device.index is None:
        yield
        return
    load = torch.load

    def cpu_load(*args, **kwargs):
        if kwargs.get("map_location") == device:
            kwargs["map_location"] = "cpu"
        return load(*args, **kwargs)
    torch.load = cpu_load
    try:
        yield
    finally:
        torch.load = load


def hf_lora_targets(targets, family: str) -> list[str]:
    """peft ``target_modules`` for NeMo LoRA targets: the family's HF projections (q/k/v for linear_qkv...)."""
    return families.get(family).hf_lora_modules(targets)


def hf_accumulation_steps(cfg: ExperimentConfig) -> int:
    """Micro-batches per optimizer step on each HF process. The HF baseline is data parallel only: every one of
    the ``train.num_devices * parallel.num_nodes`` processes (torchrun) is a data-parallel rank, whatever
    tensor/pipeline layout the config gives NeMo, so the global batch is the config's on both backends."""
    t, world = cfg.train, cfg.world_size
    if t.global_batch_size % (t.micro_batch_size * world):
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size*"
                          f"processes={t.micro_batch_size}*{world}: the HF backend runs every process as a "
                          "data-parallel rank")
    return t.global_batch_size // (t.micro_batch_size * world)


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Where the Trainer writes its ``checkpoint-N`` dirs (``train.checkpoint_every_n_steps``)."""
    return Path(output_dir) / "hf" / "checkpoints"


def last_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest complete Trainer checkpoint of a run, or None. Complete: it has ``trainer_state.json``, which
    the Trainer writes last (after the weights, optimizer, scheduler and RNG states), so a run killed while
    saving leaves a checkpoint this passes over."""
    found = [p for p in checkpoint_dir(output_dir).glob("checkpoint-*")
             if p.name.split("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-", 1)[1]), default=None)


def training_arguments(cfg: ExperimentConfig, output_dir: str | Path, use_cpu: bool) -> dict:
    """The SFTConfig keyword arguments for this experiment (tests compare them with NeMo's)."""
    o, t = cfg.optim, cfg.train
    sched_kwargs = {"min_lr": o.min_lr} if o.scheduler == "cosine" else {}
    every = t.checkpoint_every_n_steps
    saves = dict(save_strategy="steps", save_steps=every, save_total_limit=2) if every else dict(save_strategy="no")
    return dict(
        output_dir=str(checkpoint_dir(output_dir)),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=hf_accumulation_steps(cfg),
        learning_rate=o.lr,
        lr_scheduler_type=HF_SCHEDULERS[o.scheduler],
        lr_scheduler_kwargs=sched_kwargs,
        warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_epsilon=o.adam_eps,
        max_grad_norm=o.clip_grad if o.clip_grad > 0 else None,
        optim="adamw_torch",
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.precision == "bf16-mixed",
        fp16=t.precision == "fp16-mixed",
        gradient_checkpointing=t.activation_checkpointing,
        max_seq_length=t.seq_length,
        logging_steps=t.log_every_n_steps,
        eval_strategy="steps" if t.limit_val_batches else "no",  # HFRecipe.setup: "no" without a full batch
        eval_steps=t.val_check_interval or t.max_steps,
        **saves,  # the final adapter/model is saved explicitly (HFRecipe.train)
        report_to=["tensorboard"] if cfg.tracking.tensorboard else "none",
        logging_dir=str(Path(output_dir).absolute() / TB_DIR),
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        dataloader_drop_last=True,  # like NeMo's sampler: every step sees a full global batch
        # data parallel (torchrun): the per-token mean over the whole global batch, as in one process
        # (else each rank divides by its own tokens and DDP averages the ranks' means)
        average_tokens_across_devices=cfg.world_size > 1,
        ddp_timeout=t.collective_timeout_min * 60,  # seconds
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        disable_tqdm=False,
    )


def weights_dtype(cfg: ExperimentConfig):
    """The dtype the model's weights are loaded in. LoRA under bf16-mixed: bf16, the frozen base as the NeMo and
    bridge backends hold it (Megatron's bf16 parameters; the residual stream is bf16 too), with the adapters in
    fp32 (peft's ``autocast_adapter_dtype``) and the matmuls under ``torch.autocast``. In fp32 the frozen base
    would take twice the memory and be cast to bf16 again in every forward pass, which the speed and memory
    comparison would count against HF. Otherwise fp32: full SFT's weights are its master copy, run in bf16 by
    autocast (Megatron keeps an fp32 master beside its bf16 weights), and an fp32 run is fp32."""
    import torch
    if cfg.method == "lora" and cfg.train.precision == "bf16-mixed":
        return torch.bfloat16
    return torch.float32


def load_split(path: Path, tokenizer, seq_length: int, required: bool = True) -> list[dict]:
    """Token ids/labels of a prepared NeMo-format JSONL split (an error when it has none, unless not
    ``required``)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                tp = tokenize_pair(tokenizer, rec["input"], rec["output"], seq_length)
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{i}: not a prepared record ({e})") from None
            rows.append({"input_ids": tp.input_ids, "labels": tp.labels})
    if not rows and required:
        raise ValueError(f"{path}: no records")
    return rows


def validation_rows(cfg: ExperimentConfig, rows: list) -> list:
    """The validation rows NeMo evaluates, from the first at every validation: the first
    ``TrainConfig.validation_batches`` global batches. Empty when the split holds less than one."""
    return rows[:cfg.train.validation_batches(len(rows)) * cfg.train.global_batch_size]


class PadCollator:
    """Right-pads input_ids with the pad id, labels with IGNORE_INDEX; attention mask marks real tokens."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features):
        import torch
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _metrics_callback(timer):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Starts each step's clock and keeps the lr the step uses (the record is written by
        CountingSFTTrainer.log, where the loss arrives)."""

        lr = None

        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            timer.begin()
            if optimizer is not None:
                self.lr = optimizer.param_groups[0]["lr"]

    return MetricsCallback()


def _mlflow_callback(cfg: ExperimentConfig, output_dir: Path, mlflow: dict):
    """transformers' MLflowCallback (what ``report_to="mlflow"`` adds) for ``tracking.mlflow``, with the
    TensorBoard callback's metric names (``train/<name>``, transformers' own ``rewrite_logs``) so both
    trackers and both backends name a metric alike. Its set-up reads the URI and experiment from
    MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME (set for the call) and the run name from
    ``TrainingArguments.run_name``; it logs the TrainingArguments and model config as parameters, this adds
    the resolved config as ``section.key`` parameters, tags the run with the output dir's previous one
    (tracking.previous_run: a resumed run) and writes ``mlflow_run.json``."""
    from transformers.integrations import MLflowCallback
    from transformers.integrations.integration_utils import rewrite_logs

    from benchmarks import tracking

    class TrackedMLflowCallback(MLflowCallback):
        def setup(self, args, state, model):
            env = {tracking.URI_ENV: mlflow["uri"], "MLFLOW_EXPERIMENT_NAME": mlflow["experiment"]}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                self._ml_flow.set_tracking_uri(mlflow["uri"])  # an earlier run in this process may have set another
                super().setup(args, state, model)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            if state.is_world_process_zero:
                run = self._ml_flow.active_run()
                self._ml_flow.log_params(tracking.config_params(cfg.to_dict()))
                previous = tracking.previous_run(output_dir, mlflow["uri"])
                if previous:
                    self._ml_flow.set_tag(tracking.PREVIOUS_RUN_TAG, previous)
                tracking.write_run_file(output_dir, mlflow["uri"], mlflow["experiment"], run.info.experiment_id,
                                        run.info.run_id, run.info.run_name)

        def on_log(self, args, state, control, logs, model=None, **kwargs):
            super().on_log(args, state, control, rewrite_logs(logs), model=model, **kwargs)

    return TrackedMLflowCallback()


class HFRecipe:
    """LoRA or full SFT of an HF causal LM with TRL, from an ExperimentConfig."""

    def __init__(self, cfg: ExperimentConfig, output_dir: str | Path | None = None):
        self.cfg = cfg
        self.output_dir = Path(output_dir or cfg.output_dir)

    def setup(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from benchmarks.metrics import StepTimer, batch_token_counts, tracked_scalars

        cfg = self.cfg
        cuda = torch.cuda.is_available()
        if not cuda:
            check_runs_on_cpu(cfg)
        processes = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; 1 for a plain python -m
        if processes != cfg.world_size:
            raise ConfigError(f"train.num_devices*parallel.num_nodes={cfg.world_size} but this HF run has {processes} "
                              f"process(es): launch it with torchrun --nproc-per-node {cfg.train.num_devices} (the "
                              "global batch would be wrong otherwise), or set train.num_devices to match")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.output_dir / "resolved_config.yaml", cfg.to_yaml())

        self.tokenizer = tok = AutoTokenizer.from_pretrained(cfg.model.hf_path)
        if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
            raise ValueError(f"{cfg.model.hf_path}: tokenizer pad token must exist and differ from eos "
                             f"(pad={tok.pad_token!r}, eos={tok.eos_token!r})")
        torch.manual_seed(cfg.train.seed)
        model = AutoModelForCausalLM.from_pretrained(cfg.model.hf_path, torch_dtype=weights_dtype(cfg))

        data_dir = Path(cfg.data.dataset_dir)
        train_rows = load_split(data_dir / "training.jsonl", tok, cfg.train.seq_length)
        val_path = data_dir / "validation.jsonl"
        val_rows = None
        if cfg.train.limit_val_batches:
            all_val = load_split(val_path, tok, cfg.train.seq_length, required=False) if val_path.is_file() else []
            val_rows = validation_rows(cfg, all_val) or None
            if val_rows is None:
                print(f"hf: {val_path} has {len(all_val)} record(s), less than one global batch "
                      f"({cfg.train.global_batch_size}): no validation (as in NeMo and the bridge)", flush=True)

        peft_config = None
        if cfg.method == "lora":
            from peft import LoraConfig
            peft_config = LoraConfig(r=cfg.lora.dim, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                     target_modules=hf_lora_targets(cfg.lora.target_modules, cfg.model.family),
                                     bias="none", task_type="CAUSAL_LM")

        self.resume_from = last_checkpoint(self.output_dir)
        resume_step = 0
        if self.resume_from is not None:
            resume_step = int(json.loads((self.resume_from / "trainer_state.json").read_text())["global_step"])
            print(f"hf: resuming from {self.resume_from} (step {resume_step})", flush=True)
        self.timer = timer = StepTimer(self.output_dir, backend="hf", resume_step=resume_step)
        step_clock = _metrics_callback(timer)

        class CountingSFTTrainer(SFTTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                timer.add_batch(**batch_token_counts(inputs["input_ids"], inputs["labels"], inputs["attention_mask"]))
                return super().training_step(model, inputs, num_items_in_batch)

            def log(self, logs, *args, **kwargs):
                # one metrics.jsonl record per logged training step; its tracked_scalars join the
                # logs, so report_to's TensorBoard callback (and the MLflow one) write them as train/<name>
                if "loss" in logs:
                    rec = timer.end(self.state.global_step, logs["loss"], step_clock.lr, logs.get("grad_norm"))
                    logs = {**logs, **tracked_scalars(rec)}
                return super().log(logs, *args, **kwargs)

            def _load_optimizer_and_scheduler(self, checkpoint):
                with cpu_load_location(self.args.device):
                    return super()._load_optimizer_and_scheduler(checkpoint)

        from benchmarks import tracking
        callbacks = [step_clock]
        mlflow = tracking.settings(cfg.tracking, cfg.name, cfg.method, "hf")
        targs = training_arguments(cfg, self.output_dir, use_cpu=not cuda)
        if val_rows is None:
            targs["eval_strategy"] = "no"
        if mlflow:
            targs["run_name"] = mlflow["run_name"]
            callbacks.append(_mlflow_callback(cfg, self.output_dir.absolute(), mlflow))
        self.args = SFTConfig(**targs)
        self.trainer = CountingSFTTrainer(
            model=model, args=self.args, train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
            processing_class=tok, data_collator=PadCollator(tok.pad_token_id), peft_config=peft_config,
            callbacks=callbacks)
        token_mean_loss_over_the_global_batch(self.trainer)
        if cfg.method == "lora" and cfg.lora.a_init_seed is not None:  # the Megatron backends' starting adapter
            import families
            from recipes.lora_init import apply_seeded_lora_a_hf
            n = apply_seeded_lora_a_hf(self.trainer.model, cfg.lora.a_init_seed, families.get(cfg.model.family))
            print(f"hf: lora.a_init_seed={cfg.lora.a_init_seed}: {n} LoRA A matrices set", flush=True)

    def train(self) -> Path:
        self.trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        if self.cfg.method == "lora":
            out = self.output_dir / "adapter"
            self.trainer.model.save_pretrained(out)
        else:
            out = self.output_dir / "model"
            self.trainer.save_model(str(out))
            (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; resolved_config.yaml says it all
        self.tokenizer.save_pretrained(out)
        return out

    def cleanup(self) -> None:
        self.timer.close()


def run(cfg: ExperimentConfig, output_dir: str | Path | None = None) -> Path:
    recipe = HFRecipe(cfg, output_dir)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()
