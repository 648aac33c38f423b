"""Training-speed benchmark: the NeMo, HF (and Megatron-Bridge) backends on the same config and data, one after another.

    python -m benchmarks.train_speed --config nemo_configs/tiny_lora.yaml --backends nemo,hf[,bridge] \\
        --steps 10 --output runs/bench_tiny [train.warmup_steps_excluded=2 ...]

What it does:
1. resolves the config (``--steps N`` is ``train.max_steps=N``; ``key=value`` overrides as in
   ``recipes.finetune``) and prepares the model and data once (``recipes.inputs.ensure_inputs``);
2. runs each backend as ``python -m recipes.finetune --backend B --output DIR/runs/B`` in its own
   process (NeMo's CPU shim patches torch.cuda process-wide), with ``benchmarks.sampler`` watching it
   from this process (``samples.jsonl``; the trainer's log goes to ``train.log``), then writes
   ``bench_run.json`` last: exit status, wall time, command, environment, library versions, the
   sha256 of every prepared data file and a fingerprint of the model. A backend that fails stops the
   benchmark (exit status 1) unless ``--keep-going``: then the others still run, the report covers those
   that ran, ``summary.json``'s ``failed`` gives each failed backend's exit code and error line, and the
   exit status is still 1. ``--timeout-s S`` stops a run (and every process under it) after S seconds: a
   failure, "timed out";
3. refuses to compare runs whose resolved hyperparameters, data, model or hardware differ
   (``benchmarks.runs.compare_runs``; prints the differences, exit status 3), otherwise writes the
   report (``benchmarks.report``) into DIR;
4. with ``tracking.mlflow`` set (each backend's training run is then an MLflow run, named in its
   ``runs/B/mlflow_run.json``) logs the report's figures of each backend to its run as ``bench/<name>``
   (median step time, tokens/s, memory, ...; the NeMo/HF ratios as ``bench/speedup/<name>``).

Timed runs get ``OMP_NUM_THREADS=1`` unless it is already set (it is recorded either way).
An existing ``DIR/runs/B`` is only replaced with ``--overwrite`` (a run there would resume from its checkpoint:
every backend resumes).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from benchmarks.runs import RUN_INFO_FILE, compare_runs, data_fingerprint, load_run, model_fingerprint
from benchmarks.sampler import SAMPLES_FILE, ResourceSampler, read_samples, visible_gpu_indices
from recipes.fileio import write_json_atomic

BACKENDS = ("nemo", "hf", "bridge")
VERSIONED = ("torch", "transformers", "peft", "trl", "nemo_toolkit", "megatron-core", "megatron-bridge", "lightning",
             "nvidia-ml-py")


# ---------------------------------------------------------------------------------------------
# recorded with each run


def library_versions(python: Optional[str | Path] = None) -> dict[str, Optional[str]]:
    """The versions of :data:`VERSIONED` in this environment, or in ``python``'s (the bridge's own venv)."""
    if python is not None and Path(python) != Path(sys.executable):
        code = ("import importlib.metadata as m, json\nout = {}\nfor n in %r:\n    try:\n        out[n] = m.version(n)\n"
                "    except m.PackageNotFoundError:\n        out[n] = None\nprint(json.dumps(out))" % (VERSIONED,))
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(r.stdout) if r.returncode == 0 else {n: None for n in VERSIONED}
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> Optional[str]:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=Path(__file__).resolve().parents[1])
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------
# running


def backend_command(config: str | Path, backend: str, run_dir: Path, overrides: list[str],
                    processes: int = 1) -> list[str]:
    """``python -m recipes.finetune`` for one backend. HF with several processes on this machine goes through
    torchrun (every process a data-parallel rank); NeMo's Lightning trainer starts its own processes; the
    bridge with several processes is its own venv's torchrun over ``recipes.bridge_backend run``."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    if backend == "bridge" and processes > 1:
        from recipes.bridge_recipe import bridge_python
        return [str(bridge_python()), *torchrun, "-m", "recipes.bridge_backend", "run", "--config", str(config),
                "--output", str(run_dir), *overrides]
    cmd = [sys.executable, "-m", "recipes.finetune", "--config", str(config), "--backend", backend,
           "--output", str(run_dir), *overrides]
    if backend == "hf" and processes > 1:
        cmd[1:1] = torchrun
    return cmd


def _backend_python(backend: str) -> Optional[Path]:
    if backend != "bridge":
        return None
    from recipes.bridge_recipe import bridge_python
    return bridge_python()


