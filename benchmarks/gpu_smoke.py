"""GPU smoke test: a few NeMo and HF training steps of an 8B-shaped Llama with random weights, one table.

    bash benchmarks/gpu_smoke.sh [--layers 4] [--steps 8] [--method lora|sft|both] [--output runs/gpu_smoke] [--dry-run]

For whoever has one GPU (H100/H200, ~10 minutes) and wants to see both backends train on it before
committing a DGX to a real run. Nothing is downloaded:

1. model: ``python -m recipes.models tiny`` with the Llama 3.1 8B *layer* shape (hidden 4096,
   32 heads / 8 KV groups, FFN 14336, untied embeddings) but ``--layers`` decoder layers (default 4
   of 32, ~0.9 B parameters: building, importing into NeMo and training both backends fit the time)
   and the locally trained tokenizer's 2,048-token vocabulary instead of 128,256 (so the logits are
   much cheaper than the real 8B's; rope without Llama 3.1 scaling). Random weights: the loss is
   not meaningful, step time and memory are;
2. config: ``nemo_configs/swallow_8b_<method>.yaml`` (same optimizer and LoRA settings, bf16-mixed,
   seq_length 2048) reduced to one GPU (TP1, DP1, no distributed optimizer), global batch 8 of
   micro-batch 1, ``--steps`` steps, the demo pairs as data;
3. the memory estimate of :mod:`recipes.memory` for that layout, then
   ``python -m benchmarks.train_speed --backends nemo,hf`` (report.md and PNGs in the output dir);
4. one table: per method and backend the median step time, tokens/s, model TFLOP/s and MFU
   (benchmarks.report's summary.json), the measured torch.cuda peak and the estimate.

``--dry-run`` does steps 2 and 3's estimate only (no model, no GPU) and prints the commands.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
SHAPE_8B = dict(hidden=4096, heads=32, kv_heads=8, ffn=14336)  # Llama 3.1 8B (recipes.memory: llama31_8b)
SMOKE_VOCAB = 2048  # the tiny tokenizer's corpus yields ~2,300 tokens at most
METHODS = ("lora", "sft")


def smoke_architecture(layers: int):
    """The shape :func:`build_command` builds, as a recipes.memory.Architecture (for the estimate)."""
    import families
    from recipes.memory import Architecture
    return Architecture("gpu_smoke_8b", families.DEFAULT_FAMILY, num_layers=layers, hidden_size=SHAPE_8B["hidden"],
                        num_attention_heads=SHAPE_8B["heads"], num_query_groups=SHAPE_8B["kv_heads"],
                        ffn_hidden_size=SHAPE_8B["ffn"], vocab_size=SMOKE_VOCAB, tie_embeddings=False,
                        rope_theta=10000.0, max_position_embeddings=4096)


def build_command(model_dir: Path, layers: int) -> list[str]:
    return [sys.executable, "-m", "recipes.models", "tiny", "--output", str(model_dir), "--layers", str(layers),
            "--hidden", str(SHAPE_8B["hidden"]), "--heads", str(SHAPE_8B["heads"]), "--kv-heads",
            str(SHAPE_8B["kv_heads"]), "--ffn", str(SHAPE_8B["ffn"]), "--vocab", str(SMOKE_VOCAB), "--no-tie",
            "--max-position-embeddings", "4096"]


def smoke_config(method: str, out: Path, steps: int):
    """The one-GPU ExperimentConfig of the smoke run for ``method`` (see the module docstring)."""
    from recipes.config import load_config
    overrides = [
        f"name=gpu_smoke_8b_{method}", f"output_dir={out / 'runs' / method}",
        f"model.hf_path={out / 'model'}", f"data.source={ROOT / 'datasets' / 'demo_pairs.jsonl'}",
        f"data.dataset_dir={out / 'data'}",
        f"train.max_steps={steps}", "train.micro_batch_size=1", "train.global_batch_size=8",
        "train.num_devices=1", "train.val_check_interval=0", "train.limit_val_batches=1",
        "train.checkpoint_every_n_steps=0", f"train.warmup_steps_excluded={min(2, steps - 1)}",
        f"optim.warmup_steps={min(2, steps)}",
        "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false", "parallel.num_nodes=1",
        "parallel.use_distributed_optimizer=false",
    ]
    return load_config(ROOT / "nemo_configs" / f"swallow_8b_{method}.yaml", overrides)


def write_config(cfg, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(cfg.to_yaml(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def bench_command(config: Path, bench_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "benchmarks.train_speed", "--config", str(config), "--backends", "nemo,hf",
            "--steps", str(steps), "--output", str(bench_dir), "--overwrite"]


def _peak_allocated(run_dir: Path) -> Optional[float]:
    from benchmarks.metrics import read_metrics
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    peaks = [r.get("cuda_max_allocated_bytes") for r in read_metrics(path)]
    peaks = [p for p in peaks if p]
    return max(peaks) / GIB if peaks else None


def result_rows(method: str, bench_dir: Path, estimate_gib: float) -> list[dict]:
    """Rows of the final table from a finished train_speed run (summary.json + metrics.jsonl)."""
    summary_path = bench_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {"runs": []}
    rows = []
    for s in summary["runs"]:
        rows.append({"method": method, "backend": s["backend"], "steps": s.get("measured_steps"),
                     "step_s": s.get("step_time_median_s"), "tok_s": s.get("tokens_per_s_per_device"),
                     "tflops": s.get("model_tflops_per_device"), "mfu": s.get("mfu"),
                     "peak_gib": _peak_allocated(bench_dir / "runs" / s["backend"]),
                     "estimate_gib": estimate_gib if s["backend"] == "nemo" else None})
    speed = summary.get("speedup")
    if speed:
        rows.append({"method": method, "backend": "hf/nemo", "step_s": speed["t_hf_over_t_nemo"]})
    return rows


def format_table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    head = f"{'method':<6} {'backend':<8} {'steps':>5} {'step s':>8} {'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6} " \
           f"{'peak GiB':>9} {'est. GiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<6} {r['backend']:<8} {f(r.get('steps'), 'd'):>5} {f(r.get('step_s'), '.3f'):>8} "
                     f"{f(r.get('tok_s'), ',.0f'):>10} {f(r.get('tflops'), '.1f'):>8} {f(r.get('mfu'), '.1%'):>6} "
                     f"{f(r.get('peak_gib'), '.1f'):>9} {f(r.get('estimate_gib'), '.1f'):>9}")
    return "\n".join(lines)


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B-shaped model (default: %(default)s of 32)")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per backend (default: %(default)s)")
    ap.add_argument("--method", choices=[*METHODS, "both"], default="lora", help="default: %(default)s")
    ap.add_argument("--output", default="runs/gpu_smoke", help="output dir (default: %(default)s)")
    ap.add_argument("--dry-run", action="store_true", help="write the configs, print the estimate and the commands; run nothing")
    args = ap.parse_args(argv)
    if args.layers < 1 or args.steps < 2:
        ap.error("--layers must be >= 1 and --steps >= 2")
    out = Path(args.output).absolute()
    methods = METHODS if args.method == "both" else (args.method,)

    from recipes.memory import Layout, estimate
    from recipes.validate import layout_problems
    arch = smoke_architecture(args.layers)
    print(f"model: {arch.summary()} (random weights; Llama 3.1 8B layer shape, {args.layers} of 32 layers, "
          f"{SMOKE_VOCAB}-token vocabulary)")
    plans = []
    for method in methods:
        cfg = smoke_config(method, out, args.steps)
        problems = layout_problems(cfg)
        if problems:
            print(f"error: {method}: " + "; ".join(problems), file=sys.stderr)
            return 2
        est = estimate(arch, Layout.from_config(cfg))
        config_path = write_config(cfg, out / f"gpu_smoke_8b_{method}.yaml")
        print(f"{method}: {config_path}; estimated peak {est.total_gib:.1f} GiB on one GPU")
        plans.append((method, config_path, out / f"bench_{method}", est.total_gib))

    build = build_command(out / "model", args.layers)
    if args.dry_run:
        print("would run:")
        print("  " + " ".join(build))
        for _, config_path, bench_dir, _ in plans:
            print("  " + " ".join(bench_command(config_path, bench_dir, args.steps)))
        return 0
    if not (out / "model" / "config.json").is_file():
        _run(build)
    rows = []
    for method, config_path, bench_dir, est_gib in plans:
        try:
            _run(bench_command(config_path, bench_dir, args.steps))
        except subprocess.CalledProcessError as e:
            print(f"error: {method}: benchmarks.train_speed failed (exit {e.returncode}); see {bench_dir}/runs/*/train.log",
                  file=sys.stderr)
        rows += result_rows(method, bench_dir, est_gib)
    print()
    print(format_table(rows))
    return 0 if rows and all(r.get("step_s") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
