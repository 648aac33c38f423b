"""`recipes.finetune --backend bridge --executor local|slurm` (recipes.launch): NeMo-Run launches
``python -m recipes.bridge_backend run`` in the bridge's environment (.venv-bridge) on every rank.

Fast: the dry runs show the bridge's ConfigContainer and what NeMo-Run would start — the bridge venv's torchrun
(its bin dir first on the ranks' PATH) for the local executor; for Slurm the nemo:26.02 image by default, or the
bridge venv's python by path without a container — and write nothing; Slurm's rank variables become torchrun's
in the bridge process. Slow: `--executor local` with two ranks gives the single bridge process's loss at every
step and one adapter. The real Slurm job of the bridge backend is in tests/test_slurm.py (its cluster fixture).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.metrics import read_metrics
from recipes import launch
from recipes.config import load_config
from run_checks import require_bridge_python, tiny_inputs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "nemo_configs" / "tiny_lora.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
       "OMP_NUM_THREADS": "1"}
# micro-batch 1, global batch 8: one process and two data-parallel ranks see the same samples (tests/test_bridge.py)
COMMON = ["train.micro_batch_size=1", "train.global_batch_size=8", "train.max_steps=3", "tracking.tensorboard=false"]


@pytest.fixture(scope="module", params=["0.3", "0.6"], ids=lambda line: f"bridge{line}")
def bridge_py(request) -> Path:
    """Both lines of Megatron-Bridge (tests/test_bridge.py): the launches here and in recipes.finetune use the
    line's python (FUNDCOMMENT_BRIDGE_PYTHON)."""
    py = require_bridge_python(request.param)
    before = os.environ.get("FUNDCOMMENT_BRIDGE_PYTHON")
    os.environ["FUNDCOMMENT_BRIDGE_PYTHON"] = ENV["FUNDCOMMENT_BRIDGE_PYTHON"] = str(py)
    yield py
    ENV.pop("FUNDCOMMENT_BRIDGE_PYTHON", None)
    if before is None:
        os.environ.pop("FUNDCOMMENT_BRIDGE_PYTHON", None)
    else:
        os.environ["FUNDCOMMENT_BRIDGE_PYTHON"] = before


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_inputs(tmp_path_factory.mktemp("bridge_launch"))


