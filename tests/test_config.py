"""Experiment config: every shipped YAML validates; bad keys/values are errors naming the key."""
from pathlib import Path

import pytest

from recipes.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "nemo_configs").glob("**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name and cfg.method in ("lora", "sft")
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * cfg.data_parallel_size) == 0


def test_overrides_apply_and_types_coerce():
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml", ["train.max_steps=7", "optim.lr=3e-2", "lora.dim=4"])
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.lora.dim) == (7, 3e-2, 4)
    assert cfg.grad_accumulation_steps == cfg.train.global_batch_size // cfg.train.micro_batch_size


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return p


BASE = """name: t
method: lora
output_dir: out
model: {hf_path: m}
data: {dataset_dir: d}
"""


@pytest.mark.parametrize("extra,override,key", [
    ("", "train.micro_batch_sise=2", "train.micro_batch_sise"),          # unknown key in an override
    ("optim: {lrr: 1.0}\n", None, "optim.lrr"),                           # unknown key in the file
    ("", "train.micro_batch_size=two", "train.micro_batch_size"),        # wrong type
    ("", "method=qlora", "method"),                                       # not an allowed value
    ("", "train.precision=bf16", "train.precision"),
    ("", "lora.dropout=1.5", "lora.dropout"),
    ("", "lora.target_modules=[q_proj]", "lora.target_modules"),         # HF names are not config names
    ("", "optim.lr=-1", "optim.lr"),
    ("", "optim.min_lr=1.0", "optim.min_lr"),                             # above lr
    ("", "train.global_batch_size=6", "train.global_batch_size"),        # not divisible by micro batch 4
    ("", "train.activation_checkpointing=1", "train.activation_checkpointing"),
    ("", "tracking.mlflow=sqlite:///mlflow.db", "tracking.mlflow"),        # needs the full mlflow (a server)
    ("", "tracking.mlflow=./mlruns", "tracking.mlflow"),                  # a path is file:PATH
    ("tracking: {mlflow: mlruns, run_name: r}\n", None, "tracking.mlflow"),
])
def test_invalid_values_name_the_key(tmp_path, extra, override, key):
    p = _write(tmp_path, BASE + extra + "train: {micro_batch_size: 4, global_batch_size: 8}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, [override] if override else [])
    assert key in str(e.value)


def test_missing_required_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match="missing required key data"):
        load_config(_write(tmp_path, "name: t\nmethod: sft\noutput_dir: o\nmodel: {hf_path: m}\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(_write(tmp_path, BASE), ["train.max_steps"])


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = load_config(ROOT / "nemo_configs/tiny_sft.yaml")
    with pytest.raises(Exception):
        cfg.train.max_steps = 3  # type: ignore[misc]
    again = load_config(_write(tmp_path, cfg.to_yaml()))
    assert again == cfg
    assert cfg.replace(**{"train.seed": 7}).train.seed == 7
