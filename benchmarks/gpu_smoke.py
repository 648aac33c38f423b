"""GPU smoke test: a few NeMo and HF training steps of an 8B-shaped Llama with random weights, one table.

    bash benchmarks/gpu_smoke.sh [--bundle DIR] [--layers 4] [--steps 8] [--method lora|sft|both]
                                 [--output runs/gpu_smoke] [--dry-run]

For whoever has one GPU (H100/H200: under 8 minutes, the bundle's install included) and wants to see both
backends train on it before committing a DGX to a real run. Nothing is downloaded:

1. preflight, in a child process: which backends import on this host (NeMo: ``nemo.collections.llm`` and
   megatron-core; HF: transformers, peft, TRL), the versions of torch / transformers / NeMo / megatron-core /
   Lightning / PEFT / TRL, whether Transformer Engine and Apex are there, and which fused kernels the NeMo
   recipe turns off for lack of them (``recipes.nemo_kernels``). A backend that cannot import is skipped,
   with the reason in the table and the JSON; the others run;
2. model: ``python -m recipes.models tiny`` with the Llama 3.1 8B *layer* shape (hidden 4096, 32 heads /
   8 KV groups, FFN 14336, untied embeddings) and its real 128,256-row embedding and LM head (a large share
   of an 8B step), but ``--layers`` decoder layers (default 4 of 32, ~1.9 B parameters) and the locally
   trained tokenizer's 2,048 tokens (``--embedding-rows``; rope without Llama 3.1 scaling). Random weights:
   the loss is not meaningful, step time and memory are;
3. config: ``nemo_configs/swallow_8b_<method>.yaml`` (same optimizer and LoRA settings, bf16-mixed,
   seq_length 2048) reduced to one GPU (TP1, DP1, no distributed optimizer), global batch 8 of
   micro-batch 1, ``--steps`` steps, the demo pairs as data;
4. the memory estimate of :mod:`recipes.memory` for that layout, then
   ``python -m benchmarks.train_speed --backends ...`` (report.md and PNGs in the output dir);
5. per method and backend: median step time, tokens/s/GPU, model TFLOP/s and MFU against the GPU's dense
   BF16 peak (``benchmarks.flops.PEAK_TFLOPS``; an unknown GPU gets no MFU, by name), the torch.cuda peak
   against the estimate, mean GPU utilisation and power from NVML (``benchmarks.sampler``) — printed as one
   markdown table and written to ``smoke.md`` and ``smoke.json`` in the output dir.

``--dry-run`` does steps 1, 3 and 4's estimate only (no model, no GPU) and prints the commands.
``--rehearse`` runs every step with the tiny test model (2 layers, fp32) instead: on any machine, a CPU
included, it checks a host or a bundle end to end before GPU time is spent (``tests/test_gpu_bundle.py``
rehearses with the bundle in a host-like venv).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
SMOKE_VOCAB = 2048  # tokenizer size: the tiny tokenizer's corpus yields ~2,300 tokens at most
EMBEDDING_ROWS = 128_256  # Llama 3.1's vocabulary: the embedding / LM head rows of the smoke model
BACKENDS = ("nemo", "hf")
METHODS = ("lora", "sft")


@dataclass(frozen=True)
class Shape:
    """The random model of a smoke run and the config it starts from."""
    name: str
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int  # tokenizer tokens
    rows: int  # embedding / LM head rows (config.json vocab_size)
    max_positions: int
    base_config: str  # nemo_configs/<base_config.format(method=...)>


SHAPES = {
    # Llama 3.1 8B's layer shape (recipes.memory: llama31_8b) and vocabulary; bf16-mixed, seq_length 2048
    "8b": Shape("8b", 4096, 32, 8, 14336, SMOKE_VOCAB, EMBEDDING_ROWS, 4096, "swallow_8b_{method}.yaml"),
    # --rehearse: the same steps on any machine (a CPU included) with the tiny test model, fp32
    "tiny": Shape("tiny", 64, 4, 2, 176, 1000, 1024, 2048, "tiny_{method}.yaml"),
}


def smoke_architecture(layers: int, shape: Shape = SHAPES["8b"]):
    """The shape :func:`build_command` builds, as a recipes.memory.Architecture (for the estimate)."""
    import families
    from recipes.memory import Architecture
    return Architecture(f"gpu_smoke_{shape.name}", families.DEFAULT_FAMILY, num_layers=layers, hidden_size=shape.hidden,
                        num_attention_heads=shape.heads, num_query_groups=shape.kv_heads, ffn_hidden_size=shape.ffn,
                        vocab_size=shape.rows, tie_embeddings=False, rope_theta=10000.0,
                        max_position_embeddings=shape.max_positions)


def build_command(model_dir: Path, layers: int, shape: Shape = SHAPES["8b"]) -> list[str]:
    return [sys.executable, "-m", "recipes.models", "tiny", "--output", str(model_dir), "--layers", str(layers),
            "--hidden", str(shape.hidden), "--heads", str(shape.heads), "--kv-heads", str(shape.kv_heads),
            "--ffn", str(shape.ffn), "--vocab", str(shape.vocab), "--embedding-rows", str(shape.rows), "--no-tie",
            "--max-position-embeddings", str(shape.max_positions), "--overwrite"]


def smoke_config(method: str, out: Path, steps: int, shape: Shape = SHAPES["8b"]):
    """The one-device ExperimentConfig of the smoke run for ``method`` (see the module docstring)."""
    from recipes.config import load_config
    overrides = [
        f"name=gpu_smoke_{shape.name}_{method}", f"output_dir={out / 'runs' / method}",
        f"model.hf_path={out / f'model_{shape.name}'}", f"data.source={ROOT / 'datasets' / 'demo_pairs.jsonl'}",
        f"data.dataset_dir={out / f'data_{shape.name}'}",
        f"train.max_steps={steps}", "train.micro_batch_size=1", "train.global_batch_size=8",
        "train.num_devices=1", "train.val_check_interval=0", "train.limit_val_batches=1",
        "train.checkpoint_every_n_steps=0", f"train.warmup_steps_excluded={min(2, steps - 1)}",
        f"optim.warmup_steps={min(2, steps)}",
        "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false", "parallel.num_nodes=1",
        "parallel.use_distributed_optimizer=false",
    ]
    return load_config(ROOT / "nemo_configs" / shape.base_config.format(method=method), overrides)


def write_config(cfg, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(cfg.to_yaml(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def bench_command(config: Path, bench_dir: Path, steps: int, backends=BACKENDS,
                  timeout_s: Optional[float] = None) -> list[str]:
    # --keep-going: a backend that fails (or hangs past timeout_s) on this host does not cost the other's figures
    return [sys.executable, "-m", "benchmarks.train_speed", "--config", str(config), "--backends", ",".join(backends),
            "--steps", str(steps), "--output", str(bench_dir), "--overwrite", "--keep-going",
            *(["--timeout-s", f"{timeout_s:g}"] if timeout_s else [])]


# Run in a child process (importing NeMo sets process-wide state): one JSON object on the last line.
PREFLIGHT = r"""
import importlib.metadata as md, importlib.util, json
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
def tries(stmt):
    try:
        exec(stmt, {})
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0][:300]
out = {"versions": {d: version(d) for d in ("torch", "transformers", "nemo_toolkit", "megatron_core", "lightning",
                                             "peft", "trl", "accelerate", "numpy", "transformer_engine", "apex")},
       "errors": {"nemo": tries("import megatron.core, nemo.collections.llm"),
                  "hf": tries("import transformers, peft, trl")}}