def finetune(tiny, out: Path, *args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "recipes.finetune", "--config", str(CONFIG), "--backend", "bridge",
           f"model.hf_path={tiny['model']}", f"data.dataset_dir={tiny['data']}", "--output", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, "NEMORUN_HOME": str(tiny["base"] / "nemorun_home"), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# fast


def test_local_dry_run_shows_the_bridge_torchrun_and_module(bridge_py, tiny, tmp_path):
    r = finetune(tiny, tmp_path / "run", "--executor", "local", "--dry-run", "train.num_devices=2", "optim.lr=3e-3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "Megatron-Bridge ConfigContainer for tiny_lora (lora)" in out and "lr: 0.003" in out  # the bridge's dry run
    assert f"every rank runs {bridge_py} -m recipes.bridge_backend" in out
    assert f"export PATH={bridge_py.parent}:" in out  # torchx puts it first: the bridge venv's torchrun and python
    assert f"export PYTHONPATH={ROOT}" in out
    torchrun = [ln for ln in out.splitlines() if ln.startswith("torchrun ")]
    assert len(torchrun) == 1 and "--nproc-per-node 2" in torchrun[0] and "--nnodes 1" in torchrun[0]
    # every path resolved here: the ranks read the same files whatever their working directory
    assert f" -m recipes.bridge_backend run --config {CONFIG} " in torchrun[0]
    assert torchrun[0].endswith(f" optim.lr=3e-3 model.hf_path={tiny['model']} data.dataset_dir={tiny['data']} "
                                f"data.source={ROOT}/datasets/demo_pairs.jsonl output_dir={tmp_path / 'run'}")
    assert not (tmp_path / "run").exists()


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--backend")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("overrides", nargs="*")
    launch.add_executor_args(ap)
    return ap.parse_intermixed_args(["--config", str(CONFIG), "--backend", "bridge", *argv])


def test_slurm_dry_run_defaults_to_the_nemo_26_02_image(bridge_py, tmp_path, capsys):
    args = _args("--dry-run", "--executor", "slurm", "--account", "acct", "--partition", "batch", "--packager", "none",
                 "--mount", f"{ROOT}:{ROOT}", "train.num_devices=2", "--gpus-per-node", "0")
    cfg = load_config(CONFIG, args.overrides + [f"output_dir={tmp_path / 'run'}"])
    assert launch.run_bridge_with_executor(args, cfg) == 0
    out = capsys.readouterr().out
    assert "Megatron-Bridge ConfigContainer for tiny_lora" in out
    assert "#SBATCH --ntasks-per-node=2" in out and "--gpus-per-node" not in out.split("# executor")[1]
    srun = [ln for ln in out.splitlines() if ln.startswith("srun ") and "--container-image" in ln]
    assert len(srun) == 1 and "--container-image nvcr.io/nvidia/nemo:26.02" in srun[0], srun
    assert " python -m recipes.bridge_backend run --config " in srun[0]  # the container's python has the bridge
    assert f"{ROOT}:{ROOT}" in srun[0]  # --mount
    # the output dir is under no mount: said, as for --backend nemo
    assert f"WARNING: not mounted at the same path in the container (add --mount P:P): {tmp_path / 'run'}" in out
    assert not (tmp_path / "run").exists()
    # --backend nemo keeps its own default image
    nemo = launch.build_executor(_args("--executor", "slurm", "--account", "a", "--partition", "p"), cfg)
    assert nemo.container_image == launch.DEFAULT_CONTAINER_IMAGE == "nvcr.io/nvidia/nemo:24.12"


def test_slurm_without_a_container_runs_the_bridge_venvs_python(bridge_py, tmp_path):
    args = _args("--executor", "slurm", "--account", "a", "--partition", "cpu", "--container-image", "none",
                 "--packager", "none", "--env", "OMP_NUM_THREADS=1")
    cfg = load_config(CONFIG, [f"output_dir={tmp_path / 'run'}"])
    ex, python, py = launch.build_bridge_executor(args, cfg)
    assert python == str(bridge_py) and py == bridge_py and launch.slurm_is_cpu(ex)
    assert ex.container_image is None and ex.setup_lines == launch.HOST_SRUN
    assert ex.env_vars["PATH"] == f"{bridge_py.parent}:$PATH" and ex.env_vars["OMP_NUM_THREADS"] == "1"
    assert ex.env_vars["PYTHONPATH"].startswith(str(ROOT))
    script = launch.executor_script(launch.bridge_task(cfg, CONFIG, python=python), ex, name="tiny_lora")
    line = script.split("# Command 1")[1]
    assert f"--kill-on-bad-exit=1 {bridge_py} -m recipes.bridge_backend run --config {CONFIG} " in line


def test_missing_bridge_environment_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FUNDCOMMENT_BRIDGE_PYTHON", str(tmp_path / "no-python"))
    cfg = load_config(CONFIG, [f"output_dir={tmp_path / 'run'}"])
    for argv in (["--executor", "local"], ["--executor", "slurm", "--account", "a", "--partition", "p",
                                           "--container-image", "none"]):
        assert launch.run_bridge_with_executor(_args(*argv), cfg) == 2
        assert "make bridge-install" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_slurm_rank_variables_become_torchruns():
    from recipes.bridge_backend import rank_env_from_slurm
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3"}
    rank_env_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "8", "3")
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}  # torchrun inside a job
    rank_env_from_slurm(torchrun)
    assert (torchrun["RANK"], torchrun["WORLD_SIZE"]) == ("1", "2")
    alone = {}
    rank_env_from_slurm(alone)
    assert alone == {}


# ---------------------------------------------------------------------------------------------
# slow


@pytest.mark.slow
def test_local_executor_two_ranks_match_one_bridge_process(bridge_py, tiny, tmp_path):
    """NeMo-Run's LocalExecutor, torchrun (the bridge venv's), two gloo ranks: the loss and grad norm of the one
    process (`--backend bridge` without an executor) at every step, the whole global batch's counts, one adapter."""
    one = finetune(tiny, tmp_path / "one", *COMMON)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-4000:]
    two = finetune(tiny, tmp_path / "two", *COMMON, "train.num_devices=2", "--executor", "local")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-5000:]
    runs = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in runs[1]] == [r["step"] for r in runs[0]] == [1, 2, 3]
    for a, b in zip(*runs):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert (a["tokens"], a["loss_tokens"], a["samples"]) == (b["tokens"], b["loss_tokens"], b["samples"])
    print("max |Δloss| one process vs two ranks:", max(abs(a["loss"] - b["loss"]) for a, b in zip(*runs)))
    # two workers of torchrun (NeMo-Run keeps each worker's output under its job dir), each to the end
    logs = list((tiny["base"] / "nemorun_home" / "experiments").glob("tiny_lora/*/tiny_lora/**/attempt_0/*/stdout.log"))
    assert sorted(log.parent.name for log in logs if f"done: {tmp_path / 'two'}" in log.read_text()) == ["0", "1"]
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "two").glob("adapter.tmp*"))
    launched = (tmp_path / "two" / "bridge_launch.txt").read_text()
    assert launched.startswith(f"{bridge_py} -m recipes.bridge_backend run --config {CONFIG}")
    # the base checkpoint was made before the launch (the ranks only read it)
    assert (Path(f"{tiny['model']}-megatron") / "bridge_import.json").is_file()
