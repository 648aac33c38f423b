"""NeMo 2.1 backend: run an ExperimentConfig with ``llm.finetune`` in this process, and its checkpoint CLI.

The pieces live in their own modules: :mod:`recipes.nemo_import` (HF -> NeMo checkpoint, cached and
checked), :mod:`recipes.nemo_recipe` (the ``run.Partial`` of ``llm.finetune``, ``--dry-run`` text,
checkpoint lookup), :mod:`recipes.nemo_metrics` (``metrics.jsonl``), :mod:`convert.nemo_model`
(loading a checkpoint, logits vs HF) and :mod:`recipes.cpu_shim` (``prepare_process``: the CPU shim
when there is no CUDA). This module runs them: :func:`run`; ``python -m recipes.nemo_backend
import|check`` for the checkpoint tools.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

# Nothing here may reach a model hub; must be set before transformers/huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import families
from convert.nemo_model import import_logits_check
from recipes.config import ExperimentConfig
from recipes.cpu_shim import prepare_process
from recipes.fileio import write_text_atomic
from recipes.nemo_import import IMPORTERS, family_of, import_hf
from recipes.nemo_kernels import check_sequence_parallel
from recipes.nemo_recipe import build_recipe, last_checkpoint


def run(cfg: ExperimentConfig, output_dir: str | Path | None = None) -> Path:
    """Fine-tune with NeMo in this process; returns the last checkpoint dir.

    Applies the CPU shim when there is no CUDA, imports the HF model once (cached), builds the recipe,
    writes ``resolved_config.yaml`` and ``nemo_recipe.txt`` into the output dir and runs it.

    Rerunning the same command resumes from the run's last finished checkpoint (weights, optimizer,
    LR scheduler, data position) — after a crash, or with a larger train.max_steps (the restored LR
    scheduler keeps the first run's max_steps; NeMo's schedulers give min_lr beyond it, 0 for the
    linear and constant ones). A finished run rerun
    unchanged trains nothing; use a new output dir for a fresh run.
    """
    import fiddle as fdl

    out = Path(output_dir or cfg.output_dir).absolute()
    cpu = prepare_process()
    nemo_path = import_hf(cfg.model.hf_path, family=cfg.model.family)
    recipe = build_recipe(cfg, out, nemo_path=nemo_path, cpu=cpu)
    check_sequence_parallel(recipe)
    write_text_atomic(out / "resolved_config.yaml", cfg.to_yaml())
    write_text_atomic(out / "nemo_recipe.txt", str(recipe) + "\n")
    fdl.build(recipe)()
    return last_checkpoint(out)


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(
        prog="python -m recipes.nemo_backend",
        description="NeMo 2.1 checkpoint tools (training: python -m recipes.finetune --backend nemo).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--family", choices=families.names(), default=None,
                        help="model family; must match config.json (default: the one config.json names)")
    common.add_argument("--exclude-patch", action="append", default=[], metavar="NAME",
                        help="leave this recipes.cpu_shim patch out (to demonstrate what it prevents)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", parents=[common], help="HF model dir -> NeMo 2 checkpoint (cached)")
    imp.add_argument("hf_path")
    imp.add_argument("--output", help="checkpoint dir (default: <hf_path>-nemo)")
    imp.add_argument("--importer", choices=IMPORTERS, default="convert",
                     help="convert: the project's streaming converter (convert.hf_to_nemo, default); "
                          "nemo: NeMo 2.1's own importer of the family (llm.import_ckpt, or its fixed copy)")
    imp.add_argument("--no-norm-check", action="store_true",
                     help="keep an import whose norm weights differ from HF (to test the logits check)")
    imp.add_argument("--check-logits", action="store_true", help="then compare logits with the HF model")
    chk = sub.add_parser("check", parents=[common],
                         help="compare an imported checkpoint's logits with its HF model (CPU fp32)")
    chk.add_argument("hf_path")
    chk.add_argument("nemo_path")
    chk.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    try:
        prepare_process(exclude_patches=tuple(args.exclude_patch))
        if args.cmd == "import":
            out = import_hf(args.hf_path, args.output, family=args.family, check_norms=not args.no_norm_check,
                            importer=args.importer)
            report = {"nemo_path": str(out)}
            if args.check_logits:
                report["logits"] = import_logits_check(args.hf_path, out)
        else:
            family_of(args.hf_path, args.family)
            report = import_logits_check(args.hf_path, args.nemo_path, atol=args.atol)
    except (FileNotFoundError, ValueError, NotImplementedError, AssertionError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":  # the guard matters: NeMo's checkpoint writer re-imports __main__ (spawn)
    raise SystemExit(main())
