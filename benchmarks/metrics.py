"""Per-step training metrics: the one owner of ``metrics.jsonl``.

Both backends write the same record per optimizer step through :class:`StepTimer` (the NeMo backend
from a Lightning callback, the HF backend from a TrainerCallback), so runs can be compared line by
line by the benchmark and the report. Fields (units in the name):

    step          optimizer step, 1-based
    loss          training loss of the step (mean over its tokens)
    lr            learning rate used in the step
    grad_norm     total L2 norm of the step's gradients before clipping (HF: the Trainer's grad_norm; NeMo:
                  what Megatron's optimizer step returns, logged by NeMo as grad_norm); null when not reported
    step_time_s   wall time from the end of the previous step to the end of this one (the first step:
                  from its start), so data loading and logging count, as a user sees throughput;
                  on CUDA the device is synchronised before the clock is read
    tokens        real (unpadded) tokens in the step's micro-batches, prompt + completion
    tokens_padded tokens including padding (what the GPU actually processed)
    loss_tokens   tokens that carry loss (completion + EOS)
    samples       sequences in the step
    time_s        seconds since the run started (for aligning with the resource sampler)
    backend       "nemo" or "hf"
    mono_s        ``time.perf_counter()`` at the step end: CLOCK_MONOTONIC on Linux, the same clock in
                  every process of a machine, so ``benchmarks.sampler`` samples (taken in another
                  process) can be placed on the steps
    cuda_max_allocated_bytes, cuda_max_reserved_bytes
                  torch.cuda peak memory during the step (peak stats are reset after each step);
                  null when CUDA is not in use
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

from recipes.fileio import write_text_atomic

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"  # TensorBoard event files of a run: <output_dir>/tb (recipes.config.TrackingConfig)
# What every backend sends to its tracker per optimizer step (TensorBoard tag "train/<name>"), from
# the same StepRecord as metrics.jsonl, so two runs overlay tag for tag: tracked_scalars().
# MLflow gets the same names (benchmarks.tracking).
TRACKED = ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "tokens", "loss_tokens", "samples")


@dataclass
class StepRecord:
    step: int
    loss: Optional[float]
    lr: Optional[float]
    step_time_s: float
    tokens: int
    tokens_padded: int
    loss_tokens: int
    samples: int
    time_s: float
    backend: str
    mono_s: Optional[float] = None
    grad_norm: Optional[float] = None
    cuda_max_allocated_bytes: Optional[int] = None
    cuda_max_reserved_bytes: Optional[int] = None


def _cuda_peak_memory() -> tuple[Optional[int], Optional[int]]:
    """(max allocated, max reserved) bytes since the last call, on the current CUDA device; (None, None)
    without CUDA. Resets the peak counters so each step reports its own peak."""
    try:
        import torch
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None, None
        alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        return int(alloc), int(reserved)
    except ImportError:  # pragma: no cover - torch is always installed here
        return None, None


def _sync() -> None:
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except ImportError:  # pragma: no cover - torch is always installed here
        pass


def global_rank() -> int:
    """This process's global rank: torch.distributed when initialised, else torchrun's RANK (0 alone)."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0"))


def all_reduce_sum(values: list, dtype, group=None) -> list:
    """``values`` summed over the ranks of ``group`` (the default group when None) with one all_reduce, as a
    list of Python numbers; a collective, so every rank of the group calls it. The tensor lives where the
    group's backend can reduce it: the current CUDA device for NCCL, the CPU otherwise (gloo)."""
    import torch
    import torch.distributed as dist
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
              else torch.device("cpu"))
    t = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


