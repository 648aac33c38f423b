"""Training-speed report of benchmark runs: ``report.md`` + PNGs + ``summary.json``.

    python -m benchmarks.report runs/bench/runs/nemo runs/bench/runs/hf [--output runs/bench] [--warmup 2]

Each RUN_DIR is a ``recipes.finetune`` output dir (resolved_config.yaml, metrics.jsonl; samples.jsonl
and bench_run.json when it ran under ``benchmarks.train_speed``). The runs must be comparable
(:func:`benchmarks.runs.compare_runs`: same resolved hyperparameters, data, model, GPUs);
otherwise the report is refused and the differences printed, unless ``--allow-mismatch``.

What the report shows, per backend, over the steps after the first ``train.warmup_steps_excluded``
(``--warmup`` overrides it):
- step time: median, p10, p90, mean (``step_time_s`` of metrics.jsonl: end of a step to the end of
  the next, data loading included, device synchronised), and per-step / box plots;
- the speed-up both ways, t_hf/t_nemo and (t_hf - t_nemo)/t_hf, from the medians, with a bootstrap
  95 % interval, and the tokens/s ratio (the backends order samples differently, so steps differ in
  tokens);
- tokens/s per device (real and padded), model TFLOP/s per device and MFU with the formula of
  :mod:`benchmarks.flops` (N from the run's HF config.json; GPU peak from the NVML device name;
  no MFU on a CPU);
- GPU utilisation and memory (CPU % and RSS without a GPU) over time, the training window shaded,
  and their means over the measured steps; torch.cuda peak allocated/reserved per step;
- loss curves overlaid, and each run's last ``eval/loss`` (its TensorBoard files); the published anchors (shared/reference/perf-anchors.md) beside our
  figures, with their conditions.
HF is drawn orange and NeMo green, as in the user's plots. CPU runs are labelled CPU everywhere.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks.flops import FlopsModel, flops_model, matmul_params, model_shape, peak_tflops
from benchmarks.runs import Run, RunsDiffer, compare_runs, load_run, run_data_fingerprint
from recipes.fileio import write_text_atomic

COLORS = {"hf": "tab:orange", "nemo": "tab:green", "bridge": "tab:purple"}
GIB = 2 ** 30

# shared/reference/perf-anchors.md, as data. "method": which of our runs it sits beside.
ANCHORS: tuple[dict, ...] = (
    {"source": "the user's measurement", "method": "lora", "kind": "speedup", "value": 44.0,
     "conditions": "DGX H100, Swallow 8B, NeMo 24.12 vs HF, matched hyperparameters",
     "figure": "step time ~44 % better (LoRA)"},
    {"source": "the user's measurement", "method": "sft", "kind": "speedup", "value": 35.0,
     "conditions": "DGX H100, Swallow 8B, NeMo 24.12 vs HF, matched hyperparameters",
     "figure": "step time ~35 % better (full SFT)"},
    {"source": "NeMo performance summary 24.07", "method": "lora", "kind": "throughput",
     "conditions": "DGX H100, FP8, SQuAD packed to 4096, Llama2-7B, 1 GPU",
     "figure": "24,824 tokens/s/GPU, 663 model TFLOP/s/GPU"},
    {"source": "NeMo performance summary 24.07", "method": "sft", "kind": "throughput",
     "conditions": "DGX H100, FP8, SQuAD packed to 4096, Llama2-7B",
     "figure": "16,891 tokens/s/GPU, 673 model TFLOP/s/GPU"},
    {"source": "NeMo performance summary 24.07", "method": "lora", "kind": "throughput",
     "conditions": "DGX H100, FP8, packed 4096, Llama2-70B, 8 GPUs TP2 PP4",
     "figure": "2,621 tokens/s/GPU, 722 model TFLOP/s/GPU"},
    {"source": "NeMo performance summary 24.07", "method": "sft", "kind": "throughput",
     "conditions": "DGX H100, FP8, packed 4096, Llama2-70B, 16 GPUs",
     "figure": "1,816 tokens/s/GPU, 749 model TFLOP/s/GPU"},
    {"source": "Megatron-Bridge 26.06", "method": "lora", "kind": "throughput",
     "conditions": "H100, FP8, seq 4096, GBS 32, Llama3-70B, 8 GPUs TP2 PP4 VP20",
     "figure": "2,643 tokens/s/GPU, 735 model TFLOP/s/GPU"},
    {"source": "Megatron-Bridge 26.06", "method": "sft", "kind": "throughput",
     "conditions": "H100, FP8, seq 4096, GBS 32, Llama3-70B, 32 GPUs TP4 PP4 VP5",
     "figure": "1,638 tokens/s/GPU, 710 model TFLOP/s/GPU"},
    {"source": "MLPerf Training v4.0 (NVIDIA)", "method": "lora", "kind": "time-to-train",
     "conditions": "Llama 2 70B LoRA r16, GovReport packed 8192, to eval loss 0.925, one DGX H100",
     "figure": "about 28 min"},
    {"source": "Unsloth claim / LLaMA-Factory measurement", "method": "lora", "kind": "speedup",
     "conditions": "LoRA vs HF+FA2; independent run on A100, LLaMA2-7B",
     "figure": "~2x claimed, 1.6x measured"},
)


# ---------------------------------------------------------------------------------------------
# statistics


def percentile(xs: list[float], q: float) -> float:
    """``numpy.percentile`` (linear interpolation, numpy's default), q in [0, 100]; nan for no values."""
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def median(xs: list[float]) -> float:
    return percentile(xs, 50.0)


def measured_records(metrics: list[dict], warmup: int) -> tuple[list[dict], Optional[str]]:
    """The records after the first ``warmup`` optimizer steps, and a note when none would be left
    (then every record is used, and the note says so)."""
    kept = [r for r in metrics if r["step"] > warmup]
    if kept:
        return kept, None
    return list(metrics), (f"only {len(metrics)} step record(s) and {warmup} warm-up step(s) to exclude: "
                           "statistics include the warm-up")


def per_step_times(metrics: list[dict]) -> list[tuple[int, float, int]]:
    """(step, seconds per optimizer step, optimizer steps in the record). A record covers
    ``step - previous step`` optimizer steps (more than one when log_every_n_steps > 1)."""
    out, prev = [], None
    for r in metrics:
        n = max(1, r["step"] - prev) if prev is not None else max(1, r["step"])  # steps are 1-based
        out.append((r["step"], r["step_time_s"] / n, n))
        prev = r["step"]
    return out


def bootstrap_ratio_ci(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> Optional[tuple[float, float]]:
    """95 % percentile-bootstrap interval of median(a)/median(b), resampling each run's steps."""
    if len(a) < 2 or len(b) < 2:
        return None
    import random
    rng = random.Random(seed)
    ratios = sorted(median(rng.choices(a, k=len(a))) / median(rng.choices(b, k=len(b))) for _ in range(n))
    return percentile(ratios, 2.5), percentile(ratios, 97.5)


def _window(run: Run, kept: list[dict]) -> Optional[tuple[float, float]]:
    """(start, end) of the measured steps in the sampler's time (seconds since it started)."""
    if run.samples is None or not kept or kept[0].get("mono_s") is None or "t_mono" not in run.samples["meta"]:
        return None
    t0 = run.samples["meta"]["t_mono"]
    idx = run.metrics.index(kept[0])
    start = run.metrics[idx - 1]["mono_s"] if idx > 0 else kept[0]["mono_s"] - kept[0]["step_time_s"]
    return start - t0, kept[-1]["mono_s"] - t0


def _gpus_in_use(samples: list[dict]) -> tuple[list[int], str]:
    """NVML indices to average over: those where NVML saw the trainer's processes, else all."""
    mine = sorted({g["index"] for s in samples for g in s["gpus"] if g.get("proc_mem_bytes")})
    if mine:
        return mine, "GPUs running the trainer's processes"
    return sorted({g["index"] for s in samples for g in s["gpus"]}), "all GPUs the sampler watched"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def resource_stats(run: Run, window: Optional[tuple[float, float]]) -> dict:
    """Means/peaks of the sampler's series over the measured steps (the whole run without a window)."""
    out: dict = {"has_samples": run.samples is not None}
    cuda_alloc = [r.get("cuda_max_allocated_bytes") for r in run.metrics if r.get("cuda_max_allocated_bytes")]
    cuda_res = [r.get("cuda_max_reserved_bytes") for r in run.metrics if r.get("cuda_max_reserved_bytes")]
    out["cuda_max_allocated_gib"] = max(cuda_alloc) / GIB if cuda_alloc else None
    out["cuda_max_reserved_gib"] = max(cuda_res) / GIB if cuda_res else None
    if run.samples is None:
        return out
    ss = run.samples["samples"]
    inside = [s for s in ss if window and window[0] <= s["t_s"] <= window[1]]
    out["window"] = "measured steps" if inside else "whole run (no sample fell inside the measured steps)"
    inside = inside or ss
    out["n_samples_window"] = len(inside)
    out["cpu_percent_mean"] = _mean([s["cpu_percent"] for s in inside])
    # cores busy with other processes (system-wide use minus the trainer's): contention on a shared machine
    ncpu = run.samples["meta"].get("cpu_count") or 1
    out["other_load_cores_mean"] = _mean([max(0.0, s["sys_cpu_percent"] * ncpu - s["cpu_percent"]) / 100
                                          for s in inside if s.get("sys_cpu_percent") is not None])
    out["rss_peak_gib"] = max((s["tree_rss_bytes"] for s in ss), default=0) / GIB
    gpus, which = _gpus_in_use(ss)
    out["gpus_used"], out["gpus_used_how"] = gpus, which
    if gpus:
        def per_sample(s, key, agg):
            vals = [g[key] for g in s["gpus"] if g["index"] in gpus and g.get(key) is not None]
            return agg(vals) if vals else None
        out["gpu_util_mean"] = _mean([per_sample(s, "util_percent", _mean) for s in inside])
        out["gpu_mem_used_peak_gib"] = max((per_sample(s, "mem_used_bytes", max) or 0) for s in ss) / GIB
        out["gpu_mem_used_mean_gib"] = (_mean([per_sample(s, "mem_used_bytes", _mean) for s in inside]) or 0) / GIB
        out["gpu_power_mean_w"] = _mean([per_sample(s, "power_w", _mean) for s in inside])
        out["gpu_sm_clock_mean_mhz"] = _mean([per_sample(s, "sm_clock_mhz", _mean) for s in inside])
    end = run.samples.get("end") or {}
    out["sampler"] = {k: end.get(k) for k in ("n_samples", "sampler_cpu_fraction", "sampler_ms_per_sample", "reason")}
    out["sampler"]["interval_s"] = run.samples["meta"]["interval_s"]
    return out


def hardware_of(runs: list[Run]) -> dict:
    """What the runs ran on: GPU names from their samples/bench_run.json, else this machine's NVML
    (labelled as an assumption)."""
    for r in runs:
        names = r.gpu_names()
        if names is not None:
            meta = r.samples["meta"] if r.samples else (r.info or {}).get("hardware", {})
            src = "samples.jsonl" if r.samples else "bench_run.json"
            return {"gpus": names, "cpu": meta.get("cpu_model"), "cpu_count": meta.get("cpu_count"),
                    "nvml_error": meta.get("nvml_error"), "source": f"recorded with the run ({r.path.name}/{src})"}
    from benchmarks.sampler import NvmlReader, _cpu_model
    nv = NvmlReader()
    names = [i["name"] for i in nv.info]
    nv.close()
    return {"gpus": names, "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "nvml_error": nv.error,
            "source": "assumed: the machine writing this report (the runs recorded no hardware)"}


def last_eval_loss(run: Run) -> Optional[tuple[int, float]]:
    """(step, value) of the run's last ``eval/loss`` in its TensorBoard files (every backend logs it at each
    validation, with one definition), or None: no event files, or no validation."""
    from benchmarks.metrics import TB_DIR, read_tensorboard
    try:
        events = read_tensorboard(run.path / TB_DIR).get("eval/loss")
    except (FileNotFoundError, ImportError):
        return None
    return (int(events[-1][0]), float(events[-1][1])) if events else None


def run_stats(run: Run, warmup: int, fm: Optional[FlopsModel], peak: Optional[tuple[float, str]],
              devices: int) -> dict:
    """Step-time statistics, throughput, FLOPs and resources of one run over its measured steps.

    Throughput per device = global tokens / time / ``devices`` (all GPUs, as the NeMo performance
    summary counts tokens/s/GPU). A metrics.jsonl written on one data-parallel rank counts only that
    rank's share of the global batch; its counts are scaled by global_batch_size / samples."""
    kept, note = measured_records(run.metrics, warmup)
    kept_steps = {r["step"] for r in kept}
    per_step = [(t, n) for (step, t, n) in per_step_times(run.metrics) if step in kept_steps]
    times = [t for t, _ in per_step]
    steps = sum(n for _, n in per_step)
    wall = sum(r["step_time_s"] for r in kept)
    gbs = run.config.get("train", {}).get("global_batch_size")
    samples = sum(r["samples"] for r in kept)
    scale = gbs * steps / samples if gbs and samples else 1.0
    if abs(scale - 1.0) > 1e-6:
        share = f"metrics count {samples / steps:g} of the global batch of {gbs} samples per step (one rank's share?): "
        note = (note + "; " if note else "") + share + f"tokens scaled by {scale:g}"
    tokens = scale * sum(r["tokens"] for r in kept)
    padded = scale * sum(r.get("tokens_padded", 0) for r in kept)
    losses = [r["loss"] for r in run.metrics if r.get("loss") is not None]
    s = {"backend": run.backend, "path": str(run.path), "records": len(run.metrics), "warmup": warmup,
         "measured_steps": steps, "note": note,
         "step_time_median_s": median(times), "step_time_p10_s": percentile(times, 10),
         "step_time_p90_s": percentile(times, 90), "step_time_mean_s": sum(times) / len(times),
         "step_times_s": times,
         "tokens_per_step": tokens / steps, "tokens_padded_per_step": padded / steps,
         "mean_seq_len": sum(r["tokens"] for r in kept) / samples if samples else None,
         "tokens_per_s_per_device": tokens / wall / devices, "padded_tokens_per_s_per_device": padded / wall / devices,
         "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
         "last_eval_loss": last_eval_loss(run)}
    if fm is not None:
        flops = scale * sum(fm.step_flops(r["tokens"], r["samples"]) for r in kept)
        s["model_tflops_per_device"] = flops / wall / devices / 1e12
        s["mfu"] = s["model_tflops_per_device"] / peak[0] if peak else None
    window = _window(run, kept)
    s["window_s"] = window
    s["resources"] = resource_stats(run, window)
    return s


def summarize(runs: list[Run], warmup: Optional[int] = None) -> dict:
    """Everything report.md shows, as data (also written as summary.json)."""
    cfg = runs[0].config
    k_cfg = {int(r.config.get("train", {}).get("warmup_steps_excluded", 1)) for r in runs}
    k = warmup if warmup is not None else max(k_cfg)
    devices = int(cfg.get("train", {}).get("num_devices", 1))
    hw = hardware_of(runs)
    cpu = not hw["gpus"]
    peak = None if cpu else peak_tflops(hw["gpus"][0])
    fm, flops_note, params = None, None, None
    hf_cfg = runs[0].hf_config()
    if hf_cfg is None:
        flops_note = f"model config.json not found (model.hf_path={cfg.get('model', {}).get('hf_path')}): no FLOPs"
    else:
        try:
            shape = model_shape(hf_cfg)
            lora = cfg.get("lora", {})
            fm = flops_model(shape, cfg["method"], int(lora.get("dim", 0)), lora.get("target_modules", ()))
            params = {**matmul_params(shape), "n_lora": fm.n_lora, "shape": shape.__dict__}
        except (ValueError, KeyError) as e:
            flops_note = f"cannot count FLOPs: {e}"
    stats = [run_stats(r, k, fm, peak, devices) for r in runs]
    out = {"hardware": hw, "cpu": cpu, "devices": devices, "warmup": k,
           "warmup_source": "--warmup" if warmup is not None else "train.warmup_steps_excluded",
           "peak_tflops": peak, "flops": fm.to_dict() if fm else None, "params": params, "flops_note": flops_note,
           "runs": stats, "config": cfg, "data": {r.backend: run_data_fingerprint(r)[1] for r in runs}}
    by = {s["backend"]: s for s in stats}
    if set(by) >= {"hf", "nemo"} and len(stats) == len(by):
        hf, nemo = by["hf"], by["nemo"]
        ratio = hf["step_time_median_s"] / nemo["step_time_median_s"]
        ci = bootstrap_ratio_ci(hf["step_times_s"], nemo["step_times_s"])
        out["speedup"] = {"t_hf_over_t_nemo": ratio, "ratio_ci95": ci,
                          "step_time_reduction": (hf["step_time_median_s"] - nemo["step_time_median_s"]) / hf["step_time_median_s"],
                          "reduction_ci95": None if ci is None else (1 - 1 / ci[0], 1 - 1 / ci[1]),
                          "throughput_ratio_nemo_over_hf": nemo["tokens_per_s_per_device"] / hf["tokens_per_s_per_device"]}
    if set(by) >= {"bridge", "nemo"} and len(stats) == len(by):
        out["bridge_vs_nemo"] = bridge_vs_nemo(by["nemo"], by["bridge"], next(r for r in runs if r.backend == "nemo"),
                                               next(r for r in runs if r.backend == "bridge"))
    return out


def bridge_vs_nemo(nemo: dict, bridge: dict, nemo_run, bridge_run) -> dict:
    """Megatron-Bridge 0.3 (megatron-core 0.16) against NeMo 2.1 (megatron-core 0.10), step by step: the speed
    ratio, and whether they trained on the same data (per-step token counts) with the same lr and loss."""
    ratio = nemo["step_time_median_s"] / bridge["step_time_median_s"]
    a = {r["step"]: r for r in nemo_run.metrics}
    b = {r["step"]: r for r in bridge_run.metrics}
    steps = sorted(set(a) & set(b))
    same_data = bool(steps) and all((a[s]["tokens"], a[s]["loss_tokens"]) == (b[s]["tokens"], b[s]["loss_tokens"])
                                    for s in steps)
    lr = [abs((a[s]["lr"] or 0.0) - (b[s]["lr"] or 0.0)) for s in steps]
    loss = [abs(a[s]["loss"] - b[s]["loss"]) for s in steps if a[s]["loss"] is not None and b[s]["loss"] is not None]
    return {"t_nemo_over_t_bridge": ratio, "ratio_ci95": bootstrap_ratio_ci(nemo["step_times_s"], bridge["step_times_s"]),
            "throughput_ratio_bridge_over_nemo": bridge["tokens_per_s_per_device"] / nemo["tokens_per_s_per_device"],
            "steps_compared": len(steps), "same_tokens_every_step": same_data,
            "lr_max_abs_diff": max(lr) if lr else None,
            "lr_differs_steps": [s for s, d in zip(steps, lr) if d > 1e-12],
            "loss_max_abs_diff": max(loss) if loss else None}


# ---------------------------------------------------------------------------------------------
# plots


def savefig_atomic(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_step_times(runs: list[Run], summary: dict, path: Path, label: str) -> None:
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110, gridspec_kw={"width_ratios": [2, 1]})
    k = summary["warmup"]
    for r, s in zip(runs, summary["runs"]):
        pts = per_step_times(r.metrics)
        c = COLORS.get(r.backend)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=c, label=r.backend)
        warm = [p for p in pts if p[0] <= k]
        if warm:
            ax.plot([p[0] for p in warm], [p[1] for p in warm], "o", ms=6, mfc="white", color=c)
    if k:
        ax.axvspan(0.5, k + 0.5, color="grey", alpha=0.15, label=f"warm-up (excluded, {k})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("seconds per step")
    ax.set_title(f"Step time per step ({label})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    data = [s["step_times_s"] for s in summary["runs"]]
    bp = bx.boxplot(data, whis=(10, 90), showfliers=True, patch_artist=True)
    bx.set_xticks(range(1, len(data) + 1), [s["backend"] for s in summary["runs"]])
    for patch, s in zip(bp["boxes"], summary["runs"]):
        patch.set_facecolor(COLORS.get(s["backend"], "tab:blue"))
        patch.set_alpha(0.6)
    bx.set_ylabel("seconds per step")
    bx.set_title("measured steps: median, IQR,\nwhiskers p10/p90", fontsize=9)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    savefig_atomic(fig, path)
    plt.close(fig)


def _series(run: Run, gpus: list[int], key: str, agg) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for s in run.samples["samples"]:
        vals = [g[key] for g in s["gpus"] if g["index"] in gpus and g.get(key) is not None]
        if vals:
            xs.append(s["t_s"])
            ys.append(agg(vals))
    return xs, ys


def plot_resources(runs: list[Run], summary: dict, out_dir: Path, label: str) -> list[str]:
    """utilization.png and memory.png (GPU util/memory, or CPU %/RSS without a GPU); the file names."""
    sampled = [(r, s) for r, s in zip(runs, summary["runs"]) if r.samples is not None]
    if not sampled:
        return []
    plt = _plt()
    cpu = summary["cpu"]
    written = []
    for name, ylabel, title in (
            ("utilization.png", "CPU % (100 = one core)" if cpu else "GPU utilization %",
             "CPU utilisation of the training process tree" if cpu else "GPU utilisation"),
            ("memory.png", "RSS GiB (process tree)" if cpu else "GPU memory used GiB",
             "Memory (RSS) of the training process tree" if cpu else "GPU memory used")):
        fig, ax = plt.subplots(figsize=(8, 3.5), dpi=110)
        for r, s in sampled:
            c = COLORS.get(r.backend)
            gpus = s["resources"].get("gpus_used") or []
            if cpu or not gpus:
                key = "cpu_percent" if name == "utilization.png" else "tree_rss_bytes"
                xs = [p["t_s"] for p in r.samples["samples"]]
                ys = [p[key] / (1 if key == "cpu_percent" else GIB) for p in r.samples["samples"]]
            elif name == "utilization.png":
                xs, ys = _series(r, gpus, "util_percent", lambda v: sum(v) / len(v))
            else:
                xs, ys = _series(r, gpus, "mem_used_bytes", lambda v: sum(v) / len(v) / GIB)
            suffix = "" if cpu or len(gpus) <= 1 else f" (mean of {len(gpus)} GPUs)"
            ax.plot(xs, ys, color=c, lw=1.2, label=r.backend + suffix)
            if s["window_s"]:
                ax.axvspan(*s["window_s"], color=c, alpha=0.12)
        if not cpu and name == "memory.png":
            tot = [g["memory_total_bytes"] for r, _ in sampled for g in r.samples["meta"]["gpus"]]
            if tot:
                ax.axhline(max(tot) / GIB, color="grey", ls="--", lw=0.8, label="GPU memory total")
        ax.set_xlabel("seconds since the trainer process started (shaded: measured steps)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({label})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        savefig_atomic(fig, out_dir / name)
        plt.close(fig)
        written.append(name)
    return written


def plot_loss(runs: list[Run], path: Path, label: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for r in runs:
        pts = [(m["step"], m["loss"]) for m in r.metrics if m.get("loss") is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=r.backend, color=COLORS.get(r.backend))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Training loss ({label})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    savefig_atomic(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# markdown


def _f(x, fmt=".3f", none="–"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pct(x, none="–"):
    if x is None:
        return none
    return f"{100 * x:.1f} %" if abs(100 * x) >= 1 else f"{100 * x:.2g} %"  # tiny CPU-size MFUs stay visible


def _gpu_list(names: list[str]) -> str:
    """'8x NVIDIA H100 80GB HBM3' rather than the name eight times."""
    from collections import Counter
    return ", ".join(f"{n}x {name}" if n > 1 else name for name, n in Counter(names).items())


def render_markdown(summary: dict, plots: list[str], diff_notes: list[str], run_notes: list[str]) -> str:
    cfg, hw, cpu = summary["config"], summary["hardware"], summary["cpu"]
    t, k = cfg.get("train", {}), summary["warmup"]
    dev = "CPU process" if cpu else "GPU"
    L = [f"# Training benchmark ({'CPU' if cpu else 'GPU'}): {cfg.get('name')} — " + " vs ".join(
        s["backend"] for s in summary["runs"]), ""]
    if cpu:
        L += ["> **CPU run.** These numbers show that the harness measures; they say nothing about GPU speed. "
              "No MFU on a CPU (no meaningful peak). \"Per device\" means per CPU training process.", ""]
    L += [f"- Hardware: {_gpu_list(hw['gpus']) if hw['gpus'] else 'no GPU'}; CPU {hw.get('cpu')} "
          f"({hw.get('cpu_count')} cores) — {hw['source']}."]
    if not hw["gpus"] and hw.get("nvml_error"):
        L.append(f"- NVML: {hw['nvml_error']} → GPU metrics not recorded; CPU % and RSS only.")
    lora = cfg.get("lora", {})
    L += [f"- Config: method **{cfg.get('method')}**"
          + (f" (r={lora.get('dim')}, alpha={lora.get('alpha')}, {', '.join(lora.get('target_modules', []))})"
             if cfg.get("method") == "lora" else "")
          + f", model `{cfg.get('model', {}).get('hf_path')}`, {t.get('max_steps')} steps, "
          f"global batch {t.get('global_batch_size')}, micro batch {t.get('micro_batch_size')}, seq {t.get('seq_length')}, "
          f"precision {t.get('precision')}, {summary['devices']} device(s), "
          f"activation checkpointing {t.get('activation_checkpointing')}.",
          f"- Statistics exclude the first **{k}** step(s) (warm-up; from {summary['warmup_source']}).",
          "- Comparability: " + ("a single run, nothing to compare." if len(summary["runs"]) < 2 else
                                 "identical resolved hyperparameters (ignoring output_dir, name, "
                                 "warmup_steps_excluded), data and model." if not diff_notes else
                                 "**NOT comparable** (report forced with --allow-mismatch): " + "; ".join(diff_notes)),
          "- Data fingerprint: " + ", ".join(f"{b}: {w}" for b, w in summary["data"].items()) + "."]
    L += [f"- Note: {n}" for n in run_notes]
    L += ["", "## Step time", "", "![step time](step_time.png)", "",
          f"| backend | measured steps | median s | p10 s | p90 s | mean s | tokens/step (real / padded) | "
          f"tokens/s/{dev} | padded tokens/s/{dev} | model TFLOP/s/{dev} | MFU |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary["runs"]:
        L.append(f"| {s['backend']} | {s['measured_steps']} | {_f(s['step_time_median_s'], '.4f')} | "
                 f"{_f(s['step_time_p10_s'], '.4f')} | {_f(s['step_time_p90_s'], '.4f')} | {_f(s['step_time_mean_s'], '.4f')} | "
                 f"{s['tokens_per_step']:.0f} / {s['tokens_padded_per_step']:.0f} | {s['tokens_per_s_per_device']:,.0f} | "
                 f"{s['padded_tokens_per_s_per_device']:,.0f} | {_f(s.get('model_tflops_per_device'), '.4g')} | "
                 f"{'n/a (CPU)' if cpu else '–' if s.get('model_tflops_per_device') is None else _pct(s.get('mfu'), 'n/a (unknown peak)')} |")
        if s["note"]:
            L.append(f"\n> {s['backend']}: {s['note']}\n")
    sp = summary.get("speedup")
    L += ["", "## Speed-up of NeMo over HF", ""]
    if sp:
        ci, rci = sp["ratio_ci95"], sp["reduction_ci95"]
        L += ["Both readings of \"x % faster\", from the median step times:", "",
              "| measure | value | bootstrap 95 % interval |", "|---|---|---|",
              f"| t_hf / t_nemo | **{sp['t_hf_over_t_nemo']:.3f}x** | "
              + (f"{ci[0]:.3f} to {ci[1]:.3f} |" if ci else "too few steps |"),
              f"| step-time reduction (t_hf − t_nemo) / t_hf | **{100 * sp['step_time_reduction']:.1f} %** | "
              + (f"{100 * rci[0]:.1f} % to {100 * rci[1]:.1f} % |" if rci else "too few steps |"),
              f"| tokens/s ratio nemo / hf | {sp['throughput_ratio_nemo_over_hf']:.3f}x | – |", "",
              "The backends draw samples in different orders, so a step's token count differs between them; "
              "the tokens/s ratio corrects for that."]
    else:
        L.append("Needs exactly one `hf` and one `nemo` run.")
    bv = summary.get("bridge_vs_nemo")
    if bv:
        ci = bv["ratio_ci95"]
        L += ["", "## Megatron-Bridge against NeMo 2.1", "",
              "Both run Megatron-Core (NeMo 2.1: megatron-core 0.10 under Lightning; Megatron-Bridge 0.3: megatron-core "
              "0.16 under the bridge's own loop), on the same prepared data in the same sample order.", "",
              "| measure | value |", "|---|---|",
              f"| t_nemo / t_bridge (median step) | **{bv['t_nemo_over_t_bridge']:.3f}x** "
              + (f"(bootstrap 95 %: {ci[0]:.3f} to {ci[1]:.3f}) |" if ci else "(too few steps for an interval) |"),
              f"| tokens/s ratio bridge / nemo | {bv['throughput_ratio_bridge_over_nemo']:.3f}x |",
              f"| same tokens and loss tokens at every step | {'yes' if bv['same_tokens_every_step'] else 'NO'} "
              f"({bv['steps_compared']} steps) |",
              f"| max \\|Δlr\\| | {_f(bv['lr_max_abs_diff'], '.3g')} (steps {bv['lr_differs_steps'] or 'none'}) |",
              f"| max \\|Δloss\\| | {_f(bv['loss_max_abs_diff'], '.3g')} |", "",
              "Which differences are the frameworks': the warmup formula (Megatron's scheduler gives step s "
              "lr·s/warmup, NeMo 2.1's lr·(s+1)/(warmup+1): the lr rows above), LoRA's random A initialisation "
              "(each framework draws its own unless `lora.a_init_seed` is set), and the logged loss of a step with "
              "several micro-batches (NeMo 2.1: the mean of the micro-batches' per-token means; the bridge: the "
              "per-token mean of the global batch). With no warmup, one micro-batch per step and, for LoRA, "
              "`lora.a_init_seed`, the two give the same loss at every step (tests/test_bridge.py); any remaining "
              "speed difference is the frameworks' (loop, megatron-core version, kernels)."]
        if not bv["same_tokens_every_step"]:
            L.append("\n> The two runs did not see the same tokens at every step: the loss rows compare different data.\n")
    L += ["", "## Published anchors (beside ours)", "",
          "From shared/reference/perf-anchors.md. Different hardware, model, precision and packing: context, "
          "not targets" + (" — and ours is a CPU run." if cpu else "."), "",
          "| source | conditions | published | ours |", "|---|---|---|---|"]
    method = cfg.get("method")
    for a in ANCHORS:
        if a["method"] != method:
            continue
        ours = "–"
        if a["kind"] == "speedup" and sp and a["source"] == "the user's measurement":
            v = a["value"] / 100
            ours = (f"t_hf/t_nemo {sp['t_hf_over_t_nemo']:.2f}x, reduction {100 * sp['step_time_reduction']:.1f} % "
                    f"(their \"{a['value']:.0f} % better\" is t_hf/t_nemo {1 + v:.2f}x = reduction "
                    f"{100 * (1 - 1 / (1 + v)):.1f} %, or reduction {a['value']:.0f} % = {1 / (1 - v):.2f}x)")
        elif a["kind"] == "throughput":
            nemo = next((s for s in summary["runs"] if s["backend"] == "nemo"), None)
            if nemo:
                ours = (f"nemo {nemo['tokens_per_s_per_device']:,.0f} tokens/s/{dev}, "
                        f"{_f(nemo.get('model_tflops_per_device'), '.3g')} model TFLOP/s/{dev}")
        L.append(f"| {a['source']} | {a['conditions']} | {a['figure']} | {ours} |")
    L += ["", "## Resources", ""]
    if not any(s["resources"]["has_samples"] for s in summary["runs"]):
        L.append("No samples.jsonl in these runs (run them through `python -m benchmarks.train_speed` to record "
                 "GPU/CPU utilisation and memory).")
    else:
        L += [f"![{p[:-4]}]({p})" for p in plots if p in ("utilization.png", "memory.png")]
        L += ["", "Means over the samples taken during the measured steps (the whole run when the steps were "
              "shorter than the sampling interval: see the window column); peaks over the whole run. "
              "\"Other processes\": cores busy outside the trainer's process tree — load that competed with the run.", ""]
        if cpu:
            L += ["| backend | CPU % mean (100 = 1 core) | other processes (cores, mean) | RSS peak GiB | window (samples) | "
                  "sampler CPU (share of one core) |", "|---|---|---|---|---|---|"]
        else:
            L += ["| backend | GPU util % mean | GPU mem used mean / peak GiB | torch max allocated / reserved GiB | "
                  "power W mean | SM clock MHz mean | CPU % mean | other processes (cores) | window (samples) | sampler CPU |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s in summary["runs"]:
            r = s["resources"]
            if not r["has_samples"]:
                L.append(f"| {s['backend']} | no samples |" + " |" * (4 if cpu else 8))
                continue
            smp = r["sampler"]
            win = f"{r['window'].split(' (')[0]} ({r['n_samples_window']})"
            frac = smp["sampler_cpu_fraction"]
            scpu = (("–" if frac is None else f"{100 * frac:.2f} %")
                    + f" ({_f(smp['sampler_ms_per_sample'], '.2f')} ms/sample every {smp['interval_s']} s)")
            if cpu:
                L.append(f"| {s['backend']} | {_f(r['cpu_percent_mean'], '.0f')} | {_f(r['other_load_cores_mean'], '.2f')} | "
                         f"{_f(r['rss_peak_gib'], '.2f')} | "
                         f"{win} | {scpu} |")
            else:
                L.append(f"| {s['backend']} | {_f(r.get('gpu_util_mean'), '.1f')} | {_f(r.get('gpu_mem_used_mean_gib'), '.1f')} / "
                         f"{_f(r.get('gpu_mem_used_peak_gib'), '.1f')} | {_f(r['cuda_max_allocated_gib'], '.1f')} / "
                         f"{_f(r['cuda_max_reserved_gib'], '.1f')} | {_f(r.get('gpu_power_mean_w'), '.0f')} | "
                         f"{_f(r.get('gpu_sm_clock_mean_mhz'), '.0f')} | {_f(r['cpu_percent_mean'], '.0f')} | "
                         f"{_f(r['other_load_cores_mean'], '.2f')} | "
                         f"{win} | {scpu} |")
        used = [s["resources"].get("gpus_used_how") for s in summary["runs"] if s["resources"].get("gpus_used_how")]
        if used and not cpu:
            L.append(f"\nGPU averages over: {used[0]}.")
    L += ["", "## Loss", "", "![loss](loss.png)", "",
          "| backend | first loss | last loss | last eval/loss (step) |", "|---|---|---|---|"]
    for s in summary["runs"]:
        ev = s.get("last_eval_loss")
        L.append(f"| {s['backend']} | {_f(s['first_loss'])} | {_f(s['last_loss'])} | "
                 f"{f'{_f(ev[1])} ({ev[0]})' if ev else '–'} |")
    L += ["", "`eval/loss`: the mean over the validation's micro-batches of their per-token mean, the same rows in "
          "every backend (README, Environment notes); – where the run did not validate or wrote no TensorBoard "
          "files."]
    L += ["", "## FLOPs per token", ""]
    fm, p = summary["flops"], summary["params"]
    if fm:
        sh = p["shape"]
        L += [f"Formula ({fm['method']}): **{fm['formula']}** per token, s = the step's mean sequence length "
              "(benchmarks/flops.py gives the derivation and sources).", "",
              f"- N = L·(h·q + 2·h·kv + q·h + 3·h·f) + V·h = {sh['layers']}·({sh['hidden']}·{sh['heads'] * sh['head_dim']} + "
              f"2·{sh['hidden']}·{sh['kv_heads'] * sh['head_dim']} + {sh['heads'] * sh['head_dim']}·{sh['hidden']} + "
              f"3·{sh['hidden']}·{sh['ffn']}) + {sh['vocab']}·{sh['hidden']} = **{p['n']:,}** "
              f"(blocks {p['blocks']:,} + LM head {p['lm_head']:,}; total parameters {p['total']:,})",
              f"- N_lora = {p['n_lora']:,}; attention coefficient 12·L·q = {fm['attn_coef']:,.0f} FLOPs per token per unit of s",
              *[f"- per token at {s['backend']}'s mean sequence length s = {s['mean_seq_len']:.0f}: "
                f"{fm['linear_per_token']:,.0f} (linear) + {s['mean_seq_len'] * fm['attn_coef']:,.0f} (attention) = "
                f"{fm['linear_per_token'] + s['mean_seq_len'] * fm['attn_coef']:,.0f} FLOPs"
                for s in summary["runs"] if s.get("mean_seq_len")],
              ("- peak: none on a CPU, so no MFU" if cpu else
               f"- peak: {summary['peak_tflops'][0]} TFLOP/s ({summary['peak_tflops'][1]}), MFU against the dense BF16 peak"
               + (f"; the run's precision is {t.get('precision')}" if t.get("precision") == "fp32" else "")
               if summary["peak_tflops"] else f"- peak: unknown for {hw['gpus'][0]}, so no MFU")]
    else:
        L.append(summary["flops_note"] or "no FLOPs")
    L += ["", "## How this was measured", "",
          "- step time: `step_time_s` of metrics.jsonl — from the end of one optimizer step to the end of the next "
          "(data loading and logging included), after torch.cuda.synchronize() on a GPU; written by the same "
          "`benchmarks.metrics.StepTimer` from a Lightning callback (NeMo) and a TrainerCallback (HF).",
          "- tokens: real (unpadded) prompt + completion tokens of the step; padded tokens are what the device processed.",
          "- resources: `benchmarks.sampler` in the launching process, watching the trainer's process tree "
          "(psutil) and the GPUs (NVML) — it never shares the trainer's GIL; its own CPU time is in the table. "
          "NVML's GPU utilisation is the share of time in which any kernel ran, not SM occupancy: "
          "a high value does not mean the tensor cores were busy (that is what MFU says).",
          "- each backend ran in its own process, one after the other, on the same prepared data files."]
    return "\n".join(L) + "\n"


def build_report(runs: list[Run | str | Path], out_dir: str | Path, warmup: Optional[int] = None,
                 allow_mismatch: bool = False) -> Path:
    """Write report.md, the PNGs and summary.json into ``out_dir``; returns report.md's path.
    Raises :class:`benchmarks.runs.RunsDiffer` for incomparable runs unless ``allow_mismatch``."""
    runs = [r if isinstance(r, Run) else load_run(r) for r in runs]
    if not runs:
        raise ValueError("no runs to report")
    diff = compare_runs(runs)
    if diff and not allow_mismatch:
        raise RunsDiffer(diff)
    if warmup is not None and warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, warmup)
    label = "CPU" if summary["cpu"] else summary["hardware"]["gpus"][0]
    plot_step_times(runs, summary, out / "step_time.png", label)
    plots = ["step_time.png"] + plot_resources(runs, summary, out, label)
    plot_loss(runs, out / "loss.png", label)
    plots.append("loss.png")
    notes = [n for r in runs for n in r.notes]
    text = render_markdown(summary, plots, diff, notes)
    write_text_atomic(out / "summary.json", json.dumps(summary, ensure_ascii=False, indent=1, default=str) + "\n")
    write_text_atomic(out / "report.md", text)
    return out / "report.md"


def default_output(run_dirs: list[Path]) -> Optional[Path]:
    """X for run dirs X/runs/<backend>, else None."""
    parents = {Path(d).resolve().parent for d in run_dirs}
    if len(parents) == 1:
        p = parents.pop()
        if p.name == "runs":
            return p.parent
    return None


def report_demo_runs(demo_out: str | Path) -> Optional[Path]:
    """The benchmark report of ``recipes.demo``'s training runs (``<demo_out>/runs/{hf,nemo,bridge}``) into
    ``<demo_out>/benchmark/``; returns its report.md, or None (with a printed reason) when there are no
    runs or they cannot be reported, so that a finished demo never fails on its last step."""
    demo_out = Path(demo_out)
    dirs = [demo_out / "runs" / b for b in ("hf", "nemo", "bridge") if (demo_out / "runs" / b / "metrics.jsonl").is_file()]
    if not dirs:
        print(f"[benchmark] no runs under {demo_out / 'runs'}: no benchmark report", flush=True)
        return None
    try:
        path = build_report(dirs, demo_out / "benchmark")
    except (RunsDiffer, FileNotFoundError, ValueError) as e:
        print(f"[benchmark] no benchmark report: {e}", flush=True)
        return None
    print(f"[benchmark] report: {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="recipes.finetune / train_speed run directories")
    ap.add_argument("--output", help="report dir (default: X for run dirs X/runs/<backend>)")
    ap.add_argument("--warmup", type=int, help="steps to exclude (default: train.warmup_steps_excluded)")
    ap.add_argument("--allow-mismatch", action="store_true", help="report runs that are not comparable (marked so)")
    args = ap.parse_args(argv)
    out = Path(args.output) if args.output else default_output([Path(d) for d in args.run_dirs])
    if out is None:
        ap.error("--output is required unless the run dirs are X/runs/<backend>")
    try:
        path = build_report(args.run_dirs, out, args.warmup, args.allow_mismatch)
    except RunsDiffer as e:
        print(f"error: {e}\n(pass --allow-mismatch to report them anyway)", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
