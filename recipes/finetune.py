"""Fine-tune with either backend from one experiment config.

    python -m recipes.finetune --config nemo_configs/tiny_lora.yaml --backend hf
    python -m recipes.finetune --config nemo_configs/tiny_lora.yaml --backend nemo train.max_steps=5
    python -m recipes.finetune --config nemo_configs/tiny_lora.yaml --backend nemo --dry-run
    python -m recipes.finetune --config nemo_configs/tiny_lora.yaml --backend bridge   # Megatron-Bridge
    python -m recipes.finetune --config nemo_configs/tiny_lora.yaml --backend bridge --executor local \
        train.num_devices=2                                          # NeMo-Run: torchrun, 2 processes

Before training it makes sure the inputs exist (``recipes.inputs.ensure_inputs``): the model
directory (built from ``model.preset`` when missing) and the prepared data (prepared from
``data.source`` with the model's tokenizer when ``data.dataset_dir`` is missing). Outputs go to
``--output`` or ``output_dir``: resolved_config.yaml, metrics.jsonl, and the adapter/model (HF) or
NeMo checkpoints. ``--backend bridge`` runs ``recipes.bridge_backend`` in the Megatron-Bridge environment
(``.venv-bridge``, ``make bridge-install``) on the same config and prepared inputs: Megatron checkpoints and,
in HF format, ``adapter/`` (LoRA) or ``model/`` (SFT); with ``--executor local|slurm`` NeMo-Run launches it
on every rank (``recipes.launch``: the bridge venv's torchrun here, or one Slurm task per device).
"""
from __future__ import annotations

import argparse
import sys

from recipes.cli import print_line
from recipes.config import ConfigError, load_config
from recipes.inputs import ensure_inputs
from recipes.launch import add_executor_args, run_with_executor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="experiment YAML (nemo_configs/*.yaml)")
    ap.add_argument("--backend", choices=["hf", "nemo", "bridge"], required=True,
                    help="hf: transformers + peft + TRL; nemo: NeMo 2.1 (nemo:24.12); bridge: Megatron-Bridge "
                         "0.3 (NeMo 26.02) or 0.6 (FUNDCOMMENT_BRIDGE_PYTHON), in its own venv")
    ap.add_argument("--output", help="output directory (overrides output_dir)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config/recipe and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=5")
    add_executor_args(ap)
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the options
    try:
        cfg = load_config(args.config, args.overrides + ([f"output_dir={args.output}"] if args.output else []))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.backend == "hf" and args.executor:
        ap.error("--executor is for --backend nemo and --backend bridge")
    if args.backend == "bridge" and args.executor:
        # NeMo-Run: torchrun of the bridge's venv here, or sbatch (each task the bridge's python)
        from recipes.launch import run_bridge_with_executor
        return run_bridge_with_executor(args, cfg)
    if args.backend == "bridge":
        return _run_bridge(args, cfg)
    if args.backend == "nemo" and (args.executor or (args.dry_run and cfg.targets_gpu)):
        # NeMo-Run launch (torchrun locally or sbatch on Slurm), or the dry-run of a GPU config on any machine
        return run_with_executor(args, cfg)
    if args.backend == "nemo":
        from recipes import nemo_recipe
        from recipes import nemo_backend
        if args.dry_run:
            print(nemo_recipe.describe(cfg))
            return 0
        ensure_inputs(cfg)
        out = nemo_backend.run(cfg)
    else:
        if args.dry_run:
            from recipes.hf_backend import training_arguments
            print(cfg.to_yaml())
            print("# SFTConfig:", training_arguments(cfg, cfg.output_dir, use_cpu=True))
            return 0
        ensure_inputs(cfg)
        from recipes.hf_backend import run
        out = run(cfg)
    print_line(f"done: {out}")
    return 0


def _run_bridge(args: argparse.Namespace, cfg) -> int:
    """The same config in the bridge's own environment; the inputs are made here first (this venv has the
    data preparation and the tiny-model presets)."""
    import subprocess
    from recipes.bridge_recipe import bridge_python
    try:
        py = bridge_python()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        ensure_inputs(cfg)
    cmd = [str(py), "-m", "recipes.bridge_backend", "run", "--config", args.config,
           *(["--output", args.output] if args.output else []), *(["--dry-run"] if args.dry_run else []),
           *args.overrides]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":  # the guard matters: NeMo's checkpoint writer re-imports __main__ (spawn)
    sys.exit(main())
