"""Dockerfile.bridge (the Megatron-Bridge image, FROM nvcr.io/nvidia/nemo:26.02): linted by hadolint (in
tests/test_dockerfile.py, beside Dockerfile.nemo), parsed
(the container's torch / Megatron-Bridge / megatron-core / transformers never reinstalled, what it adds pinned
to .venv-bridge's tested versions, every COPY source present) and **replayed** like Dockerfile.nemo
(tests/test_dockerfile.py): exactly the files it copies are staged, the project is installed from there as its
RUN line installs it, and its closing checks run from the staged dir — in .venv-bridge, which stands in for the
container (the same Megatron-Bridge / megatron-core line). A COPY that misses a package fails the replay."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from run_checks import require_bridge_python
from test_dockerfile import instructions, pip_installs, replay, requirement_name, stage

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.bridge"
INSTR = instructions(DOCKERFILE.read_text(encoding="utf-8"))
CONTAINER_OWNED = {"torch", "torchvision", "torchaudio", "megatron-bridge", "megatron_bridge", "megatron-core",
                   "megatron_core", "transformer-engine", "transformer_engine", "apex", "flash-attn", "transformers",
                   "nemo-run", "nemo_run", "nemo-toolkit", "nemo_toolkit", "numpy"}


@pytest.fixture(scope="module")
def bridge_py() -> Path:
    return require_bridge_python()


def test_builds_from_the_nemo_26_02_container_only():
    assert [args for word, args in INSTR if word == "FROM"] == ["nvcr.io/nvidia/nemo:26.02"] and INSTR[0][0] == "FROM"


def test_never_reinstalls_what_the_container_owns_and_pins_what_it_adds():
    installs = [cmd for word, args in INSTR if word == "RUN" for cmd in pip_installs(args)]
    constraints = {}
    for line in (ROOT / "requirements" / "bridge-constraints.txt").read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            constraints[name.lower().replace("_", "-")] = version.strip()
    for cmd in installs:
        pkgs = [a for a in cmd if not a.startswith("-") and a != "." and "/" not in a]
        assert not [p for p in pkgs if requirement_name(p) in CONTAINER_OWNED], cmd
        assert "--upgrade" not in cmd and "-U" not in cmd and "--force-reinstall" not in cmd, cmd
        for spec in pkgs:
            name, _, version = spec.partition("==")
            assert version and constraints.get(name.lower()) == version, f"{spec} vs requirements/bridge-constraints.txt"
    assert any("--no-deps" in cmd and cmd[-2:] == ["-e", "."] for cmd in installs)
    runs = " ".join(args for word, args in INSTR if word == "RUN")
    keep = __import__("re").search(r"grep -iE '([^']+)'", runs).group(1)
    for pkg in ("torch==", "megatron-bridge==", "megatron_core==", "transformer_engine_torch==", "transformers=="):
        assert __import__("re").search(keep, pkg, flags=__import__("re").I), f"{pkg} is not pinned to the container's"


def test_every_copy_source_exists_and_the_environment_is_offline():
    copies = [args for word, args in INSTR if word == "COPY"]
    for args in copies:
        *sources, _ = shlex.split(args)
        assert all((ROOT / s).exists() for s in sources), args
    assert {"families", "recipes", "convert", "benchmarks", "review_app", "pyproject.toml"} <= \
        {shlex.split(a)[0].rstrip("/") for a in copies}
    env = " ".join(args for word, args in INSTR if word == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env


def test_replayed_build_installs_and_passes_its_own_checks(bridge_py, tmp_path):
    stage(tmp_path / "work", instr=INSTR)
    r = replay(tmp_path / "work", tmp_path / "prefix", instr=INSTR, python=bridge_py)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "'megatron-bridge': '0.3." in r.stdout


def test_replay_fails_when_a_copy_misses_a_package(bridge_py, tmp_path):
    stage(tmp_path / "work", skip="families", instr=INSTR)
    r = replay(tmp_path / "work", tmp_path / "prefix", instr=INSTR, python=bridge_py)
    assert r.returncode != 0 and "families" in r.stdout + r.stderr