out["kernels_off"] = {}
if out["errors"]["nemo"] is None:
    from recipes.nemo_kernels import missing_gpu_kernels
    out["kernels_off"] = missing_gpu_kernels()
import torch
out["cuda"] = torch.cuda.is_available()
out["gpu"] = torch.cuda.get_device_name(0) if out["cuda"] else None
print(json.dumps(out))
"""


def preflight() -> dict:
    """What this host can run (see the module docstring, step 1): versions, import errors per backend,
    NeMo's fused kernels turned off, the GPU's name."""
    r = subprocess.run([sys.executable, "-c", PREFLIGHT], cwd=ROOT, capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"preflight failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def _num(run: dict, key: str) -> Optional[float]:
    return (run.get("resources") or {}).get(key)


def _peak_allocated(run_dir: Path) -> Optional[float]:
    from benchmarks.metrics import read_metrics
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    peaks = [r.get("cuda_max_allocated_bytes") for r in read_metrics(path)]
    peaks = [p for p in peaks if p]
    return max(peaks) / GIB if peaks else None


LOG_TAIL_LINES = 60  # of a failed backend's train.log, kept in smoke.json


def result_rows(method: str, bench_dir: Path, estimate_gib: float, skipped: dict[str, str] | None = None,
                backends=BACKENDS) -> list[dict]:
    """Rows of the final table from a finished train_speed run (summary.json + metrics.jsonl); a backend
    that was skipped or left no summary gets a row saying why."""
    summary_path = bench_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {"runs": []}
    rows = []
    for s in summary["runs"]:
        rows.append({"method": method, "backend": s["backend"], "steps": s.get("measured_steps"),
                     "step_s": s.get("step_time_median_s"), "tok_s": s.get("tokens_per_s_per_device"),
                     "tflops": s.get("model_tflops_per_device"), "mfu": s.get("mfu"),
                     "peak_gib": _num(s, "cuda_max_allocated_gib") or _peak_allocated(bench_dir / "runs" / s["backend"]),
                     "estimate_gib": estimate_gib if s["backend"] == "nemo" else None,
                     "gpu_util": _num(s, "gpu_util_mean"), "power_w": _num(s, "gpu_power_mean_w")})
    done = {r["backend"] for r in rows}
    for b in backends:
        if b not in done:
            failed = summary.get("failed", {}).get(b)
            log = bench_dir / "runs" / b / "train.log"
            why = (skipped or {}).get(b) or (f"failed, {failed} (see {log})" if failed else f"no result: see {log}")
            row = {"method": method, "backend": b, "note": why}
            if b not in (skipped or {}) and log.is_file():  # smoke.json alone says what happened
                row["log_tail"] = log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
            rows.append(row)
    speed = summary.get("speedup")
    if speed:
        rows.append({"method": method, "backend": "hf/nemo", "step_s": speed["t_hf_over_t_nemo"],
                     "note": "HF step time over NeMo's"})
    return rows


COLUMNS = (("method", "method", "s"), ("backend", "backend", "s"), ("steps", "steps", "d"),
           ("step_s", "step s", ".3f"), ("tok_s", "tok/s/GPU", ",.0f"), ("tflops", "TFLOP/s", ".1f"),
           ("mfu", "MFU", ".1%"), ("peak_gib", "peak GiB", ".1f"), ("estimate_gib", "est. GiB", ".1f"),
           ("gpu_util", "GPU util %", ".0f"), ("power_w", "power W", ".0f"), ("note", "note", "s"))


def format_table(rows: list[dict]) -> str:
    """One markdown table (a '-' where a value is missing)."""
    def f(v, fmt):
        return "-" if v is None or v == "" else format(v, fmt)
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---" if fmt == "s" else "---:" for _, _, fmt in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f(r.get(key), fmt) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def describe_host(pre: dict) -> list[str]:
    v = pre["versions"]
    lines = [f"GPU: {pre.get('gpu') or 'none (CUDA not available)'}",
             "versions: " + ", ".join(f"{k} {v[k] or '-'}" for k in v)]
    for b, err in pre["errors"].items():
        if err:
            lines.append(f"skipped {b}: does not import here: {err}")
    for name, why in pre.get("kernels_off", {}).items():
        lines.append(f"nemo runs {name}=False: {why}")
    return lines


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B-shaped model (default: %(default)s of 32)")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per backend (default: %(default)s)")
    ap.add_argument("--method", choices=[*METHODS, "both"], default="lora", help="default: %(default)s")
    ap.add_argument("--output", default="runs/gpu_smoke", help="output dir (default: %(default)s)")
    ap.add_argument("--backend-timeout-s", type=float, default=210.0, metavar="SECONDS",
                    help="stop a backend's run after this long, start-up included, and go on with the other "
                         "(default: %(default)g; 0: no limit)")
    ap.add_argument("--dry-run", action="store_true", help="preflight, write the configs, print the estimate and the "
                                                           "commands; run nothing")
    ap.add_argument("--rehearse", action="store_true",
                    help="every step with the tiny test model (fp32, 2 layers) instead of the 8B shape: runs on any "
                         "machine, a CPU included, to check a host or a bundle before the GPU time")
    args = ap.parse_args(argv)
    if args.layers < 1 or args.steps < 2:
        ap.error("--layers must be >= 1 and --steps >= 2")
    t0 = time.perf_counter()
    out = Path(args.output).absolute()
    methods = METHODS if args.method == "both" else (args.method,)
    shape = SHAPES["tiny" if args.rehearse else "8b"]
    layers = 2 if args.rehearse else args.layers

    from recipes.memory import Layout, estimate
    from recipes.validate import layout_problems
    pre = preflight()
    skipped = {b: f"does not import on this host: {e}" for b, e in pre["errors"].items() if e}
    not_built = os.environ.get("GPU_SMOKE_NOT_BUILT")  # gpu_smoke.sh: sources of the bundle that failed to build
    if not_built:
        skipped = {b: f"{why} (the bundle's {not_built} did not build here)" for b, why in skipped.items()}
    backends = tuple(b for b in BACKENDS if b not in skipped)
    print("\n".join(describe_host(pre)))
    if not_built:
        print(f"not built from the bundle on this host: {not_built} (gpu_smoke.sh's install output says why)")
    arch = smoke_architecture(layers, shape)
    print(f"model: {arch.summary()} (random weights; " + (
        "rehearsal: the tiny test model" if args.rehearse else
        f"Llama 3.1 8B layer shape, {layers} of 32 layers") +
        f", {shape.rows:,}-row embedding / LM head, {shape.vocab}-token tokenizer)")
    plans = []
    for method in methods:
        cfg = smoke_config(method, out, args.steps, shape)
        problems = layout_problems(cfg)
        if problems:
            print(f"error: {method}: " + "; ".join(problems), file=sys.stderr)
            return 2
        est = estimate(arch, Layout.from_config(cfg))
        config_path = write_config(cfg, out / f"{cfg.name}.yaml")
        print(f"{method}: {config_path}; estimated peak {est.total_gib:.1f} GiB on one device")
        plans.append((method, config_path, out / f"bench_{method}", est.total_gib))

    model_dir = out / f"model_{shape.name}"
    build = build_command(model_dir, layers, shape)
    if not backends:
        print("error: no backend imports on this host (see 'skipped' above)", file=sys.stderr)
        return 2
    if args.dry_run:
        print("would run:")
        print("  " + " ".join(build))
        for _, config_path, bench_dir, _ in plans:
            print("  " + " ".join(bench_command(config_path, bench_dir, args.steps, backends, args.backend_timeout_s)))
        return 0
    if not (model_dir / "config.json").is_file() or \
            json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"] != layers:
        _run(build)
    rows = []
    for method, config_path, bench_dir, est_gib in plans:
        try:
            _run(bench_command(config_path, bench_dir, args.steps, backends, args.backend_timeout_s))
        except subprocess.CalledProcessError as e:
            print(f"error: {method}: benchmarks.train_speed failed (exit {e.returncode}); see {bench_dir}/runs/*/train.log",
                  file=sys.stderr)
        rows += result_rows(method, bench_dir, est_gib, skipped)
    table = format_table(rows)
    peak = None
    for _, _, bench_dir, _ in plans:
        sp = bench_dir / "summary.json"
        if sp.is_file():
            peak = json.loads(sp.read_text(encoding="utf-8")).get("peak_tflops") or peak
    wall = time.perf_counter() - t0
    install_s = os.environ.get("GPU_SMOKE_INSTALL_S")
    head = [f"# GPU smoke test, {time.strftime('%Y-%m-%d')}", "", *[f"- {ln}" for ln in describe_host(pre)],
            f"- model: {arch.summary()}, random weights; {args.steps} steps per backend"
            + (" (rehearsal: tiny model)" if args.rehearse else ""),
            f"- MFU against {peak[0]} TFLOP/s ({peak[1]})" if peak else
            f"- no MFU: no dense BF16 peak known for {pre.get('gpu')!r} (benchmarks.flops.PEAK_TFLOPS)",
            f"- wall time {wall:.0f} s" + (f" after installing the bundle in {install_s} s" if install_s else ""), ""]
    print()
    print(table)
    result = {"date": time.strftime("%Y-%m-%d"), "host": pre, "skipped": skipped, "model": arch.summary(),
              "rehearsal": args.rehearse, "layers": layers, "steps": args.steps, "embedding_rows": shape.rows,
              "peak_tflops": peak,
              "bundle": os.environ.get("GPU_SMOKE_BUNDLE"), "bundle_install_s": float(install_s) if install_s else None,
              "bundle_not_built": not_built,
              "wall_s": round(wall, 1), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "smoke.json", json.dumps(result, indent=1) + "\n")
    _write_text(out / "smoke.md", "\n".join(head) + table + "\n")
    print(f"\n{out / 'smoke.md'}, {out / 'smoke.json'} ({wall:.0f} s)")
    ran = [r for r in rows if r["backend"] in BACKENDS]
    return 0 if ran and all(r.get("step_s") for r in ran if r["backend"] not in skipped) else 1


if __name__ == "__main__":
    sys.exit(main())
