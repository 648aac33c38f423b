"""Resource sampler: CPU/RSS of a real process tree, NVML absent (for real) and present (a fake pynvml),
and its overhead measured on a fixed CPU workload."""
import json
import subprocess
import sys
import time
import types

import pytest

from benchmarks.sampler import (NvmlReader, ResourceSampler, measure_overhead, read_samples,
                                visible_gpu_indices)

BUSY = "import time\nt = time.time()\nwhile time.time() - t < {s}: pass\n"


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def _nvml_really_absent() -> bool:
    import pynvml
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return True
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return False


# ---------------------------------------------------------------------------------------------
# a fake pynvml: two GPUs, the second cannot report power and runs none of our processes


class _Err(Exception):
    pass


def fake_pynvml(watched_pid: int, fail_init: bool = False):
    m = types.ModuleType("fake_pynvml")
    m.NVMLError = _Err
    m.NVML_CLOCK_SM = 1
    calls = {"init": 0, "shutdown": 0}
    m.calls = calls

    def init():
        calls["init"] += 1
        if fail_init:
            raise _Err("Driver Not Loaded")

    m.nvmlInit = init
    m.nvmlShutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3" if h == "h0" else "NVIDIA H100 80GB HBM3"
    m.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    total = 80 * 2 ** 30
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=total, used=(60 if h == "h0" else 1) * 2 ** 30,
                                                                  free=0)
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=97 if h == "h0" else 0, memory=40)

    def power(h):
        if h == "h1":
            raise _Err("Not Supported")
        return 650_000  # milliwatts

    m.nvmlDeviceGetPowerUsage = power
    m.nvmlDeviceGetClockInfo = lambda h, kind: 1980 if kind == 1 else 0
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: (
        [types.SimpleNamespace(pid=watched_pid, usedGpuMemory=59 * 2 ** 30),
         types.SimpleNamespace(pid=1, usedGpuMemory=2 ** 30)] if h == "h0" else [])
    return m


# ---------------------------------------------------------------------------------------------


def test_cpu_only_when_nvml_library_is_missing(tmp_path):
    if not _nvml_really_absent():
        pytest.skip("this machine has an NVML library: the library-absent path is tested with a fake below")
    proc = _spawn(BUSY.format(s=1.6))
    t0 = time.perf_counter()
    with ResourceSampler(proc.pid, tmp_path / "samples.jsonl", interval_s=0.2) as s:
        proc.wait()
        assert s.wait(5)  # the loop ends by itself once the process is gone
    wall = time.perf_counter() - t0
    data = read_samples(tmp_path)
    meta, samples, end = data["meta"], data["samples"], data["end"]
    assert meta["nvml"] is False and "LibraryNotFound" in meta["nvml_error"] and meta["gpus"] == []
    assert end["reason"] == "process exited"
    assert abs(len(samples) - wall / 0.2) <= 3, (len(samples), wall)
    assert all(x["gpus"] == [] for x in samples)
    assert all(x["rss_bytes"] > 1_000_000 for x in samples)
    busy = [x["cpu_percent"] for x in samples[1:-1]]
    assert sum(busy) / len(busy) > 60, busy  # a spinning process is ~100 % of one core
    ts = [x["t_mono"] for x in samples]
    assert all(0.1 < b - a < 0.4 for a, b in zip(ts, ts[1:])), ts
    assert not (tmp_path / ".samples.jsonl.partial").exists()


def test_children_are_included(tmp_path, monkeypatch):
    # the watched process only sleeps; its child spins: the tree's CPU % must show the child
    import benchmarks.sampler
    monkeypatch.setattr(benchmarks.sampler, "CHILD_SCAN_S", 0.0)  # look for children at every sample
    code = (f"import subprocess, sys\np = subprocess.Popen([sys.executable, '-c', {BUSY.format(s=1.5)!r}])\n"
            "p.wait()\n")
    proc = _spawn(code)
    with ResourceSampler(proc.pid, tmp_path / "samples.jsonl", interval_s=0.2):
        proc.wait()
    samples = read_samples(tmp_path / "samples.jsonl")["samples"]
    assert max(x["n_procs"] for x in samples) == 2
    two = [x for x in samples if x["n_procs"] == 2][1:]
    assert two and max(x["cpu_percent"] for x in two) > 60
    assert all(x["tree_rss_bytes"] > x["rss_bytes"] for x in two)


