"""Megatron-Bridge backend: run an ExperimentConfig with the bridge's training loop (0.3: NeMo 26.02's stack; 0.6).

    python -m recipes.finetune --config nemo_configs/tiny_lora.yaml --backend bridge   # re-runs itself here
    .venv-bridge/bin/python -m recipes.bridge_backend run --config nemo_configs/tiny_lora.yaml [key=value ...]
    .venv-bridge/bin/python -m recipes.bridge_backend import artifacts/models/tiny

It runs in its own environment (``.venv-bridge``, ``make bridge-install``: Megatron-Bridge 0.3.0,
megatron-core 0.16.0, transformers 4.57 — ``requirements/bridge.txt``; or today's line, ``.venv-bridge06``,
``make bridge06-install``: Megatron-Bridge 0.6.2, megatron-core 0.19.2, transformers 5.12, Python 3.12 —
``requirements/bridge06.txt``, chosen with ``FUNDCOMMENT_BRIDGE_PYTHON``), never in the NeMo 2.1 one. Where the
two lines differ the code asks the library (:func:`nemo_data_order`, :class:`SaveOnce`), not a version number.

- :func:`import_base` — the HF model as a Megatron checkpoint, written once by the bridge itself
  (``AutoBridge.save_megatron_model``) to ``<hf_path>-megatron`` (temp dir + rename; reused while the HF
  ``config.json`` and weights are unchanged). The user never converts anything: the HF dir is the input.
- :func:`run` — :func:`recipes.bridge_recipe.build_config` run by the bridge's ``pretrain`` with
  :class:`MetricsCallback` (``metrics.jsonl``, the fields of the other backends) and the bridge's
  ``forward_step`` behind :class:`CountingForwardStep` (token counts of each training micro-batch).
  Rerunning the same command resumes from the newest checkpoint in ``<output_dir>/bridge/checkpoints``.
- At the end of a LoRA run the adapter is exported by the bridge's own exporter
  (``AutoBridge.export_adapter_weights``, HF PEFT names) to ``<output_dir>/adapter`` as an HF PEFT adapter,
  and checked there against the bridge's LoRA model by logits (``adapter/verify.json``); a full SFT run
  leaves the HF model (``AutoBridge.save_hf_pretrained``) in ``<output_dir>/model``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import families  # noqa: E402
from benchmarks.metrics import StepTimer, all_reduce_sum, global_rank, tracked_scalars  # noqa: E402
from recipes import bridge_recipe  # noqa: E402
from recipes.bridge_shim import prepare_process  # noqa: E402
from recipes.cli import print_line  # noqa: E402
from recipes.config import ConfigError, ExperimentConfig, load_config  # noqa: E402
from recipes.fileio import made_by_rank_zero, write_text_atomic  # noqa: E402
from recipes.tokens import sft_batch_counts  # noqa: E402

IMPORT_MARKER = "bridge_import.json"  # written last into a finished base checkpoint
ADAPTER_DIR, MODEL_DIR = "adapter", "model"  # the HF backend's names for the same outputs


# ---------------------------------------------------------------------------------------------
# the base checkpoint


def _source_fingerprint(hf_path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(hf_path.glob("*.json")) + sorted(hf_path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


library_versions = bridge_recipe.library_versions  # the versions a base checkpoint records


def import_is_complete(hf_path: str | Path, base: str | Path) -> bool:
    """Whether ``base`` holds a finished import of ``hf_path``'s files as they are now, written by the Megatron-Bridge
    and megatron-core of this environment: another version's checkpoint is imported again, since it may not load
    (seen: megatron-core 0.16 refused 0.19's with "Common file .../iter_0000000/common.pt does not exist")."""
    marker = Path(base) / IMPORT_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
        written_by = info.get("versions", {})
        return (info["source"] == _source_fingerprint(Path(hf_path).absolute())
                and all(written_by.get(k) == v for k, v in library_versions().items()))
    except (ValueError, KeyError, AttributeError):
        return False


def _init_single_process():
    """torch.distributed (gloo on a CPU) and Megatron's parallel state for one process, for the import."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
        torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl",
                                             rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)


def import_base(hf_path: str | Path, base: Optional[str | Path] = None, overwrite: bool = False) -> Path:
    """The HF model dir as a Megatron (torch_dist) checkpoint written by the bridge; cached. Runs in a
    process of its own (``python -m recipes.bridge_backend import``): it initialises a one-process group."""
    import torch

    hf = Path(hf_path).absolute()
    if not (hf / "config.json").is_file():
        raise FileNotFoundError(f"{hf}/config.json: not a Hugging Face model dir")
    base = Path(base) if base else bridge_recipe.default_base_path(hf)
    if not overwrite and import_is_complete(hf, base):
        return base
    cpu = prepare_process()
    from megatron.bridge import AutoBridge
    t0 = time.perf_counter()
    bridge = AutoBridge.from_hf_pretrained(str(hf), torch_dtype=torch.float32 if cpu else torch.bfloat16)
    provider = bridge.to_megatron_provider(load_weights=True)
    if cpu:
        bridge_recipe.cpu_settings(provider)
    provider.tensor_model_parallel_size = provider.pipeline_model_parallel_size = 1
    provider.finalize()
    _init_single_process()
    models = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=cpu)
    tmp = base.with_name(base.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bridge.save_megatron_model(models, str(tmp), hf_tokenizer_path=str(hf))
    write_text_atomic(tmp / IMPORT_MARKER, json.dumps({"source": _source_fingerprint(hf), "hf_path": str(hf),
                                                       "versions": library_versions(),
                                                       "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
    if base.exists():
        shutil.rmtree(base)
    os.replace(tmp, base)
    return base


def ensure_base(hf_path: str | Path) -> Path:
    """The cached base checkpoint, made in a child process when missing (the child's process group and
    Megatron state must not leak into the training process). With several ranks, rank 0 makes it and the
    others wait for it."""
    import subprocess
    base = bridge_recipe.default_base_path(hf_path)
    if import_is_complete(hf_path, base):
        return base

    def make() -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
        subprocess.run([sys.executable, "-m", "recipes.bridge_backend", "import", str(hf_path)], check=True, env=env)
    made_by_rank_zero(make, lambda: import_is_complete(hf_path, base), f"{base} (the base checkpoint)",
                      rank=global_rank())
    return base


# ---------------------------------------------------------------------------------------------
# metrics


class CountingForwardStep:
    """The bridge's ``gpt_step.forward_step`` with each micro-batch's token counts handed to ``sink`` while
    :attr:`counting` is on (training steps only; the callback turns it on and off around a step), and, while
    :attr:`eval_losses` is a list (a validation), each micro-batch's per-token mean loss appended to it (on the
    last pipeline stage, where the loss function runs)."""

    def __init__(self, sink=None):
        self.sink = sink
        self.counting = False
        self.eval_losses: Optional[list[float]] = None

    def __call__(self, state, data_iterator, model, return_schedule_plan: bool = False):
        from megatron.bridge.training.gpt_step import forward_step
        if self.counting and self.sink is not None and data_iterator is not None:
            data_iterator = _Peek(data_iterator, self.sink)
        output, loss_function = forward_step(state, data_iterator, model, return_schedule_plan)
        if self.eval_losses is None:
            return output, loss_function
        losses = self.eval_losses

        def recorded(*args, **kwargs):
            out = loss_function(*args, **kwargs)  # (loss sum, tokens, {"lm loss": [sum, tokens]})
            total, tokens = (float(v) for v in out[2]["lm loss"])
            if tokens > 0:
                losses.append(total / tokens)
            return out
        return output, recorded


def mean_over_ranks(values: list[float]) -> Optional[float]:
    """The mean of every rank's ``values`` together (the world's micro-batches), None when there are none. A
    tensor-parallel group holds copies of one micro-batch's loss, which scale the sum and the count alike;
    ranks that are not the last pipeline stage add nothing."""
    total, n = float(sum(values)), len(values)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import torch
        total, n = all_reduce_sum([total, float(n)], torch.float64)
        n = int(n)
    return total / n if n else None


class _Peek:
    def __init__(self, it, sink):
        self._it, self._sink = it, sink

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        if isinstance(batch, dict) and batch.get("loss_mask") is not None:
            self._sink(sft_batch_counts(batch["tokens"], batch["loss_mask"]))
        return batch


def _callback_base():
    from megatron.bridge.training.callbacks import Callback
    return Callback


def make_callbacks(cfg: ExperimentConfig, output_dir: Path, forward: CountingForwardStep, bridge=None,
                   run_log=None, save_once: Optional[SaveOnce] = None):
    """[MetricsCallback, (ExportCallback)] as bridge Callback subclasses (the bridge is imported by now);
    ``run_log``: the MLflow run (benchmarks.tracking.StepRun) that gets each step's scalars, or None;
    ``save_once`` is told the step a resumed run starts from."""
    Callback = _callback_base()

    class MetricsCallback(Callback):
        """``metrics.jsonl`` (benchmarks.metrics.StepTimer, backend "bridge"): per optimizer step the step
        number after it, the reduced ``lm loss``, the lr the step used, the grad norm and the counts of the
        micro-batches it trained on (summed over the data-parallel ranks). On resume the records after the
        restored step are dropped and the file is appended to. The same scalars go to the bridge's
        TensorBoard writer as ``train/<name>`` (tracking.tensorboard) and to ``run_log`` (tracking.mlflow)."""

        def __init__(self):
            self.timer = None
            self._lr = None

        def on_train_start(self, context):
            step = context.state.train_state.step
            if save_once is not None:
                save_once.loaded(step)
            self.timer = StepTimer(output_dir, backend="bridge", resume_step=step)
            from megatron.core import parallel_state
            if parallel_state.model_parallel_is_initialized():
                self.timer.count_group = parallel_state.get_data_parallel_group()
            forward.sink = lambda counts: self.timer.add_batch(**counts)
            if cfg.method == "lora" and cfg.lora.a_init_seed is not None and step == 0:  # not on resume
                from recipes.lora_init import apply_seeded_lora_a
                n = apply_seeded_lora_a(context.model, cfg.lora.a_init_seed, cfg.parallel.tensor_model_parallel_size,
                                        optimizer=context.optimizer)
                print(f"bridge: lora.a_init_seed={cfg.lora.a_init_seed}: {n} LoRA A matrices set", flush=True)

        def on_train_step_start(self, context):
            self.timer.begin()
            self._lr = context.optimizer.param_groups[0]["lr"] if context.optimizer is not None else None
            forward.counting = True

        def on_train_step_end(self, context):
            forward.counting = False
            loss = (context.loss_dict or {}).get("lm loss")
            step = context.state.train_state.step + 1  # the bridge counts the step after this callback
            rec = self.timer.end(step, None if loss is None else float(loss), self._lr,
                                 None if context.grad_norm is None else float(context.grad_norm))
            tb = getattr(context.state, "tensorboard_logger", None)
            if tb is not None and rec is not None:
                for k, v in tracked_scalars(rec).items():
                    tb.add_scalar(f"train/{k}", v, step)
            if run_log is not None and rec is not None:
                run_log.log(step, tracked_scalars(rec))

        def on_eval_start(self, context):
            forward.eval_losses = []

        def on_eval_end(self, context):
            """``eval/loss`` at the step just trained, defined as the NeMo and HF backends' (the mean over the
            validation's micro-batches of their per-token means; the bridge's own ``lm loss validation`` is the
            per-token mean over all of them)."""
            losses, forward.eval_losses = forward.eval_losses or [], None
            loss = mean_over_ranks(losses)  # a collective: every rank is here
            step = context.state.train_state.step
            tb = getattr(context.state, "tensorboard_logger", None)
            if loss is not None and tb is not None:
                tb.add_scalar("eval/loss", loss, step)
            if loss is not None and run_log is not None:
                run_log.log(step, {"loss": loss}, prefix="eval/")

        def on_train_end(self, context):
            if self.timer is not None:
                self.timer.close()

    callbacks = [MetricsCallback()]
    if bridge is not None:
        class ExportCallback(Callback):
            def on_train_end(self, context):
                export_final(cfg, bridge, context.model, output_dir)
        callbacks.append(ExportCallback())
    return callbacks


class _OnceAfterLoop:
    """Megatron-Bridge 0.3's ``pretrain()`` does two things once more after its training loop, whatever the loop
    did at its last step: it saves a checkpoint and it validates. Each is skipped when this process already did
    it at that step. Every rank decides alike, from its own calls: nothing is read from disk, so no rank waits in
    a collective the others skip. Subclasses name the function (:attr:`attr`, imported by name into both the
    loop's module and ``pretrain``'s) and which of its calls count (:meth:`counts`)."""

    attr = ""
    what = ""

    def __init__(self):
        self.step: Optional[int] = None  # the last step this process did it at

    def counts(self, kwargs: dict) -> bool:
        return True

    def after_loop_call(self, state, args: tuple, kwargs: dict) -> None:
        """Called after each counted call in the loop."""

    def install(self) -> None:
        """Where ``pretrain``'s module has no such call (Megatron-Bridge 0.6 no longer saves after the loop), there
        is nothing to skip and nothing is replaced."""
        import megatron.bridge.training.pretrain as pretrain_mod
        import megatron.bridge.training.train as train_mod
        if not hasattr(pretrain_mod, self.attr):
            return
        in_loop, after_loop = getattr(train_mod, self.attr), getattr(pretrain_mod, self.attr)

        def done_by_loop(state, *a, **k):
            out = in_loop(state, *a, **k)
            if self.counts(k):
                self.step = state.train_state.step
                self.after_loop_call(state, a, k)
            return out

        def final(state, *a, **k):
            if self.counts(k) and self.step is not None and self.step == state.train_state.step:
                print(f"bridge: step {self.step}'s {self.what} is already done; not again", flush=True)
                return None
            return after_loop(state, *a, **k)

        setattr(train_mod, self.attr, done_by_loop)
        setattr(pretrain_mod, self.attr, final)


def nemo_data_order() -> None:
    """Megatron-Bridge 0.6's global-batch sampler reshuffles the samples every epoch by default; 0.3's, like NeMo
    2.1's, reads GPTSFTDataset's (already shuffled) sample mapping in order. Shuffled, the bridge trained on other
    samples than NeMo at every step (seen: 880 against 920 tokens at step 1 of tiny_lora) and validated on other
    rows. The sampler is made to keep the order where it has the switch; nothing changes on 0.3."""
    import inspect
    from megatron.bridge.data import samplers
    cls = samplers.MegatronPretrainingBatchSampler
    if "shuffle" not in inspect.signature(cls.__init__).parameters or getattr(cls, "in_order", False):
        return

    class InOrder(cls):
        in_order = True

        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "shuffle": False})

    samplers.MegatronPretrainingBatchSampler = InOrder


class SaveOnce(_OnceAfterLoop):
    """The checkpoint save after the loop: a run whose max_steps is a multiple of the checkpoint interval wrote its
    last checkpoint twice (seen here: "saving checkpoint at iteration 4" twice; for a 70B full SFT, weights and
    optimizer state, about a terabyte), and a finished run started again rewrote the one it had just loaded."""

    attr, what = "save_checkpoint", "checkpoint"

    def counts(self, kwargs: dict) -> bool:
        return not kwargs.get("non_persistent_ckpt")

    def loaded(self, step: int) -> None:
        """The run started from step ``step``'s checkpoint (step > 0)."""
        if step > 0:
            self.step = step


