"""Shared helpers of the training-run tests: the bridge's environment, a tiny model with prepared data, and
killing a run once a given step is logged (tests/test_bridge.py, test_bridge_launch.py, test_nemo_backend.py,
test_hf_backend.py, test_distributed.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def require_bridge_python(line: str = "0.3") -> Path:
    """The python of a Megatron-Bridge environment: line "0.3", .venv-bridge's (recipes.bridge_recipe.bridge_python),
    or "0.6", .venv-bridge06's (`make bridge06-install`); skipped without it, unless FUNDCOMMENT_REQUIRE_SERVER=1
    (`make test`), where a missing environment fails."""
    from recipes.bridge_recipe import bridge_python
    try:
        if line == "0.3":
            return bridge_python()
        p = ROOT / ".venv-bridge06" / "bin" / "python"
        if not p.exists():
            raise FileNotFoundError(f"{p}: the Megatron-Bridge 0.6 environment is not installed; run "
                                    "`make bridge06-install`")
        return p
    except FileNotFoundError as e:
        if os.environ.get("FUNDCOMMENT_REQUIRE_SERVER") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))


def tiny_inputs(base: Path) -> dict:
    """A tiny random Llama and the demo pairs prepared with its tokenizer (seq 256) under ``base``."""
    from recipes.data import prepare
    from recipes.models import build_tiny
    model = build_tiny(base / "tiny")
    data = base / "data"
    prepare(ROOT / "datasets/demo_pairs.jsonl", data, model, seq_length=256)
    return {"model": model, "data": data, "base": base}


PAUSE_HOOK = Path(__file__).resolve().parent / "pause_hook"


def paused_after(step: int, env: dict | None = None) -> dict:
    """``env`` (default: this process's) for a run that :func:`kill_when_step` kills at ``step``: every process of
    the run (torchrun's ranks, the bridge's python) loads ``tests/pause_hook/sitecustomize.py``, whose metrics
    writer stops for good once it has written ``step``, so the kill lands at that step and not a step or two later
    (a tiny model's steps are faster than the polling)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PAUSE_HOOK), env.get("PYTHONPATH")) if p)
    env["FUNDCOMMENT_TEST_PAUSE_AFTER_STEP"] = str(step)
    return env


def kill_when_step(proc: subprocess.Popen, metrics: Path, step: int, timeout_s: float = 300) -> list[dict]:
    """SIGKILL ``proc``'s process group (started with start_new_session=True and the environment of
    :func:`paused_after`) once ``metrics`` holds ``step``; returns the records it left."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and any(r["step"] == step for r in read_metrics(metrics)):
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    records = read_metrics(metrics) if metrics.is_file() else []
    assert not records or records[-1]["step"] <= step, (
        f"the run went on past step {step} to {records[-1]['step']}: started without run_checks.paused_after?")
    return records
