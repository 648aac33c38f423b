"""The offline GPU bundle (benchmarks/gpu_bundle.py) and the smoke test's host side (benchmarks/gpu_smoke.*).

Fast: the pins file, the bundle builder's pieces, the smoke table and the shell script's refusals. Slow (the CPU
proof of issue 14): the bundle is built for this Python (megatron-core taken as source, as a Python 3.12 host
gets it), a fresh venv modelled on a CUDA host (torch + requirements/gpu-host.txt: transformers 5, lightning
2.6, numpy 2, ...) installs it with pip --no-index and no pip configuration, `gpu_smoke.sh --bundle --dry-run`
prints the plan there, and `--rehearse` runs every step of the smoke test there with the tiny model on the CPU.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_bundle as gb
from benchmarks import gpu_smoke as gs

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SH = ROOT / "benchmarks" / "gpu_smoke.sh"


def _pins(path: Path) -> dict[str, str]:
    return {gb._key(p.name): p.version for p in gb.read_pins(path)}


def test_pins_are_the_tested_versions_and_shadow_only_what_was_measured():
    bundle = _pins(gb.PINS)
    constraints = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            constraints[gb._key(name)] = version.strip()
    differ = {k: (v, constraints[k]) for k, v in bundle.items() if k in constraints and constraints[k] != v}
    assert differ == {}, differ  # the bundle installs the CPU set's versions
    host = {gb._key(line.split("==")[0]) for line in gb.HOST.read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    # pinned over the host's newer version: measured (the comments in gpu-bundle.txt say how)
    assert set(bundle) & host == {"transformers", "tokenizers", "huggingface-hub", "lightning"}
    assert {"nemo-toolkit", "megatron-core", "trl", "datasets"} <= set(bundle)


@pytest.mark.parametrize("text, match", [
    ("transformers>=4.47\n", r"x.txt:1: expected one exact pin"),
    ("# c\n\na==1\nA==2\n", r"x.txt:4: A is pinned twice \(line 3\)"),
    ("# only comments\n", r"x.txt: no pins"),
])
def test_read_pins_names_file_and_line(tmp_path, text, match):
    (tmp_path / "x.txt").write_text(text)
    with pytest.raises(gb.BundleError, match=match):
        gb.read_pins(tmp_path / "x.txt")


def test_platforms_reach_down_to_manylinux2014():
    tags = gb.platforms("2.28")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_31_x86_64" not in tags  # a wheel for a newer glibc than asked is not taken
    with pytest.raises(gb.BundleError, match="2.17 or newer"):
        gb.platforms("2.5")


def _sdist(path: Path, pyproject: str | None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        files = {"pkg-1.0/setup.py": b"from setuptools import setup\nsetup()\n"}
        if pyproject is not None:
            files["pkg-1.0/pyproject.toml"] = pyproject.encode()
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_build_needs_reads_the_sources_build_system(tmp_path):
    a = _sdist(tmp_path / "a.tar.gz", '[build-system]\nrequires = ["setuptools", "pybind11"]\n')
    assert gb.build_needs(a) == ["setuptools", "pybind11"]
    assert gb.build_needs(_sdist(tmp_path / "b.tar.gz", None)) == ["setuptools"]


def test_build_refuses_before_writing_anything(tmp_path):
    with pytest.raises(gb.BundleError, match="CPython 3.10, 3.11 or 3.12"):
        gb.build(tmp_path / "b", python="3.9")
    (tmp_path / "exists").mkdir()
    with pytest.raises(gb.BundleError, match="exists"):
        gb.build(tmp_path / "exists")
    with pytest.raises(gb.BundleError, match="--from-source nosuchpkg: not in"):
        gb.build(tmp_path / "c", from_source=frozenset({"nosuchpkg"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_a_relative_output_is_written_where_asked(tmp_path, monkeypatch):
    """`make gpu-bundle` passes dist/gpu-bundle: pip downloads with the bundle dir as its working dir, where a
    relative -d once put the wheel one level down ("pip download left ['dist'], expected one wheel")."""
    pins = tmp_path / "pins.txt"
    pins.write_text("six==1.17.0\n")
    monkeypatch.chdir(tmp_path)
    m = gb.build(Path("dist/b"), python="%d.%d" % sys.version_info[:2], pins_path=pins, progress=False)
    files = sorted(p.name for p in (tmp_path / "dist" / "b").iterdir())
    assert "six-1.17.0-py2.py3-none-any.whl" in files and "dist" not in files
    assert [f["file"] for f in m["files"]][0] == "six-1.17.0-py2.py3-none-any.whl"


def test_smoke_rows_say_what_was_skipped_and_why(tmp_path):
    run = {"backend": "nemo", "measured_steps": 6, "step_time_median_s": 0.5, "tokens_per_s_per_device": 32768.0,
           "model_tflops_per_device": 400.0, "mfu": 400 / 989.4,
           "resources": {"cuda_max_allocated_gib": 8.5, "gpu_util_mean": 97.0, "gpu_power_mean_w": 650.0}}
    (tmp_path / "summary.json").write_text(json.dumps({"runs": [run]}))
    rows = gs.result_rows("lora", tmp_path, 9.0, skipped={"hf": "does not import on this host: ImportError: x"})
    assert rows[0] | {} == {"method": "lora", "backend": "nemo", "steps": 6, "step_s": 0.5, "tok_s": 32768.0,
                            "tflops": 400.0, "mfu": 400 / 989.4, "peak_gib": 8.5, "estimate_gib": 9.0,
                            "gpu_util": 97.0, "power_w": 650.0}
    assert rows[1] == {"method": "lora", "backend": "hf", "note": "does not import on this host: ImportError: x"}
    table = gs.format_table(rows).splitlines()
    assert table[0].startswith("| method | backend | steps | step s | tok/s/GPU | TFLOP/s | MFU | peak GiB |")
    assert table[2] == "| lora | nemo | 6 | 0.500 | 32,768 | 400.0 | 40.4% | 8.5 | 9.0 | 97 | 650 | - |"
    assert table[3].startswith("| lora | hf | - |") and table[3].endswith("ImportError: x |")
    # a backend that failed (train_speed --keep-going) says why; one that left no summary points at its log
    (tmp_path / "summary.json").write_text(json.dumps({"runs": [run], "failed": {"hf": "exit code 1: RuntimeError: y"}}))
    (tmp_path / "runs" / "hf").mkdir(parents=True)
    (tmp_path / "runs" / "hf" / "train.log").write_text("".join(f"line {i}\n" for i in range(100)) + "RuntimeError: y\n")
    failed = gs.result_rows("lora", tmp_path, 9.0)[1]
    assert failed["note"].startswith("failed, exit code 1: RuntimeError: y (see ")
    assert len(failed["log_tail"]) == gs.LOG_TAIL_LINES and failed["log_tail"][-1] == "RuntimeError: y"
    assert "line 99" not in gs.format_table([failed])  # the log stays out of the table
    (tmp_path / "summary.json").unlink()
    assert "train.log" in gs.result_rows("lora", tmp_path, 9.0)[0]["note"]


def _fake_bundle(d: Path, python: str) -> Path:
    d.mkdir()
    (d / "requirements.txt").write_text("")
    (d / "bundle.json").write_text(json.dumps({"python": python}))
    return d


def test_a_source_that_does_not_build_is_left_out_and_said(tmp_path):
    """A host without a compiler or Python headers cannot build the bundle's sources (megatron-core on Python
    3.12): gpu_smoke.sh installs the rest, says what it left out, and the smoke test goes on (here --dry-run)
    with whatever imports; the backends that then fail to import name the unbuilt source."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(bundle), "six==1.17.0"],
                   check=True, timeout=300)
    src = io.BytesIO()
    with tarfile.open(fileobj=src, mode="w:gz") as tar:
        for name, text in (("PKG-INFO", "Metadata-Version: 2.1\nName: brokenpkg\nVersion: 0.1\n"),
                           ("setup.py", "raise SystemExit(\"error: command 'gcc' failed: No such file or directory\")\n")):
            data = text.encode()
            info = tarfile.TarInfo(f"brokenpkg-0.1/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (bundle / "brokenpkg-0.1.tar.gz").write_bytes(src.getvalue())
    (bundle / "requirements.txt").write_text("brokenpkg==0.1\nsix==1.17.0\n")
    (bundle / "bundle.json").write_text(json.dumps({"python": "%d.%d" % sys.version_info[:2], "built_on_host": [
        {"file": "brokenpkg-0.1.tar.gz", "needs": ["setuptools"]}]}))
    prefix = tmp_path / "prefix"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_SMOKE_PREFIX": str(prefix), "PIP_CONFIG_FILE": os.devnull}
    r = subprocess.run(["bash", str(SMOKE_SH), "--bundle", str(bundle), "--dry-run", "--output", str(tmp_path / "s")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "No such file or directory" in r.stderr  # pip's own account of the failed build
    assert "installing it without what it builds here: brokenpkg" in r.stderr
    assert (prefix / "site" / "six.py").is_file() and not list((prefix / "site").glob("brokenpkg*"))
    assert "not built from the bundle on this host: brokenpkg" in r.stdout and "would run:" in r.stdout


@pytest.mark.parametrize("setup, match", [
    (lambda d: d.mkdir(), "not a bundle"),
    (lambda d: _fake_bundle(d, "3.1"), "is for Python 3.1, "),
])
def test_smoke_script_refuses_a_wrong_bundle(tmp_path, setup, match):
    setup(tmp_path / "b")
    r = subprocess.run(["bash", str(SMOKE_SH), "--bundle", str(tmp_path / "b"), "--dry-run"], capture_output=True,
                       text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    assert r.returncode == 2 and match in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# the CPU proof: build, install offline into a host-like venv, dry-run, train


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def host_venv(tmp_path_factory) -> Path:
    """A fresh venv like a CUDA host's: torch first (this machine's CPU wheel), then requirements/gpu-host.txt."""
    venv = tmp_path_factory.mktemp("gpuhost") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=900)
    subprocess.run([*pip, "-r", str(gb.HOST)], check=True, timeout=1800)
    return py


@pytest.mark.slow
def test_bundle_installs_offline_on_a_host_like_venv_and_both_backends_train(host_venv, tmp_path):
    version = "%d.%d" % sys.version_info[:2]
    bundle = tmp_path / "bundle"
    assert gb.main(["--output", str(bundle), "--python", version, "--from-source", "megatron-core",
                    "--no-progress"]) == 0
    m = json.loads((bundle / "bundle.json").read_text())
    assert m["python"] == version and m["packages"] == len(gb.read_pins(gb.PINS)) + 1
    assert m["total_bytes"] <= 60 * 2**20, m["total_bytes"] / 2**20  # the aim: <= 60 MiB
    for f in m["files"]:
        assert (bundle / f["file"]).stat().st_size == f["bytes"] and _sha256(bundle / f["file"]) == f["sha256"]
    assert [b["file"] for b in m["built_on_host"]] == ["megatron_core-0.10.0.tar.gz"]
    assert "pybind11" in m["built_on_host"][0]["needs"]
    reqs = (bundle / "requirements.txt").read_text().split()
    assert "nemo_toolkit==2.1.0" in reqs and reqs[-1].startswith("fundcomment_ft==")

    prefix = tmp_path / "prefix"
    env = {**os.environ, "PYTHON": str(host_venv), "GPU_SMOKE_PREFIX": str(prefix),
           "PIP_CONFIG_FILE": os.devnull}  # no machine pip config: no extra index, no find-links but the bundle's
    env.pop("PYTHONPATH", None)
    r = subprocess.run(["bash", str(SMOKE_SH), "--bundle", str(bundle), "--dry-run", "--method", "both",
                        "--output", str(tmp_path / "smoke")], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    # the bundle's pins shadow the host's newer versions; NeMo and megatron-core import beside numpy 2
    assert "transformers 4.47.1" in out and "lightning 2.4.0" in out and "nemo_toolkit 2.1.0" in out
    assert "megatron_core 0.10.0" in out and "transformer_engine -" in out and "skipped" not in out
    assert "nemo runs apply_rope_fusion=False" in out
    assert "128,256-row embedding" in out and "--embedding-rows 128256" in out
    assert out.count("benchmarks.train_speed") == 2 and "--backends nemo,hf" in out
    assert (prefix / "site" / "megatron" / "core" / "datasets").is_dir()
    assert list((prefix / "site" / "megatron" / "core" / "datasets").glob("helpers_cpp*.so"))  # built here
    host_numpy = subprocess.run([str(host_venv), "-c", "import numpy; print(numpy.__version__)"],
                                capture_output=True, text=True, check=True).stdout.strip()
    assert host_numpy.startswith("2.")

    # the rehearsal: every step of the smoke run there (CPU: the NeMo CPU shim), the tiny model with a padded
    # LM head; the prefix is installed already and is installed again over itself (--upgrade)
    r = subprocess.run(["bash", str(SMOKE_SH), "--bundle", str(bundle), "--rehearse", "--steps", "3",
                        "--output", str(tmp_path / "rehearsal")], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    smoke = json.loads((tmp_path / "rehearsal" / "smoke.json").read_text())
    assert smoke["rehearsal"] and smoke["skipped"] == {} and smoke["bundle"] == str(bundle)
    assert smoke["bundle_install_s"] > 0 and smoke["host"]["versions"]["transformers"] == "4.47.1"
    rows = {row["backend"]: row for row in smoke["rows"]}
    assert rows["nemo"]["step_s"] > 0 and rows["hf"]["step_s"] > 0 and rows["hf/nemo"]["step_s"] > 0
    assert rows["nemo"]["estimate_gib"] > 0 and rows["nemo"]["steps"] >= 1
    assert "| lora | nemo |" in (tmp_path / "rehearsal" / "smoke.md").read_text()
    for backend in ("nemo", "hf"):
        run = tmp_path / "rehearsal" / "bench_lora" / "runs" / backend
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [rec["step"] for rec in records] == [1, 2, 3], backend
        versions = json.loads((run / "bench_run.json").read_text())["versions"]
        # the bundle's transformers / lightning ran, not the host's 5.x / 2.6; the host's own peft
        assert (versions["transformers"], versions["lightning"]) == ("4.47.1", "2.4.0"), backend
        assert versions["peft"] != "0.14.0", backend
    config = json.loads((tmp_path / "rehearsal" / "model_tiny" / "config.json").read_text())
    assert config["vocab_size"] == 1024 and not config["tie_word_embeddings"]
