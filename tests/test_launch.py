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
    # NeMo-Run's experiment dir is <job dir>/experiments/<name>/<id> (run_with_executor's base_dir): the local
    # tunnel's job dir must be <base_dir>/experiments, where NeMo-Run 0.3.0 writes the sbatch script it submits;
    # by default NeMo-Run's own home, where its commands find experiments
    from nemo_run.config import NEMORUN_HOME
    assert isinstance(ex.tunnel, run.LocalTunnel) and ex.tunnel.job_dir == os.path.join(NEMORUN_HOME, "experiments")
    assert launch.experiment_base_dir(ex) == NEMORUN_HOME and not launch.slurm_is_cpu(ex)
    mine = launch.slurm_executor(cfg, account="a", partition="p", job_dir=str(tmp_path / "jobs"))
    assert launch.experiment_base_dir(mine) == str(tmp_path / "jobs") and mine.tunnel.job_dir == str(tmp_path / "jobs" / "experiments")
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


def test_slurm_cpu_job_without_a_container(tmp_path):
    """A CPU config (fp32, one device) is a CPU job: no GPU, memory or exclusive-node request; --container-image
    none takes the container off and puts this python's bin dir first on the job's PATH."""
    import sys
    cfg = cfg_of("tiny_lora", f"output_dir={tmp_path / 'run'}")
    ex = launch.slurm_executor(cfg, account="a", partition="cpu", container_image="none", packager="none")
    assert (ex.nodes, ex.ntasks_per_node, ex.gpus_per_node, ex.gres, ex.mem, ex.exclusive) == (1, 1, None, None, None, None)
    assert ex.container_image is None and ex.container_mounts == [] and ex.setup_lines == launch.HOST_SRUN
    assert ex.env_vars["PATH"] == f"{Path(sys.executable).parent}:$PATH" and launch.slurm_is_cpu(ex)
    # --gpus-per-node 0: any config as a CPU job, one task per train.num_devices
    two = launch.slurm_executor(cfg_of("tiny_lora", "train.num_devices=2"), account="a", partition="p", gpus_per_node=0)
    assert two.ntasks_per_node == 2 and launch.slurm_is_cpu(two) and two.container_image == launch.DEFAULT_CONTAINER_IMAGE
    # a GPU config keeps the GPU job unless asked
    assert launch.slurm_executor(cfg_of("swallow_8b_lora"), account="a", partition="p").gres == "gpu:8"
    with pytest.raises(launch.LaunchError, match="--mount '/a:/a' with --container-image none: without a container"):
        launch.slurm_executor(cfg, account="a", partition="p", container_image="none", mounts=["/a:/a"])
    with pytest.raises(launch.LaunchError, match="--gpus-per-node -1: expected 0"):
        launch.slurm_executor(cfg, account="a", partition="p", gpus_per_node=-1)
    with pytest.raises(launch.LaunchError, match="or give --gpus-per-node 0 for a CPU job"):
        launch.slurm_executor(cfg_of("swallow_8b_lora"), account="a", partition="p", gpus_per_node=4)


def test_host_srun_turns_the_pyxis_options_into_host_paths(tmp_path):
    """HOST_SRUN in bash, in front of an `srun` that prints its arguments: the srun line NeMo-Run writes
    (tests/test_slurm.py runs it under a real Slurm)."""
    import subprocess
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    script = launch.HOST_SRUN + """
srun --output /j/log-x_%j.out --container-image img --container-mounts /jobs/e/x:/nemo_run,/same:/same \\
    --container-workdir /nemo_run/code --wait=60 --kill-on-bad-exit=1 python -m m -n x /nemo_run/configs/x_fn "a b"
"""
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                       env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, check=True)
    assert r.stdout.splitlines() == ["--output", "/j/log-x_%j.out", "--chdir", "/jobs/e/x/code", "--wait=60",
                                     "--kill-on-bad-exit=1", "python", "-m", "m", "-n", "x",
                                     "/jobs/e/x/configs/x_fn", "a b"]


def test_set_rendezvous_default_leaves_a_slurm_task_to_lightning():
    from recipes.cpu_shim import set_rendezvous_default
    env = {}
    set_rendezvous_default(env)
    assert env == {"MASTER_ADDR": "127.0.0.1"}
    env = {"SLURM_NTASKS": "16", "SLURM_NODELIST": "dgx[01-02]"}  # a 2-node job: dgx01 is the address
    set_rendezvous_default(env)
    assert "MASTER_ADDR" not in env
    env = {"MASTER_ADDR": "10.0.0.1"}
    set_rendezvous_default(env)
    assert env == {"MASTER_ADDR": "10.0.0.1"}


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


def test_executor_script_renders_a_cpu_job_without_a_container(tmp_path):
    cfg = cfg_of("tiny_lora", f"output_dir={tmp_path / 'run'}", "train.num_devices=2")
    ex = launch.slurm_executor(cfg, account="acct", partition="cpu", gpus_per_node=0, container_image="none",
                               packager="none")
    script = launch.executor_script(run.Partial(_task_fn), ex, name="tiny_lora")
    assert "#SBATCH --ntasks-per-node=2" in script and "--kill-on-bad-exit=1" in script
    for absent in ("--gpus-per-node", "--gres", "--mem", "--exclusive"):
        assert absent not in script, absent
    assert "--container-image " not in script.split("# Command 1")[1]  # no image on NeMo-Run's srun line
    # the srun function is defined before NeMo-Run's srun line, after its `srun ... hostname` (plain srun)
    assert script.index("srun() {") < script.index("# Command 1") and script.index("hostname") < script.index("srun() {")
    assert f"export PATH={Path(__import__('sys').executable).parent}:$PATH" in script


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
    assert cfg_of("swallow_8b_lora").targets_gpu and not cfg_of("tiny_lora").targets_gpu
