"""Resource sampler that runs beside a training process: ``samples.jsonl``.

Every ``interval_s`` (default 0.5 s) it records, for the watched process *and its children*:
RSS and CPU % (psutil; 100 % = one core), and per GPU through NVML (``nvidia-ml-py``): utilisation,
memory used/total, power and SM clock, plus the GPU memory NVML attributes to the watched processes.
torch.cuda's per-step peak allocated/reserved memory cannot be read from outside the process, so
it is in ``metrics.jsonl`` (``benchmarks.metrics.StepTimer``).

Why a watcher of another process (a thread in the *launcher*, ``benchmarks.train_speed``, or this
module's command) rather than a thread inside the trainer:
- it never takes the trainer's GIL: a Python thread inside HF Trainer / Lightning would stall the
  Python code that launches the GPU kernels while it samples;
- it sees the whole process tree (torchrun workers, dataloader workers, NeMo's checkpoint writer),
  and the time before the trainer reaches its first step (imports, model load);
- it works for both backends unchanged and keeps recording if the trainer hangs or crashes.
Its cost is its own CPU time, measured per run (``sampler_cpu_s`` in the ``end`` record) and by
:func:`measure_overhead`.

File format (one JSON object per line, written to ``.samples.jsonl.partial`` and renamed when the
sampler stops):

    {"kind": "meta", "pid", "interval_s", "nvml": true|false, "nvml_error", "gpus": [{index, name,
     memory_total_bytes}], "driver", "cpu_count", "host", "started_unix"}
    {"kind": "sample", "t_mono" (time.perf_counter(): the clock of metrics.jsonl's mono_s), "t_s"
     (since the sampler started), "rss_bytes" (watched process), "tree_rss_bytes" (with children; shared
     pages count once per process), "cpu_percent" (tree), "n_procs", "sys_cpu_percent",
     "gpus": [{index, util_percent, mem_util_percent, mem_used_bytes, mem_total_bytes, power_w,
               sm_clock_mhz, proc_mem_bytes}]}      (gpus is [] without NVML)
    {"kind": "end", "n_samples", "wall_s", "sampler_setup_cpu_s" (NVML/psutil start, once),
     "sampler_cpu_s" (the sampling loop), "sampler_ms_per_sample", "sampler_cpu_fraction"
     (loop CPU / wall: the steady-state share of one core), "reason"}

A field NVML cannot give on a device (power on some boards) is null. With no NVML library or no
GPU, ``nvml`` is false, ``nvml_error`` says why, and only CPU/RSS are recorded.

    python -m benchmarks.sampler --pid 12345 --output samples.jsonl      # until the process exits
    python -m benchmarks.sampler --measure-overhead                      # the overhead numbers
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

SAMPLES_FILE = "samples.jsonl"
DEFAULT_INTERVAL_S = 0.5
CHILD_SCAN_S = 2.0  # seconds between searches for new child processes


class NvmlReader:
    """Per-GPU readings through NVML; ``available`` is False (and ``error`` says why) when the library,
    the driver or any GPU is missing. ``nvml`` is the pynvml module (tests pass a fake one)."""

    def __init__(self, nvml: Any = None, indices: Optional[list[int]] = None):
        self.available = False
        self.error: Optional[str] = None
        self.handles: list[tuple[int, Any]] = []
        self.info: list[dict] = []
        self.driver: Optional[str] = None
        try:
            if nvml is None:
                import pynvml as nvml  # nvidia-ml-py
        except ImportError as e:
            self.error = f"nvidia-ml-py is not installed ({e})"
            return
        self.nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:  # e.g. NVMLError_LibraryNotFound on a machine without a driver
            self.error = f"{type(e).__name__}: {e}"
            return
        try:
            count = nvml.nvmlDeviceGetCount()
            for i in range(count):
                if indices is not None and i not in indices:
                    continue
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                name = nvml.nvmlDeviceGetName(h)
                self.handles.append((i, h))
                self.info.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                                  "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(h).total)})
            self.driver = self._get(nvml.nvmlSystemGetDriverVersion)
            if isinstance(self.driver, bytes):
                self.driver = self.driver.decode()
        except nvml.NVMLError as e:
            self.error = f"{type(e).__name__}: {e}"
            self.handles, self.info = [], []
            return
        if not self.handles:
            self.error = "NVML found no GPU" + (f" among indices {indices}" if indices is not None else "")
            return
        self.available = True

    def _get(self, fn, *args):
        """fn(*args), or None when NVML cannot give this value on this device."""
        try:
            return fn(*args)
        except self.nvml.NVMLError:
            return None

    def read(self, pids: set[int]) -> list[dict]:
        nv = self.nvml
        out = []
        for (i, h), info in zip(self.handles, self.info):
            util = self._get(nv.nvmlDeviceGetUtilizationRates, h)
            mem = self._get(nv.nvmlDeviceGetMemoryInfo, h)
            power = self._get(nv.nvmlDeviceGetPowerUsage, h)  # milliwatts
            clock = self._get(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
            procs = self._get(nv.nvmlDeviceGetComputeRunningProcesses, h) or []
            mine = [p.usedGpuMemory for p in procs if p.pid in pids and p.usedGpuMemory is not None]
            out.append({"index": i,
                        "util_percent": None if util is None else float(util.gpu),
                        "mem_util_percent": None if util is None else float(util.memory),
                        "mem_used_bytes": None if mem is None else int(mem.used),
                        "mem_total_bytes": info["memory_total_bytes"] if mem is None else int(mem.total),
                        "power_w": None if power is None else power / 1000.0,
                        "sm_clock_mhz": None if clock is None else int(clock),
                        # None when NVML lists none of our pids (e.g. a container's pid namespace)
                        "proc_mem_bytes": int(sum(mine)) if mine else None})
        return out

    def close(self) -> None:
        if self.available:
            self._get(self.nvml.nvmlShutdown)


def visible_gpu_indices(env: Optional[dict] = None) -> Optional[list[int]]:
    """The NVML indices named by CUDA_VISIBLE_DEVICES when it lists plain integers, else None (all)."""
    v = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
    if v is None or not v.strip():
        return None
    parts = [p.strip() for p in v.split(",") if p.strip()]
    return [int(p) for p in parts] if all(p.isdigit() for p in parts) else None


class ResourceSampler:
    """Samples process ``pid`` (and its children) and the GPUs every ``interval_s`` seconds on a
    background thread, into ``path``. Use as a context manager or ``start()`` / ``stop()``.

    The loop ends by itself when the process exits. ``cpu_affinity`` pins the sampling thread (only
    :func:`measure_overhead` uses it, to put the sampler on the workload's core: the worst case).
    """

    def __init__(self, pid: int, path: str | Path, interval_s: float = DEFAULT_INTERVAL_S, nvml: Any = None,
                 gpu_indices: Optional[list[int]] = None, cpu_affinity: Optional[set[int]] = None):
        import psutil
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.pid = int(pid)
        self.path = Path(path)
        self.interval_s = float(interval_s)
        self._nvml_module = nvml
        self._gpu_indices = gpu_indices
        self._cpu_affinity = cpu_affinity
        self._psutil = psutil
        self._root = psutil.Process(self.pid)  # raises NoSuchProcess now rather than in the thread
        self._procs: dict[int, Any] = {}
        self._last_scan = float("-inf")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self.summary: dict = {}
        self.error: Optional[BaseException] = None

    # -- public ------------------------------------------------------------------------------

    def start(self) -> "ResourceSampler":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        """Stop, finish the file (rename into place) and return the ``end`` record."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"resource sampler for pid {self.pid} failed: {self.error!r}") from self.error
        return self.summary

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the loop to end (the process exited); True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> "ResourceSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the loop ----------------------------------------------------------------------------

    def _tree(self) -> list:
        """The watched process and its live children, as cached psutil.Process objects (cpu_percent
        needs the same object between calls). Finding children scans all of /proc (~1 ms per 100
        processes), so it is redone only every CHILD_SCAN_S; in between, exited children drop out."""
        ps = self._psutil
        now = time.perf_counter()
        if now - self._last_scan < CHILD_SCAN_S and self._procs:
            return [p for p in self._procs.values() if p.pid == self.pid or _alive(p)]
        self._last_scan = now
        try:
            procs = [self._root] + self._root.children(recursive=True)
        except ps.NoSuchProcess:
            return []
        alive = {}
        for p in procs:
            alive[p.pid] = self._procs.get(p.pid, p)
            if p.pid not in self._procs:
                try:
                    p.cpu_percent(None)  # the first call only starts the measurement
                except ps.Error:
                    pass
        self._procs = alive
        return list(alive.values())

    def sample(self, nvml: NvmlReader, t0: float) -> Optional[dict]:
        """One ``sample`` record, or None when the watched process is gone."""
        ps = self._psutil
        procs = self._tree()
        try:
            if not procs or self._root.status() == ps.STATUS_ZOMBIE:  # exited, not yet reaped
                return None
        except ps.NoSuchProcess:
            return None
        rss = tree_rss = 0
        cpu = 0.0
        for p in procs:
            try:
                with p.oneshot():
                    r = p.memory_info().rss
                    c = p.cpu_percent(None)
            except ps.Error:  # a child that just exited
                continue
            tree_rss += r
            cpu += c
            if p.pid == self.pid:
                rss = r
        now = time.perf_counter()
        return {"kind": "sample", "t_mono": now, "t_s": round(now - t0, 4), "rss_bytes": rss,
                "tree_rss_bytes": tree_rss, "cpu_percent": round(cpu, 1), "n_procs": len(procs),
                "sys_cpu_percent": ps.cpu_percent(None),
                "gpus": nvml.read({p.pid for p in procs}) if nvml.available else []}

    def _run(self) -> None:
        try:
            if self._cpu_affinity:
                os.sched_setaffinity(0, self._cpu_affinity)  # 0 = this thread on Linux
            setup0 = time.thread_time()  # this thread's CPU time: the sampler's own cost
            t0 = time.perf_counter()
            nvml = NvmlReader(self._nvml_module, self._gpu_indices)
            self._psutil.cpu_percent(None)
            setup_cpu = time.thread_time() - setup0
            loop_cpu = 0.0
            meta = {"kind": "meta", "pid": self.pid, "interval_s": self.interval_s, "nvml": nvml.available,
                    "nvml_error": nvml.error, "gpus": nvml.info, "driver": nvml.driver,
                    "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "host": socket.gethostname(),
                    "started_unix": time.time(), "t_mono": t0}
            n, reason = 0, "stopped"
            with open(self._tmp, "w", encoding="utf-8", buffering=1) as f:
                f.write(json.dumps(meta) + "\n")
                k = 0
                while True:
                    c0 = time.thread_time()
                    rec = self.sample(nvml, t0)
                    if rec is None:
                        reason = "process exited"
                        break
                    f.write(json.dumps(rec) + "\n")
                    loop_cpu += time.thread_time() - c0
                    n += 1
                    k += 1
                    # fixed schedule t0 + k*interval: no drift from the sampling time itself
                    if self._stop.wait(max(0.0, t0 + k * self.interval_s - time.perf_counter())):
                        break
                nvml.close()
                wall = time.perf_counter() - t0
                self.summary = {"kind": "end", "n_samples": n, "wall_s": round(wall, 3),
                                "sampler_setup_cpu_s": round(setup_cpu, 4), "sampler_cpu_s": round(loop_cpu, 5),
                                "sampler_ms_per_sample": round(1000 * loop_cpu / n, 4) if n else None,
                                # steady state: the loop's CPU time per second of wall time
                                "sampler_cpu_fraction": round(loop_cpu / wall, 6) if wall > 0 else None,
                                "reason": reason}
                f.write(json.dumps(self.summary) + "\n")
            os.replace(self._tmp, self.path)
        except BaseException as e:  # surfaced by stop(); a dead sampler must not go unnoticed
            self.error = e


def _alive(p) -> bool:
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:  # psutil.Error: gone
        return False


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_samples(path: str | Path) -> dict:
    """``{"meta": {...}, "samples": [...], "end": {...} | None}`` of a samples.jsonl (or of the one in
    a run directory). Raises FileNotFoundError / ValueError naming the file and line."""
    p = Path(path)
    if p.is_dir():
        p = p / SAMPLES_FILE
    out: dict = {"meta": None, "samples": [], "end": None}
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                kind = rec["kind"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{p}:{i}: not a sampler record ({e})") from None
            if kind == "sample":
                out["samples"].append(rec)
            elif kind in ("meta", "end"):
                out[kind] = rec
            else:
                raise ValueError(f"{p}:{i}: field kind: unknown value {kind!r}")
    if out["meta"] is None:
        raise ValueError(f"{p}: no meta record (not written by benchmarks.sampler?)")
    return out


# ---------------------------------------------------------------------------------------------
# overhead

_WORKLOAD = r"""
import sys, time
import numpy as np
a = np.random.default_rng(0).standard_normal((192, 192)).astype(np.float32)
b = a.copy()
for _ in range(2500):  # ~0.3 s: warm caches and BLAS, and let the sampler finish its start-up
    b = a @ b; b /= np.abs(b).max()
t = time.perf_counter()
for _ in range(int(sys.argv[1])):
    b = a @ b; b /= np.abs(b).max()
print(time.perf_counter() - t)
"""


def _run_workload(iters: int, cpu: int, interval_s: Optional[float], out_dir: Path, tag: str) -> tuple[float, dict]:
    """Seconds of a fixed single-threaded matmul loop on core ``cpu``, with the sampler (pinned to the
    same core) watching it when ``interval_s`` is set."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _WORKLOAD, str(iters)], stdout=subprocess.PIPE, text=True,
                            env=env)
    os.sched_setaffinity(proc.pid, {cpu})  # before its clock starts: importing numpy takes longer
    summary: dict = {}
    sampler = None
    if interval_s:
        sampler = ResourceSampler(proc.pid, out_dir / f"samples_{tag}.jsonl", interval_s, cpu_affinity={cpu}).start()
    out, _ = proc.communicate()
    if sampler is not None:
        summary = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"overhead workload failed with exit code {proc.returncode}")
    return float(out.strip().splitlines()[-1]), summary


def measure_overhead(interval_s: float = DEFAULT_INTERVAL_S, iters: int = 8000, repeats: int = 3,
                     out_dir: str | Path | None = None, cpu: Optional[int] = None) -> dict:
    """The sampler's cost on a fixed CPU workload (numpy matmuls, OMP_NUM_THREADS=1, ~1 s), with the
    sampler thread pinned to the workload's core so every cycle it takes is a cycle the workload loses.

    Runs without/with the sampler alternately ``repeats`` times; the slowdown compares the fastest run
    of each (the least disturbed by the rest of the machine). Also returns the sampler's own CPU time
    per second of wall time, which bounds its cost independently of timing noise.
    """
    import tempfile
    cpu = min(os.sched_getaffinity(0)) if cpu is None else cpu
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(out_dir) if out_dir else Path(tmp)
        without, with_, summaries = [], [], []
        for r in range(repeats):
            without.append(_run_workload(iters, cpu, None, d, f"off{r}")[0])
            t, s = _run_workload(iters, cpu, interval_s, d, f"on{r}")
            with_.append(t)
            summaries.append(s)
    cpu_s = sum(s["sampler_cpu_s"] for s in summaries)  # the loop only: setup is once per run
    wall_s = sum(s["wall_s"] for s in summaries)
    n = sum(s["n_samples"] for s in summaries)
    return {"interval_s": interval_s, "cpu": cpu, "repeats": repeats,
            "workload_s_without": without, "workload_s_with": with_,
            "slowdown_fraction": min(with_) / min(without) - 1.0,
            "sampler_cpu_fraction": cpu_s / wall_s if wall_s else None,
            "sampler_ms_per_sample": 1000.0 * cpu_s / n if n else None, "n_samples": n}


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sampler", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pid", type=int, help="process to watch (with its children) until it exits")
    ap.add_argument("--output", default=SAMPLES_FILE, help="samples.jsonl to write (default: %(default)s)")
    ap.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between samples")
    ap.add_argument("--measure-overhead", action="store_true",
                    help="time a fixed CPU workload with and without the sampler and print the overhead")
    ap.add_argument("--repeats", type=int, default=3, help="with --measure-overhead: runs of each kind")
    args = ap.parse_args(argv)
    if args.measure_overhead:
        res = measure_overhead(args.interval, repeats=args.repeats)
        print(json.dumps(res, indent=1))
        print(f"sampler at {args.interval} s on the workload's core: slowdown {100 * res['slowdown_fraction']:+.2f} %, "
              f"own CPU {100 * res['sampler_cpu_fraction']:.3f} % of one core "
              f"({res['sampler_ms_per_sample']:.2f} ms per sample)")
        return 0
    if args.pid is None:
        ap.error("--pid is required (or --measure-overhead)")
    import psutil
    try:
        sampler = ResourceSampler(args.pid, args.output, args.interval, gpu_indices=visible_gpu_indices())
    except psutil.NoSuchProcess:
        print(f"error: no process with pid {args.pid}", file=sys.stderr)
        return 2
    sampler.start()
    try:
        while not sampler.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    end = sampler.stop()
    print(f"{args.output}: {end['n_samples']} samples over {end['wall_s']:.1f} s ({end['reason']}); "
          f"sampler CPU {100 * (end['sampler_cpu_fraction'] or 0):.3f} % of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