class EvalOnce(_OnceAfterLoop):
    """The validation after the loop: the loop validated at its last step already (``eval_interval`` is
    ``val_check_interval`` or ``max_steps``), so a run validated its last step twice (seen: ``eval/loss`` at steps
    1, 2, 2 for 2 steps validated after each). NeMo validates once. A test evaluation (``is_test``) is not skipped.

    Also makes every validation start at the first row, as NeMo's do: the bridge's validation iterator is cyclic
    and goes on where the last validation stopped, so after one that read ``eval_iters`` of the file's
    ``whole_batches`` global batches the rest of the cycle is read past (one ``next`` per global batch: the
    finetuning "batch" loader yields a rank's whole global batch), with no forward pass."""

    attr, what = "evaluate_and_print_results", "validation"

    def __init__(self, whole_batches: int = 0):
        super().__init__()
        self.whole_batches = whole_batches

    def counts(self, kwargs: dict) -> bool:
        return not kwargs.get("is_test")

    def after_loop_call(self, state, args: tuple, kwargs: dict) -> None:
        it = kwargs.get("data_iterator", args[2] if len(args) > 2 else None)
        rest = self.whole_batches - state.cfg.train.eval_iters
        if it is None or rest <= 0 or state.cfg.dataset.dataloader_type != "batch":
            return
        for _ in range(rest):
            next(it)


