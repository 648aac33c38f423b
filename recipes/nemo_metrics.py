"""``metrics.jsonl`` from a NeMo run: the Lightning callback and the per-micro-batch token counts."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.loggers import MLFlowLogger

from benchmarks.metrics import StepTimer, all_reduce_sum, tracked_scalars
from recipes.tokens import sft_batch_counts as micro_batch_counts  # noqa: F401 - the name the tests use


class IntStepMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with integer steps. NeMo logs its own ``step`` metric (MegatronStrategy's
    ``self.log("step", global_step)``), which Lightning's logger connector pops and passes on as the step: a
    float, which the MLflow client refuses ("'float' object cannot be interpreted as an integer")."""

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, None if step is None else int(step))


class MetricsCallback(Callback):
    """Writes ``metrics.jsonl`` (benchmarks.metrics.StepTimer, backend "nemo"): one record per optimizer
    step with the global step after it, reduced_train_loss, the lr the step used and token counts.

    The batch is only visible inside Megatron's forward-backward loop, so the counts come from the
    ``on_megatron_microbatch_start`` hook that MegatronStrategy forwards to trainer callbacks (one
    call per micro-batch; ``step.forward_only`` tells validation apart). On resume the records after
    the restored step are dropped and the file is appended to, so step numbers continue. A
    checkpoint save happens after a step's record is written, so its time lands in the next step's
    ``step_time_s`` (in the HF backend too: the Trainer logs a step before it saves). The same step's
    :func:`benchmarks.metrics.tracked_scalars` go to the trainer's loggers as ``train/<name>``; the grad
    norm is the ``grad_norm`` NeMo's MegatronStrategy logs from the optimizer step's return value. Each
    validation adds ``eval/loss``, defined as the HF backend's (:meth:`on_validation_epoch_end`).

    With ``lora_a_init_seed`` (``lora.a_init_seed``) the LoRA A matrices are set by ``recipes.lora_init`` at the
    start of a fresh run (the other backends' starting adapter).

    An MLflow logger among them (``tracking.mlflow``) gets the resolved config (``resolved_config.yaml``
    in the output dir) as ``section.key`` parameters at the start, the tag of the output dir's previous run
    (a resumed run: benchmarks.tracking.previous_run), and its run is written to ``mlflow_run.json``.
    """

    def __init__(self, output_dir: str, lora_a_init_seed: int | None = None, tensor_parallel_size: int = 1):
        self.output_dir = str(output_dir)
        self.lora_a_init_seed = lora_a_init_seed
        self.tensor_parallel_size = tensor_parallel_size
        self.timer = None
        self._lr = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.timer = StepTimer(self.output_dir, backend="nemo", resume_step=trainer.global_step)
        # lora.a_init_seed, on a fresh run only; NeMo 2.1's PEFT transform adds the adapters (and rebuilds the
        # optimizer) at the start of the first training epoch, after this hook: set them before the first batch
        self._a_init_pending = self.lora_a_init_seed is not None and trainer.global_step == 0
        from megatron.core import parallel_state
        if parallel_state.model_parallel_is_initialized():  # TP/PP ranks share micro-batches: sum over DP only
            self.timer.count_group = parallel_state.get_data_parallel_group()
        self._start_mlflow_runs(trainer)

    def _start_mlflow_runs(self, trainer) -> None:
        from benchmarks import tracking
        from benchmarks.metrics import global_rank

        resolved = Path(self.output_dir) / "resolved_config.yaml"
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and global_rank() == 0:
                if resolved.is_file():
                    logger.log_hyperparams(tracking.config_params_from_yaml(resolved))
                previous = tracking.previous_run(self.output_dir, logger._tracking_uri)
                if previous:
                    logger.experiment.set_tag(logger.run_id, tracking.PREVIOUS_RUN_TAG, previous)
                tracking.write_run_file(self.output_dir, logger._tracking_uri, logger._experiment_name,
                                        logger.experiment_id, logger.run_id, logger._run_name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if getattr(self, "_a_init_pending", False):
            from recipes.lora_init import apply_seeded_lora_a
            opt = trainer.optimizers[0] if trainer.optimizers else None
            n = apply_seeded_lora_a(pl_module, self.lora_a_init_seed, self.tensor_parallel_size,
                                    optimizer=getattr(opt, "mcore_optimizer", opt))
            print(f"nemo: lora.a_init_seed={self.lora_a_init_seed}: {n} LoRA A matrices set", flush=True)
            self._a_init_pending = False
        self.timer.begin()
        self._lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None

    def on_megatron_microbatch_start(self, step, batch, forward_callback) -> None:
        if self.timer is not None and not step.forward_only and batch.get("loss_mask") is not None:
            self.timer.add_batch(**micro_batch_counts(batch["tokens"], batch["loss_mask"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("reduced_train_loss")
        if loss is None and isinstance(outputs, dict):
            loss = outputs.get("loss")
        grad_norm = trainer.callback_metrics.get("grad_norm")
        rec = self.timer.end(trainer.global_step, None if loss is None else float(loss), self._lr,
                             None if grad_norm is None else float(grad_norm))
        metrics = {f"train/{k}": v for k, v in tracked_scalars(rec).items()}
        for logger in trainer.loggers:  # NeMoLogger's (TensorBoard when tracking.tensorboard); rank 0 only
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_losses = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and outputs is not None:
            self._val_losses.append(float(outputs))  # the global batch's mean of its micro-batches' token means

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """``eval/loss`` at the step just trained: the plain mean over the validation's global batches of their
        micro-batch means, i.e. the mean over all its micro-batches of their per-token means - the HF backend's
        ``eval/loss``. Not NeMo's ``val_loss``, Lightning's epoch mean weighted by a batch size it infers."""
        losses = getattr(self, "_val_losses", [])
        if trainer.sanity_checking or not losses:
            return
        loss = sum(losses) / len(losses)
        from megatron.core import parallel_state
        if parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
            import torch
            # only the last pipeline stage computes the loss (the others report 0): sum over the stages
            loss, = all_reduce_sum([loss], torch.float64, group=parallel_state.get_pipeline_model_parallel_group())
        for logger in trainer.loggers:  # rank 0 only
            logger.log_metrics({"eval/loss": loss}, step=trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.timer is not None:
            self.timer.close()

