"""The inputs a training run reads, made ready before it starts: the model directory (built from
``model.preset`` by recipes.models when missing) and the prepared data (prepared by recipes.data from
``data.source`` with the model's tokenizer when ``data.dataset_dir`` has no training.jsonl).

Used by every command that trains: recipes.finetune, recipes.launch (NeMo-Run launches),
recipes.demo and benchmarks.train_speed (once, before either backend runs).
"""
from __future__ import annotations

from pathlib import Path

from recipes.config import ConfigError, ExperimentConfig


def ensure_inputs(cfg: ExperimentConfig) -> None:
    """Build the preset model and prepare the data if they are not there yet. Safe to call from several
    processes at once (every rank of a torchrun launch does): each may build, the first to finish wins."""
    from recipes.models import ensure_model
    ensure_model(cfg.model)
    data_dir = Path(cfg.data.dataset_dir)
    if not (data_dir / "training.jsonl").is_file():
        if not cfg.data.source:
            raise ConfigError(f"data.dataset_dir={data_dir} has no training.jsonl and data.source is not set")
        from recipes.data import prepare
        try:
            prepare(cfg.data.source, data_dir, cfg.model.hf_path, seq_length=cfg.train.seq_length,
                    test_months=cfg.data.test_months, val_months=cfg.data.val_months)
        except OSError:
            # every rank of a torchrun launch gets here at once: the first output to land is the one all use
            # (the others' renames fail: FileExistsError, or ENOTEMPTY); same input, same output
            if not (data_dir / "training.jsonl").is_file():
                raise