def backend_versions(backend: str) -> dict[str, Optional[str]]:
    """:func:`library_versions` of the backend's environment; unknown (None) when that environment is missing:
    the run itself then fails and says why."""
    try:
        return library_versions(_backend_python(backend))
    except FileNotFoundError:
        return {n: None for n in VERSIONED}


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the trainer and every process under it (torchrun's ranks, the bridge's python), SIGKILL to
    those left after ``grace_s``. The trainer stays in this process group: whatever ends this command (Ctrl-C,
    a job's time limit) still reaches it."""
    import psutil
    try:
        root = psutil.Process(proc.pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    proc.wait()


def run_backend(config: str | Path, backend: str, run_dir: Path, overrides: list[str],
                interval_s: float = 0.5, inputs: Optional[dict] = None, log_to_console: bool = False,
                processes: int = 1, timeout_s: Optional[float] = None) -> dict:
    """Train one backend in a subprocess with the sampler watching it; writes bench_run.json (last)
    into ``run_dir`` and returns it. ``inputs``: data/model fingerprints taken before the run. After
    ``timeout_s`` seconds the run is stopped (it and its children: SIGTERM, then SIGKILL) and its status is
    "timed out"."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = backend_command(config, backend, run_dir, overrides, processes)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log_path = run_dir / "train.log"
    print(f"[bench] {backend}: $ {' '.join(cmd)}\n[bench] {backend}: log {log_path}", flush=True)
    started = time.time()
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=None if log_to_console else log, stderr=subprocess.STDOUT,
                                env=env)
        try:
            sampler = ResourceSampler(proc.pid, run_dir / SAMPLES_FILE, interval_s,
                                      gpu_indices=visible_gpu_indices(env)).start()
        except BaseException:
            _stop(proc, grace_s=0)
            raise
        timed_out = False
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            print(f"[bench] {backend}: still running after {timeout_s:g} s: stopping it", flush=True)
            _stop(proc)
            rc = proc.returncode
        except BaseException:  # Ctrl-C: do not leave a trainer running
            _stop(proc)
            sampler.stop()
            raise
        wall = time.perf_counter() - t0
        end = sampler.stop()
    meta = read_samples(run_dir / SAMPLES_FILE)["meta"]
    status = "timed out" if timed_out else "ok" if rc == 0 else "failed"
    info = {"backend": backend, "status": status, "returncode": rc, "timeout_s": timeout_s,
            "command": cmd, "started_unix": started, "wall_s": round(wall, 3),
            "env": {k: env.get(k) for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NCCL_ALGO")},
            "hardware": {"gpus": [g["name"] for g in meta["gpus"]], "nvml": meta["nvml"],
                         "nvml_error": meta["nvml_error"], "driver": meta["driver"],
                         "cpu_model": meta["cpu_model"], "cpu_count": meta["cpu_count"], "host": meta["host"]},
            "sampler": end, "versions": backend_versions(backend), "git_commit": _git_commit(), **(inputs or {})}
    write_json_atomic(run_dir / RUN_INFO_FILE, info)
    return info


def snapshot_inputs(cfg) -> dict:
    """Data and model fingerprints (and the model's config.json) of a resolved config."""
    hf = Path(cfg.model.hf_path)
    return {"data": {"dataset_dir": str(cfg.data.dataset_dir), "sha256": data_fingerprint(cfg.data.dataset_dir)},
            "model": {"hf_path": str(hf), "fingerprint": model_fingerprint(hf),
                      "config_json": json.loads((hf / "config.json").read_text(encoding="utf-8"))}}


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="experiment YAML (nemo_configs/*.yaml)")
    ap.add_argument("--backends", default="nemo,hf", help="comma-separated from nemo,hf,bridge, run in this order (default: %(default)s; bridge "
                         "needs .venv-bridge: make bridge-install)")
    ap.add_argument("--steps", type=int, help="optimizer steps per backend (train.max_steps)")
    ap.add_argument("--output", required=True, help="benchmark dir: runs/<backend>/, report.md, PNGs")
    ap.add_argument("--interval", type=float, default=0.5, help="sampler interval in seconds (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing runs/<backend> dirs")
    ap.add_argument("--no-report", action="store_true", help="only run (and check comparability)")
    ap.add_argument("--timeout-s", type=float, metavar="SECONDS",
                    help="stop a backend's run after this many seconds (its status is then 'timed out': a failure)")
    ap.add_argument("--keep-going", action="store_true",
                    help="a backend that fails does not stop the others: the report covers those that ran "
                         "(failed ones are listed in summary.json's 'failed'); the exit code is still 1")
    ap.add_argument("--verbose", action="store_true", help="trainer output on the console instead of train.log")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.warmup_steps_excluded=2")
    args = ap.parse_intermixed_args(argv)

    from recipes.config import ConfigError, load_config
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends or len(set(backends)) != len(backends):
        ap.error(f"--backends: expected distinct names from {list(BACKENDS)}, got {args.backends!r}")
    if args.steps is not None and args.steps <= 0:
        ap.error(f"--steps must be > 0, got {args.steps}")
    overrides = list(args.overrides) + ([f"train.max_steps={args.steps}"] if args.steps else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    run_dirs = [out / "runs" / b for b in backends]
    existing = [d for d in run_dirs if d.exists()]
    if existing and not args.overwrite:
        print(f"error: {', '.join(map(str, existing))} already exist(s); pass --overwrite to replace "
              "(a run would otherwise resume from its checkpoint)", file=sys.stderr)
        return 2

    from recipes.inputs import ensure_inputs
    ensure_inputs(cfg)  # once, before either backend: both read the same prepared files
    inputs = snapshot_inputs(cfg)
    failed: dict[str, str] = {}
    for b, d in zip(backends, run_dirs):
        if d.exists():
            shutil.rmtree(d)
        info = run_backend(args.config, b, d, overrides, args.interval, inputs, log_to_console=args.verbose,
                           processes=cfg.train.num_devices if cfg.parallel.num_nodes == 1 else 1,
                           timeout_s=args.timeout_s)
        print(f"[bench] {b}: {info['status']} in {info['wall_s']:.1f} s, {info['sampler']['n_samples']} samples",
              flush=True)
        if info["status"] != "ok":
            why = (f"timed out after {args.timeout_s:g} s" if info["status"] == "timed out"
                   else f"exit code {info['returncode']}")
            print(f"error: {b} failed ({why}); last lines of {d / 'train.log'}:\n{_tail(d / 'train.log')}",
                  file=sys.stderr)
            if not args.keep_going:
                return 1
            failed[b] = f"{why}: {last_error_line(d / 'train.log')}"
        if data_fingerprint(cfg.data.dataset_dir) != inputs["data"]["sha256"]:
            print(f"error: {cfg.data.dataset_dir} changed during the {b} run", file=sys.stderr)
            return 1

    ran = [d for b, d in zip(backends, run_dirs) if b not in failed]
    if not ran:
        return 1
    runs = [load_run(d) for d in ran]
    diff = compare_runs(runs)
    if diff:
        print("error: the runs are not comparable:\n  " + "\n  ".join(diff), file=sys.stderr)
        return 3
    if args.no_report:
        return 1 if failed else 0
    from benchmarks.report import build_report
    rep = build_report(runs, out)
    if failed:  # --keep-going: say in the summary which backends did not run to the end, and why
        summary_path = out / "summary.json"
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        write_json_atomic(summary_path, {**summary, "failed": failed})
    print(f"[bench] report: {rep}")
    rc = log_summary_to_runs(out, ran)
    return 1 if failed else rc


def last_error_line(log: Path) -> str:
    """The line of a failed run's log that says why: the last exception line (``SomeError: ...``), else the
    last non-empty line."""
    lines = [ln.strip() for ln in _tail(log, 400).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^([\w.]+(Error|Exception|Interrupt)|AssertionError|error)\b:?", ln):
            return ln[:500]
    return lines[-1][:500] if lines else f"no output in {log}"


def log_summary_to_runs(out: Path, run_dirs: list[Path]) -> int:
    """Each backend's figures of ``out/summary.json`` to the MLflow run its training run wrote into
    ``runs/B/mlflow_run.json`` (none: nothing to do). 0, or 1 when a run cannot be written."""
    from benchmarks import tracking

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for stats, d in zip(summary["runs"], run_dirs):
        if not (d / tracking.RUN_FILE).is_file():
            continue
        figures = tracking.flat_numbers({k: v for k, v in stats.items() if k != "backend"}, "bench")
        figures.update(tracking.flat_numbers(summary.get("speedup") or {}, "bench/speedup"))
        try:
            uri, run_id = tracking.resolve_run(str(d))
            n = tracking.log_summary(uri, run_id, figures)
        except tracking.TrackingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"[bench] {stats['backend']}: {n} figures -> MLflow run {run_id} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