def test_fake_nvml_gpu_path(tmp_path):
    proc = _spawn("import time; time.sleep(0.8)")
    nv = fake_pynvml(proc.pid)
    with ResourceSampler(proc.pid, tmp_path / "samples.jsonl", interval_s=0.2, nvml=nv):
        proc.wait()
    data = read_samples(tmp_path / "samples.jsonl")
    meta = data["meta"]
    assert meta["nvml"] is True and meta["nvml_error"] is None and meta["driver"] == "550.54.15"
    assert [g["name"] for g in meta["gpus"]] == ["NVIDIA H100 80GB HBM3"] * 2  # bytes decoded
    g0, g1 = data["samples"][0]["gpus"]
    assert g0 == {"index": 0, "util_percent": 97.0, "mem_util_percent": 40.0, "mem_used_bytes": 60 * 2 ** 30,
                  "mem_total_bytes": 80 * 2 ** 30, "power_w": 650.0, "sm_clock_mhz": 1980,
                  "proc_mem_bytes": 59 * 2 ** 30}  # pid 1's memory is not ours
    assert g1["power_w"] is None and g1["proc_mem_bytes"] is None and g1["util_percent"] == 0.0
    assert nv.calls == {"init": 1, "shutdown": 1}


def test_gpu_indices_filter_and_cuda_visible_devices(tmp_path):
    nv = fake_pynvml(0)
    r = NvmlReader(nv, indices=[1])
    assert r.available and [i["index"] for i in r.info] == [1]
    assert NvmlReader(fake_pynvml(0), indices=[5]).available is False
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "2,3"}) == [2, 3]
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "GPU-1a2b"}) is None  # UUIDs: watch all
    assert visible_gpu_indices({}) is None


def test_nvml_init_error_is_graceful(tmp_path):
    proc = _spawn("import time; time.sleep(0.5)")
    nv = fake_pynvml(proc.pid, fail_init=True)
    with ResourceSampler(proc.pid, tmp_path / "samples.jsonl", interval_s=0.2, nvml=nv):
        proc.wait()
    data = read_samples(tmp_path / "samples.jsonl")
    assert data["meta"]["nvml"] is False and data["meta"]["nvml_error"] == "_Err: Driver Not Loaded"
    assert data["samples"] and all(x["gpus"] == [] and x["rss_bytes"] > 0 for x in data["samples"])
    assert nv.calls["shutdown"] == 0  # never initialised


def test_missing_process_and_bad_file(tmp_path):
    import psutil
    proc = _spawn("pass")
    proc.wait()
    with pytest.raises(psutil.NoSuchProcess):
        ResourceSampler(proc.pid, tmp_path / "s.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"kind": "meta", "interval_s": 0.5}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_samples(bad)


def test_overhead_below_one_percent():
    # Own CPU time at the default interval bounds the cost directly ...
    res = measure_overhead(interval_s=0.5, iters=5000, repeats=1)
    assert res["n_samples"] >= 1
    assert res["sampler_cpu_fraction"] < 0.01, res
    # ... and the timed workload, sharing its core with a sampler 10x more frequent than the default,
    # slows down by less than 10 %, i.e. < 1 % at the default (the cost is per sample).
    fast = measure_overhead(interval_s=0.05, iters=5000, repeats=2)
    assert fast["n_samples"] >= 10
    assert fast["slowdown_fraction"] < 0.10, fast
    print(f"\noverhead: default 0.5 s -> sampler CPU {100 * res['sampler_cpu_fraction']:.3f} % of one core; "
          f"0.05 s on the same core -> workload slowdown {100 * fast['slowdown_fraction']:+.2f} %")
