"""Benchmark run directories as data: what one holds (:class:`Run`, :func:`load_run`), the
fingerprints of its inputs, and whether runs may be compared (:func:`compare_runs`).

A run directory is a ``recipes.finetune`` output dir: resolved_config.yaml and metrics.jsonl, plus
samples.jsonl and bench_run.json when it ran under ``benchmarks.train_speed`` (which writes the
fingerprints below into bench_run.json). Runs are comparable when their resolved hyperparameters
(all config keys but :data:`IGNORED_KEYS`), prepared data (sha256 of each split file), model
(:func:`model_fingerprint`) and GPUs are the same and every run finished; ``benchmarks.report``
refuses to compare others (:class:`RunsDiffer`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from benchmarks.metrics import METRICS_FILE, read_metrics
from benchmarks.sampler import SAMPLES_FILE, read_samples

RUN_INFO_FILE = "bench_run.json"
CONFIG_FILE = "resolved_config.yaml"
# Keys that may differ between comparable runs: where the run wrote, the config's name, and how many
# steps the statistics skip (a reporting choice, not a training one).
IGNORED_KEYS = ("output_dir", "name", "train.warmup_steps_excluded")


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


def run_data_fingerprint(run: Run) -> tuple[Optional[dict], str]:
    """(data fingerprint, where it came from) of a run: the sha256 recorded in bench_run.json, else
    :func:`data_fingerprint` of its ``data.dataset_dir`` now, else None."""
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
    datas = [run_data_fingerprint(r)[0] for r in runs]
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