# ---------------------------------------------------------------------------------------------
# outputs


def _unwrap(m):
    while hasattr(m, "module"):
        m = m.module
    return m


def adapter_tensors(bridge, models) -> dict:
    """The LoRA weights under HF PEFT names from the bridge's ``export_adapter_weights`` (HF module names, the
    fused QKV/fc1 split by the bridge). A collective with several ranks: every rank calls it."""
    return {"base_model.model." + name: w.detach().float().contiguous().clone()
            for name, w in bridge.export_adapter_weights(models, cpu=True, show_progress=False)}


def write_peft_adapter(tensors: dict, lora, hf_path: str | Path, out: Path) -> Path:
    """``tensors`` (:func:`adapter_tensors`) as an HF PEFT adapter (adapter_config.json +
    adapter_model.safetensors), written to a temp dir and renamed."""
    import safetensors.torch as st
    targets = {name.split(".lora_")[0].split(".")[-1] for name in tensors}
    if not tensors:
        raise RuntimeError("the bridge exported no adapter weights: is this a LoRA model?")
    # the family registry says which HF modules these targets are (the NeMo exporter's names): the bridge's
    # split must give exactly those, or vLLM/NIM would load a different adapter than the one trained
    fam = families.for_hf(json.loads((Path(hf_path) / "config.json").read_text()), Path(hf_path) / "config.json")
    want = set(fam.hf_lora_modules(lora.target_modules))
    if targets != want:
        raise RuntimeError(f"the bridge exported LoRA modules {sorted(targets)}; family {fam.name} maps "
                           f"{list(lora.target_modules)} to {sorted(want)}")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    st.save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.dim, "lora_alpha": lora.alpha,
              "lora_dropout": 0.0, "bias": "none", "target_modules": sorted(targets),
              "base_model_name_or_path": str(Path(hf_path).absolute()), "fan_in_fan_out": False,
              "inference_mode": True, "use_rslora": False, "use_dora": False}
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def verify_adapter(models, hf_path: str | Path, adapter: Path, vocab: int, seed: int = 0) -> dict:
    """Logits of the bridge's LoRA model against HF + the written PEFT adapter on the same random ids
    (CPU fp32), and how far the adapter moved them from the base model's (it must change them)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = _unwrap(models[0])
    was_training = m.training
    m.eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 24), generator=g)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        mega = m(input_ids=ids, position_ids=pos, attention_mask=None)[..., :vocab].float()
        base = AutoModelForCausalLM.from_pretrained(str(hf_path), torch_dtype=torch.float32).eval()
        base_logits = base(ids).logits.float()
        peft_logits = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits.float()
    if was_training:
        m.train()
    return {"max_abs_diff": float((mega - peft_logits).abs().max()),
            "adapter_effect": float((peft_logits - base_logits).abs().max()),
            "argmax_agree": float((mega.argmax(-1) == peft_logits.argmax(-1)).float().mean())}


def _barrier() -> None:
    import torch
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def export_final(cfg: ExperimentConfig, bridge, models, output_dir: Path) -> None:
    """Every rank (the bridge's exporters gather over the model-parallel ranks); rank 0 writes. LoRA: the HF PEFT
    adapter, checked by logits against the bridge's LoRA model when the model is whole on rank 0 (TP = PP = 1);
    SFT: the full HF model (``save_hf_pretrained``)."""
    rank0 = global_rank() == 0
    if cfg.method == "lora":
        tensors = adapter_tensors(bridge, models)
        if rank0:
            out = write_peft_adapter(tensors, cfg.lora, cfg.model.hf_path, output_dir / ADAPTER_DIR)
            if cfg.parallel.tensor_model_parallel_size == cfg.parallel.pipeline_model_parallel_size == 1:
                hf = json.loads((Path(cfg.model.hf_path) / "config.json").read_text())
                report = verify_adapter(models, cfg.model.hf_path, out, int(hf["vocab_size"]))
                write_text_atomic(out / "verify.json", json.dumps(report, indent=2) + "\n")
                print(f"bridge: adapter {out}: logits vs the bridge's LoRA model max |diff| "
                      f"{report['max_abs_diff']:.2e}", flush=True)
    else:
        tmp, final = output_dir / (MODEL_DIR + ".tmp"), output_dir / MODEL_DIR
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        bridge.save_hf_pretrained(models, str(tmp))
        _barrier()
        if rank0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    _barrier()


# ---------------------------------------------------------------------------------------------
# run


def run(cfg: ExperimentConfig, output_dir: str | Path | None = None) -> Path:
    """Fine-tune with Megatron-Bridge in this process; returns the output dir. Rerunning the same command
    resumes from the newest checkpoint; a finished run rerun unchanged trains nothing."""
    import torch

    out = Path(output_dir or cfg.output_dir).absolute()
    cpu = prepare_process()
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.pretrain import pretrain
    base = ensure_base(cfg.model.hf_path)
    c = bridge_recipe.build_config(cfg, out, base, cpu)
    if not bridge_recipe.validates(cfg):
        print(f"bridge: no validation: {cfg.data.dataset_dir}/validation.jsonl has "
              f"{bridge_recipe.validation_rows(cfg)} rows, fewer than one global batch "
              f"({cfg.train.global_batch_size}); the bridge's loader would be empty", flush=True)
    run_log = None
    if global_rank() == 0:
        write_text_atomic(out / "resolved_config.yaml", cfg.to_yaml())
        c.to_yaml(str(out / "bridge_config.yaml"))
        run_log = start_mlflow_run(cfg, out)
    bridge = AutoBridge.from_hf_pretrained(str(Path(cfg.model.hf_path).absolute()),
                                           torch_dtype=torch.float32 if cpu else torch.bfloat16)
    forward = CountingForwardStep()
    nemo_data_order()
    save_once = SaveOnce()
    save_once.install()
    EvalOnce(bridge_recipe.validation_rows(cfg) // cfg.train.global_batch_size).install()
    try:
        pretrain(c, forward, callbacks=make_callbacks(cfg, out, forward, bridge, run_log, save_once))
    except BaseException:
        if run_log is not None:
            run_log.end("FAILED")
        raise
    if run_log is not None:
        run_log.end("FINISHED")
    return out


def start_mlflow_run(cfg: ExperimentConfig, out: Path):
    """``tracking.mlflow``: the run this process writes (benchmarks.tracking.StepRun; global rank 0 only), with
    the resolved config as ``section.key`` params; None when tracking.mlflow is not set. Not the bridge's own
    MLflow logger, which uploads every checkpoint as run artifacts (see StepRun)."""
    from benchmarks import tracking
    settings = tracking.settings(cfg.tracking, cfg.name, cfg.method, "bridge")
    if settings is None:
        return None
    run_log = tracking.StepRun(settings, out, tracking.config_params_from_yaml(out / "resolved_config.yaml"))
    print(f"bridge: mlflow run {settings['run_name']} ({run_log.run_id}) at {run_log.uri}", flush=True)
    return run_log


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.bridge_backend",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="fine-tune (what `recipes.finetune --backend bridge` runs)")
    r.add_argument("--config", required=True)
    r.add_argument("--output", help="output directory (overrides output_dir)")
    r.add_argument("--dry-run", action="store_true", help="print the resolved Megatron-Bridge config and exit")
    r.add_argument("overrides", nargs="*", metavar="key=value")
    imp = sub.add_parser("import", help="HF model dir -> Megatron checkpoint by the bridge (cached)")
    imp.add_argument("hf_path")
    imp.add_argument("--output", help="checkpoint dir (default: <hf_path>-megatron)")
    imp.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "import":
        try:
            print(json.dumps({"base": str(import_base(args.hf_path, args.output, overwrite=args.overwrite))}))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        cfg = load_config(args.config, args.overrides + ([f"output_dir={args.output}"] if args.output else []))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from recipes.bridge_shim import import_bridge, is_cpu
        import_bridge()
        print(bridge_recipe.describe(cfg, cpu=is_cpu() and not cfg.targets_gpu))
        return 0
    rank_env_from_slurm(os.environ)
    print_line(f"done: {run(cfg)}")
    return 0


def rank_env_from_slurm(environ) -> None:
    """A task of a Slurm job step (``recipes.finetune --backend bridge --executor slurm``: one task per device,
    no torchrun) has Slurm's rank variables only. The bridge falls back to them itself (``get_rank_safe``:
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the address from SLURM_NODELIST, a port from the job id); this
    module's work before torch.distributed starts (``global_rank`` reads RANK: the base checkpoint, the
    resolved config) must see the same rank, so RANK/WORLD_SIZE/LOCAL_RANK are set from them when torchrun's
    are not there."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return
    environ["RANK"], environ["WORLD_SIZE"] = environ["SLURM_PROCID"], environ["SLURM_NTASKS"]
    environ.setdefault("LOCAL_RANK", environ.get("SLURM_LOCALID", "0"))


if __name__ == "__main__":  # the guard matters: the torch_dist checkpoint writer may re-import __main__
    sys.exit(main())