class StepTimer:
    """Times optimizer steps and appends one :class:`StepRecord` per step to ``metrics.jsonl``.

    Usage: ``begin()`` before a step, ``add_batch(...)`` for each micro-batch, ``end(step, loss, lr)``
    after the optimizer step. The file is line-buffered and flushed every step, so a killed run
    keeps every finished step.
    """

    def __init__(self, output_dir: str | Path, backend: str, resume_step: int = 0):
        """``resume_step``: the step of the checkpoint a resumed run starts from (0: a fresh run, the file is
        started anew). A resumed run keeps the records up to that step as written, drops the later ones (the
        killed run's steps that are trained again) and appends, so every step stands once."""
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        # One writer per run: with several processes (torchrun, DDP) only global rank 0 writes; the
        # others still time steps (their records are discarded). The counts are summed over the
        # data-parallel ranks at the end of each step (:attr:`count_group`), so a record holds the whole
        # global batch's tokens whatever the layout.
        self._f = None
        if global_rank() == 0:
            resumed = resume_step > 0 and self.path.is_file()
            if resumed:
                keep_records_through(self.path, resume_step)
            self._f = open(self.path, "a" if resumed else "w", encoding="utf-8", buffering=1)
        # the process group whose ranks see different data (None: all ranks; set to Megatron's
        # data-parallel group by the NeMo callback, where tensor/pipeline ranks share a micro-batch)
        self.count_group = None
        self._t_run = time.perf_counter()
        self._t_prev: Optional[float] = None  # clock at the end of the previous step
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.tokens = self.tokens_padded = self.loss_tokens = self.samples = 0

    def begin(self) -> None:
        """Mark the start of the first step (later steps are timed from the previous end)."""
        if self._t_prev is None:
            _sync()
            self._t_prev = time.perf_counter()

    def add_batch(self, *, tokens: int, tokens_padded: int, loss_tokens: int, samples: int) -> None:
        self.tokens += int(tokens)
        self.tokens_padded += int(tokens_padded)
        self.loss_tokens += int(loss_tokens)
        self.samples += int(samples)

    def _summed_counts(self) -> None:
        """Sum this step's counts over :attr:`count_group` (a collective: every rank calls end())."""
        try:
            import torch
            import torch.distributed as dist
        except ImportError:  # pragma: no cover
            return
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.count_group) == 1:
            return
        summed = all_reduce_sum([self.tokens, self.tokens_padded, self.loss_tokens, self.samples], torch.int64,
                                group=self.count_group)
        self.tokens, self.tokens_padded, self.loss_tokens, self.samples = (int(v) for v in summed)

    def end(self, step: int, loss: Optional[float], lr: Optional[float],
            grad_norm: Optional[float] = None) -> StepRecord:
        _sync()
        now = time.perf_counter()
        self._summed_counts()  # after the clock: the step's time is its own
        rec = StepRecord(step=int(step), loss=None if loss is None else float(loss),
                         lr=None if lr is None else float(lr),
                         step_time_s=now - (self._t_prev if self._t_prev is not None else now),
                         tokens=self.tokens, tokens_padded=self.tokens_padded, loss_tokens=self.loss_tokens,
                         samples=self.samples, time_s=now - self._t_run, backend=self.backend, mono_s=now,
                         grad_norm=None if grad_norm is None else float(grad_norm))
        rec.cuda_max_allocated_bytes, rec.cuda_max_reserved_bytes = _cuda_peak_memory()  # after the clock
        self.write(rec)
        self._t_prev = now
        self._reset_counts()
        return rec

    def write(self, rec: StepRecord) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(asdict(rec)) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()


def keep_records_through(path: Path, step: int) -> None:
    """Rewrite ``path`` (temp file + rename) with its records of steps <= ``step``. A line that is not JSON (the
    last one of a killed run, cut mid-write) is dropped with the steps after ``step``."""
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if line.strip() and json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_text_atomic(path, "".join(keep))


def tracked_scalars(rec: StepRecord) -> dict[str, float]:
    """The :data:`TRACKED` values of one step (``tokens_per_s``: real tokens over the step time; the
    CUDA peaks when measured, as ``cuda_max_allocated_bytes``/``cuda_max_reserved_bytes``)."""
    out = {"loss": rec.loss, "lr": rec.lr, "grad_norm": rec.grad_norm, "step_time_s": rec.step_time_s,
           "tokens_per_s": rec.tokens / rec.step_time_s if rec.step_time_s > 0 else None,
           "tokens": rec.tokens, "loss_tokens": rec.loss_tokens, "samples": rec.samples,
           "cuda_max_allocated_bytes": rec.cuda_max_allocated_bytes,
           "cuda_max_reserved_bytes": rec.cuda_max_reserved_bytes}
    return {k: float(v) for k, v in out.items() if v is not None}


def read_tensorboard(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in ``tb_dir`` -> ``[(step, value), ...]``, read with
    TensorBoard's own EventAccumulator (all events kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(tb_dir).is_dir():
        raise FileNotFoundError(f"{tb_dir}: no TensorBoard directory")
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def batch_token_counts(input_ids, labels, pad_mask) -> dict[str, int]:
    """Counts for one micro-batch. ``pad_mask`` is 1 for real tokens (an attention/loss mask)."""
    return {"tokens": int(pad_mask.sum()), "tokens_padded": int(input_ids.numel()),
            "loss_tokens": int((labels != -100).sum()), "samples": int(input_ids.shape[0])}


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl (or of the metrics.jsonl inside a run directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    out = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{i}: not JSON ({e.msg})") from None
    return out


def losses(records: Iterable[dict]) -> list[float]:
    return [r["loss"] for r in records if r.get("loss") is not None]
