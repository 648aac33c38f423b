"""NeMo-Run executors and the launch dry run (recipes.launch): nothing is launched, no GPU needed."""
import argparse
import glob
import os
import tempfile
from pathlib import Path

import nemo_run as run
import pytest

from recipes import launch
from recipes.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def cfg_of(name: str, *overrides: str):
    return load_config(ROOT / "nemo_configs" / f"{name}.yaml", list(overrides))


def _task_fn(x: int = 1) -> int:
    return x


def finetune_like_parser() -> argparse.ArgumentParser:
    """The options recipes.finetune has, plus the executor group, as the lead wires it."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--backend", choices=["hf", "nemo"])
    ap.add_argument("--dry-run", action="store_true")
    launch.add_executor_args(ap)
    return ap


# ---------------------------------------------------------------------------------------------
# executors


def test_local_executor_is_torchrun_with_one_process_per_gpu():
    ex = launch.local_executor(cfg_of("swallow_8b_lora"), env_vars={"EXTRA": "1"})
    assert isinstance(ex, run.LocalExecutor)
    assert ex.ntasks_per_node == 8 and ex.launcher == "torchrun"
    assert ex.env_vars["NCCL_NVLS_ENABLE"] == "0" and ex.env_vars["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert ex.env_vars["HF_HUB_OFFLINE"] == "1" and ex.env_vars["EXTRA"] == "1"
    with pytest.raises(launch.LaunchError, match="parallel.num_nodes=4: the local executor runs on one machine"):
        launch.local_executor(cfg_of("swallow_70b_sft"))
    with pytest.raises(launch.LaunchError, match="--gpus-per-node 4 differs from train.num_devices=8"):
        launch.local_executor(cfg_of("swallow_8b_lora"), ntasks_per_node=4)


def test_slurm_executor_like_the_nemo_quickstart(tmp_path):
    cfg = cfg_of("swallow_70b_sft", f"output_dir={tmp_path / 'run'}")
    ex = launch.slurm_executor(cfg, account="acct", partition="batch", mounts=["/lustre:/lustre"])
    assert isinstance(ex, run.SlurmExecutor)
    assert (ex.account, ex.partition, ex.nodes, ex.ntasks_per_node, ex.gpus_per_node) == ("acct", "batch", 4, 8, 8)
    assert ex.container_image == "nvcr.io/nvidia/nemo:24.12" and ex.container_mounts == ["/lustre:/lustre"]
    assert ex.exclusive is True and ex.mem == "0" and ex.gres == "gpu:8"
    assert isinstance(ex.tunnel, run.LocalTunnel) and ex.tunnel.job_dir == str(tmp_path / "run" / "nemo_run")
    assert isinstance(ex.packager, run.GitArchivePackager)
    assert isinstance(launch.slurm_executor(cfg, account="a", partition="p", packager="none").packager, run.Packager)
    ssh = launch.slurm_executor(cfg, account="a", partition="p", tunnel="ssh", ssh_host="login", ssh_user="me",
                                job_dir="/lustre/me/nemo-runs")
    assert isinstance(ssh.tunnel, run.SSHTunnel) and ssh.tunnel.host == "login"


@pytest.mark.parametrize("kwargs, message", [
    (dict(account="", partition="p"), "needs --account and --partition"),
    (dict(account="a", partition="p", nodes=2), "--nodes 2 --gpus-per-node 8 differ from the config's parallel.num_nodes=4"),
    (dict(account="a", partition="p", tunnel="ssh", ssh_host="h"), "--tunnel ssh needs --ssh-host, --ssh-user and --job-dir"),
    (dict(account="a", partition="p", mounts=["relative:/x"]), "expected /host/path:/container/path"),
    (dict(account="a", partition="p", packager="zip"), "--packager 'zip'"),
])
def test_slurm_executor_rejects_inconsistent_options(kwargs, message):
    with pytest.raises(launch.LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        launch.slurm_executor(cfg_of("swallow_70b_sft"), **kwargs)


# ---------------------------------------------------------------------------------------------
# rendering what would run


def _leftover_dryrun_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "nemo_run_dryrun-*")))


def test_executor_script_renders_the_sbatch_script(tmp_path):
    cfg = cfg_of("swallow_70b_sft", f"output_dir={tmp_path / 'run'}")
    ex = launch.slurm_executor(cfg, account="acct", partition="batch", mounts=["/lustre:/lustre"], time="12:00:00",
                               packager="none", env_vars={"EXTRA_VAR": "x"})
    before = _leftover_dryrun_dirs()
    script = launch.executor_script(run.Partial(_task_fn, x=3), ex, name="swallow_70b_sft")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --account=acct",
                 "#SBATCH --partition=batch", "#SBATCH --time=12:00:00", "#SBATCH --exclusive", "#SBATCH --mem=0",
                 "--container-image nvcr.io/nvidia/nemo:24.12", "/lustre:/lustre", "export EXTRA_VAR=x",
                 "export NCCL_NVLS_ENABLE=0", "-m nemo_run.core.runners.fdl_runner -n swallow_70b_sft"):
        assert line in script, line
    assert _leftover_dryrun_dirs() == before  # the temporary NeMo-Run home is removed
    assert ex.job_dir == ""  # the caller's executor is untouched (a clone was assigned to the dry-run experiment)
    assert not (tmp_path / "run").exists()  # nothing written where a real launch would write


def test_executor_script_renders_the_torchrun_command():
    ex = launch.local_executor(cfg_of("swallow_8b_lora"))
    script = launch.executor_script(run.Partial(_task_fn), ex, name="swallow_8b_lora")
    assert "torchrun" in script and "--nproc-per-node 8" in script and "--nnodes 1" in script
    assert "-m nemo_run.core.runners.fdl_runner -n swallow_8b_lora $NEMORUN_HOME/" in script
    assert "export TORCH_NCCL_AVOID_RECORD_STREAMS=1" in script


def test_uncovered_paths_lists_what_no_same_path_mount_shows():
    paths = ["/models/m", "/models/m-nemo", "/home/u/p/artifacts/data/x", "/home/u/p/runs/x"]
    assert launch.uncovered_paths(paths, ["/home/u/p:/home/u/p"]) == ["/models/m", "/models/m-nemo"]
    # mounted elsewhere in the container is not the same path
    assert launch.uncovered_paths(paths, ["/lustre/models:/models", "/home/u/p:/home/u/p"]) == paths[:2]
    assert launch.uncovered_paths(paths, ["/models:/models", "/home/u/p:/home/u/p:ro"]) == []
    assert launch.uncovered_paths(["/modelsX/a"], ["/models:/models"]) == ["/modelsX/a"]


# ---------------------------------------------------------------------------------------------
# the task each rank runs


def test_train_sets_up_the_process_before_running_the_recipe(monkeypatch):
    from recipes import cpu_shim
    calls = []
    monkeypatch.setattr(cpu_shim, "prepare_process", lambda cpu=None, **_: calls.append(("prepare", cpu)))
    assert launch.train(lambda: calls.append(("recipe",)) or "done", cpu=False) == "done"
    assert calls == [("prepare", False), ("recipe",)]


def test_launch_task_wraps_the_finetune_recipe_and_serializes(tmp_path):
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer
    cfg = cfg_of("swallow_8b_lora", f"model.hf_path={tmp_path / 'missing'}", f"output_dir={tmp_path / 'out'}")
    task, note = launch.launch_task(cfg, cpu=False)
    assert task.__fn_or_cls__ is launch.train and task.cpu is False
    assert task.recipe.__fn_or_cls__.__name__ == "finetune"
    assert task.recipe.trainer.devices == 8 and task.recipe.trainer.accelerator == "gpu"
    assert task.recipe.peft.dim == 8 and "config.json at launch" in note
    # what NeMo-Run ships to the ranks must survive its serializer
    ser = ZlibJSONSerializer()
    back = ser.deserialize(ser.serialize(task))
    assert back.recipe.optim.config.lr == cfg.optim.lr and back.recipe.data.global_batch_size == 32


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_dry_run_prints_validation_recipe_and_sbatch(capsys, tmp_path):
    args = finetune_like_parser().parse_args([
        "--config", "x", "--backend", "nemo", "--dry-run", "--executor", "slurm", "--account", "acct",
        "--partition", "batch", "--mount", "/models:/models", "--env", "A=1", "--packager", "none"])
    cfg = cfg_of("swallow_70b_sft", f"output_dir={tmp_path / 'run'}")
    assert launch.run_with_executor(args, cfg) == 0
    out = capsys.readouterr().out
    assert "peak:" in out and "OK" in out  # validator report
    assert "Partial[train(" in out and "Partial[finetune(" in out and "pipeline_model_parallel_size=4" in out
    assert "#SBATCH --nodes=4" in out and "export A=1" in out
    assert "WARNING: not mounted at the same path" in out and str(tmp_path / "run") in out


def test_cli_dry_run_without_executor_shows_the_gpu_recipe(capsys):
    args = finetune_like_parser().parse_args(["--config", "x", "--backend", "nemo", "--dry-run"])
    assert launch.build_executor(args, cfg_of("swallow_8b_sft")) is None
    assert launch.run_with_executor(args, cfg_of("swallow_8b_sft")) == 0
    out = capsys.readouterr().out
    assert "GPU: 1 node(s) x 8 device(s)" in out and "tensor_model_parallel_size=2" in out and "# executor" not in out


def test_cli_rejects_bad_options_and_misfit_configs(capsys):
    ap = finetune_like_parser()
    args = ap.parse_args(["--backend", "nemo", "--dry-run", "--executor", "slurm"])
    assert launch.run_with_executor(args, cfg_of("swallow_70b_sft")) == 2
    assert "needs --account and --partition" in capsys.readouterr().err
    args = ap.parse_args(["--backend", "nemo", "--dry-run", "--executor", "local", "--env", "NOVALUE"])
    assert launch.run_with_executor(args, cfg_of("swallow_8b_lora")) == 2
    assert "--env 'NOVALUE': expected KEY=VALUE" in capsys.readouterr().err
    args = ap.parse_args(["--backend", "nemo", "--executor", "local"])
    misfit = cfg_of("swallow_8b_lora", "parallel.sequence_parallel=true")
    assert launch.run_with_executor(args, misfit) == 1  # validated before anything is launched
    assert "needs tensor_model_parallel_size > 1" in capsys.readouterr().err


def test_launch_needs_the_model_dir_on_the_submitting_machine(capsys, tmp_path):
    args = finetune_like_parser().parse_args(["--backend", "nemo", "--executor", "slurm", "--account", "a",
                                              "--partition", "p"])
    cfg = cfg_of("swallow_70b_sft", f"model.hf_path={tmp_path / 'absent'}", f"output_dir={tmp_path / 'run'}")
    assert launch.run_with_executor(args, cfg) == 2
    assert "config.json is not visible on this machine" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_targets_gpu():
    assert launch.targets_gpu(cfg_of("swallow_8b_lora")) and not launch.targets_gpu(cfg_of("tiny_lora"))
