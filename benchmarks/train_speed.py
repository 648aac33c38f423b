"""Training-speed benchmark: the NeMo and HF backends on the same config and data, one after another.

    python -m benchmarks.train_speed --config nemo_configs/tiny_lora.yaml --backends nemo,hf \\
        --steps 10 --output runs/bench_tiny [train.warmup_steps_excluded=2 ...]

What it does:
1. resolves the config (``--steps N`` is ``train.max_steps=N``; ``key=value`` overrides as in
   ``recipes.finetune``) and prepares the model and data once (``recipes.finetune.ensure_inputs``);
2. runs each backend as ``python -m recipes.finetune --backend B --output DIR/runs/B`` in its own
   process (NeMo's CPU shim patches torch.cuda process-wide), with ``benchmarks.sampler`` watching it
   from this process (``samples.jsonl``; the trainer's log goes to ``train.log``), then writes
   ``bench_run.json`` last: exit status, wall time, command, environment, library versions, the
   sha256 of every prepared data file and a fingerprint of the model;
3. refuses to compare runs whose resolved hyperparameters, data, model or hardware differ (prints
   the differences, exit status 3), otherwise writes the report (``benchmarks.report``) into DIR.

Timed runs get ``OMP_NUM_THREADS=1`` unless it is already set (it is recorded either way).
An existing ``DIR/runs/B`` is only replaced with ``--overwrite`` (NeMo would resume from its checkpoint).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from benchmarks.metrics import METRICS_FILE, read_metrics
from benchmarks.sampler import SAMPLES_FILE, ResourceSampler, read_samples, visible_gpu_indices
from recipes.fileio import write_json_atomic

RUN_INFO_FILE = "bench_run.json"
CONFIG_FILE = "resolved_config.yaml"
BACKENDS = ("nemo", "hf")
# Keys that may differ between comparable runs: where the run wrote, the config's name, and how many
# steps the statistics skip (a reporting choice, not a training one).
IGNORED_KEYS = ("output_dir", "name", "train.warmup_steps_excluded")
VERSIONED = ("torch", "transformers", "peft", "trl", "nemo_toolkit", "megatron-core", "lightning", "nvidia-ml-py")


class RunsDiffer(ValueError):
    """Runs that must not be compared; ``diff`` lists the differences."""

    def __init__(self, diff: list[str]):
        self.diff = diff
        super().__init__("runs are not comparable:\n  " + "\n  ".join(diff))


# ---------------------------------------------------------------------------------------------
# fingerprints


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(dataset_dir: str | Path) -> dict[str, str]:
    """sha256 of each prepared split file (``*.jsonl`` directly in ``dataset_dir``), by file name."""
    d = Path(dataset_dir)
    files = sorted(d.glob("*.jsonl")) if d.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{d}: no prepared *.jsonl files")
    return {p.name: _sha256(p) for p in files}


def model_fingerprint(hf_path: str | Path) -> dict:
    """Cheap identity of an HF model dir: sha256 of config.json and the tokenizer files, and the size
    of every weight file (hashing 16 GB of safetensors per run would cost more than the benchmark)."""
    d = Path(hf_path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: no config.json (not an HF model dir)")
    small = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    return {"sha256": {n: _sha256(d / n) for n in small if (d / n).is_file()},
            "weight_bytes": {p.name: p.stat().st_size for p in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin"))}}


def library_versions() -> dict[str, Optional[str]]:
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
# loading and comparing runs


@dataclass
class Run:
    """What a run directory holds: the resolved config, metrics, and (when benchmarked) samples and
    bench_run.json. ``backend`` comes from the metrics records."""

    path: Path
    config: dict
    metrics: list[dict]
    samples: Optional[dict] = None
    info: Optional[dict] = None
    notes: list[str] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.metrics[0].get("backend", self.path.name) if self.metrics else self.path.name

    def hf_config(self) -> Optional[dict]:
        """The trained model's HF config.json: recorded in bench_run.json, else read from model.hf_path."""
        if self.info and self.info.get("model", {}).get("config_json"):
            return self.info["model"]["config_json"]
        p = Path(self.config.get("model", {}).get("hf_path", "")) / "config.json"
        if p.is_file():
            return json.loads(p.read_text(encoding="utf-8"))
        return None

    def gpu_names(self) -> Optional[list[str]]:
        """GPU names the sampler saw ([] = no GPU/NVML), or None when the run has no samples."""
        if self.samples is not None:
            return [g["name"] for g in self.samples["meta"].get("gpus", [])]
        if self.info and "hardware" in self.info:
            return list(self.info["hardware"].get("gpus", []))
        return None


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; raises FileNotFoundError/ValueError naming the file."""
    from omegaconf import OmegaConf
    d = Path(run_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: run directory not found")
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (not a recipes.finetune output dir?)")
    try:
        config = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
    except Exception as e:  # yaml/omegaconf errors
        raise ValueError(f"{cfg_path}: cannot read YAML: {e}") from None
    if not (d / METRICS_FILE).is_file():
        raise FileNotFoundError(f"{d / METRICS_FILE}: missing (the run did not start training?)")
    metrics = read_metrics(d)
    if not metrics:
        raise ValueError(f"{d / METRICS_FILE}: no step records")
    for i, r in enumerate(metrics, 1):
        for k in ("step", "step_time_s", "tokens", "samples"):
            if not isinstance(r.get(k), (int, float)):
                raise ValueError(f"{d / METRICS_FILE}:{i}: field {k}: expected a number, got {r.get(k)!r}")
    run = Run(d, config, metrics)
    if (d / SAMPLES_FILE).is_file():
        run.samples = read_samples(d)
    else:
        run.notes.append(f"{d.name}: no {SAMPLES_FILE} (not run through benchmarks.train_speed): no resource data")
    if (d / RUN_INFO_FILE).is_file():
        try:
            run.info = json.loads((d / RUN_INFO_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{d / RUN_INFO_FILE}: not JSON ({e.msg})") from None
    return run


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _run_data(run: Run) -> tuple[Optional[dict], str]:
    """(data fingerprint, where it came from) of a run."""
    if run.info and run.info.get("data", {}).get("sha256"):
        return run.info["data"]["sha256"], "recorded at run time"
    ds = run.config.get("data", {}).get("dataset_dir")
    try:
        return data_fingerprint(ds), "computed now from data.dataset_dir"
    except (FileNotFoundError, TypeError):
        return None, "unknown (dataset_dir not found)"


def compare_runs(runs: list[Run]) -> list[str]:
    """Differences that make runs incomparable (empty list: comparable), each as one line:
    resolved hyperparameters (all config keys but :data:`IGNORED_KEYS`), the prepared data's sha256,
    the model fingerprint, the GPUs, and runs that did not finish."""
    diff: list[str] = []
    if len(runs) < 2:
        return diff
    names = [f"{r.backend}({r.path})" if [x.backend for x in runs].count(r.backend) > 1 else r.backend for r in runs]
    flat = [{k: v for k, v in flatten(r.config).items() if k not in IGNORED_KEYS} for r in runs]
    for key in sorted(set().union(*flat)):
        vals = [f.get(key, "<missing>") for f in flat]
        if any(v != vals[0] for v in vals[1:]):
            diff.append(f"config {key}: " + ", ".join(f"{n}={v!r}" for n, v in zip(names, vals)))
    datas = [_run_data(r)[0] for r in runs]
    if all(d is not None for d in datas):
        for fname in sorted(set().union(*datas)):
            vals = [d.get(fname, "<missing>") for d in datas]
            if any(v != vals[0] for v in vals[1:]):
                diff.append(f"data {fname} sha256: " + ", ".join(f"{n}={v[:12]}" for n, v in zip(names, vals)))
    models = [r.info.get("model", {}).get("fingerprint") if r.info else None for r in runs]
    if all(m is not None for m in models) and any(m != models[0] for m in models[1:]):
        diff.append("model fingerprint (config/tokenizer sha256, weight sizes): "
                    + ", ".join(f"{n}={json.dumps(m, sort_keys=True)[:80]}" for n, m in zip(names, models)))
    gpus = [r.gpu_names() for r in runs]
    if all(g is not None for g in gpus) and any(g != gpus[0] for g in gpus[1:]):
        diff.append("hardware (GPUs seen by NVML): " + ", ".join(f"{n}={g or 'none'}" for n, g in zip(names, gpus)))
    for n, r in zip(names, runs):
        if r.info and r.info.get("status") != "ok":
            diff.append(f"run {n}: status {r.info.get('status')!r} (exit code {r.info.get('returncode')})")
    return diff


def check_comparable(runs: list[Run]) -> None:
    """Raise :class:`RunsDiffer` when :func:`compare_runs` finds differences."""
    diff = compare_runs(runs)
    if diff:
        raise RunsDiffer(diff)


# ---------------------------------------------------------------------------------------------
# running


def run_backend(config: str | Path, backend: str, run_dir: Path, overrides: list[str],
                interval_s: float = 0.5, inputs: Optional[dict] = None, log_to_console: bool = False) -> dict:
    """Train one backend in a subprocess with the sampler watching it; writes bench_run.json (last)
    into ``run_dir`` and returns it. ``inputs``: data/model fingerprints taken before the run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "recipes.finetune", "--config", str(config), "--backend", backend,
           "--output", str(run_dir), *overrides]
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
            proc.kill()
            raise
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl-C: do not leave a trainer running
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            sampler.stop()
            raise
        wall = time.perf_counter() - t0
        end = sampler.stop()
    meta = read_samples(run_dir / SAMPLES_FILE)["meta"]
    info = {"backend": backend, "status": "ok" if rc == 0 else "failed", "returncode": rc,
            "command": cmd, "started_unix": started, "wall_s": round(wall, 3),
            "env": {k: env.get(k) for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NCCL_ALGO")},
            "hardware": {"gpus": [g["name"] for g in meta["gpus"]], "nvml": meta["nvml"],
                         "nvml_error": meta["nvml_error"], "driver": meta["driver"],
                         "cpu_model": meta["cpu_model"], "cpu_count": meta["cpu_count"], "host": meta["host"]},
            "sampler": end, "versions": library_versions(), "git_commit": _git_commit(), **(inputs or {})}
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
    ap.add_argument("--backends", default="nemo,hf", help="comma-separated, run in this order (default: %(default)s)")
    ap.add_argument("--steps", type=int, help="optimizer steps per backend (train.max_steps)")
    ap.add_argument("--output", required=True, help="benchmark dir: runs/<backend>/, report.md, PNGs")
    ap.add_argument("--interval", type=float, default=0.5, help="sampler interval in seconds (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing runs/<backend> dirs")
    ap.add_argument("--no-report", action="store_true", help="only run (and check comparability)")
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
              "(a NeMo run would otherwise resume from its checkpoint)", file=sys.stderr)
        return 2

    from recipes.finetune import ensure_inputs
    ensure_inputs(cfg)  # once, before either backend: both read the same prepared files
    inputs = snapshot_inputs(cfg)
    for b, d in zip(backends, run_dirs):
        if d.exists():
            shutil.rmtree(d)
        info = run_backend(args.config, b, d, overrides, args.interval, inputs, log_to_console=args.verbose)
        print(f"[bench] {b}: {info['status']} in {info['wall_s']:.1f} s, {info['sampler']['n_samples']} samples",
              flush=True)
        if info["status"] != "ok":
            print(f"error: {b} failed (exit code {info['returncode']}); last lines of {d / 'train.log'}:\n"
                  f"{_tail(d / 'train.log')}", file=sys.stderr)
            return 1
        if data_fingerprint(cfg.data.dataset_dir) != inputs["data"]["sha256"]:
            print(f"error: {cfg.data.dataset_dir} changed during the {b} run", file=sys.stderr)
            return 1

    runs = [load_run(d) for d in run_dirs]
    diff = compare_runs(runs)
    if diff:
        print("error: the runs are not comparable:\n  " + "\n  ".join(diff), file=sys.stderr)
        return 3
    if args.no_report:
        return 0
    from benchmarks.report import build_report
    rep = build_report(run_dirs, out)  # paths: under `python -m` this module's Run is __main__.Run
    print(f"[bench] report: {rep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
