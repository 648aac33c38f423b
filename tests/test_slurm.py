"""A real Slurm on this machine (tests/slurm_cluster.py: slurmctld + slurmd + munge, one node, 127.0.0.1) and
`python -m recipes.finetune --backend nemo --executor slurm` submitting through NeMo-Run's SlurmExecutor as on a
cluster, with no container (``--container-image none``) and the code at the same path (``--packager none``).

The jobs are read back from Slurm itself (``scontrol show job``: state and exit code; the jobcomp/filetxt
record; there is no slurmdbd, so no ``sacct`` and no NeMo-Run status, which calls sacct), from the job's log
and from the run's metrics.jsonl and checkpoints:

- one task trains the tiny LoRA to the end (COMPLETED, exit 0:0), run by the srun line NeMo-Run wrote, without
  Pyxis options;
- two tasks (``train.num_devices=2``, a CPU job: data parallel over gloo, ranks from Slurm's SLURM_PROCID)
  give the one-task job's loss at every step;
- ``scancel`` after the first checkpoint, then the same command: the job continues from that checkpoint;
- one rank killed mid-step: srun's ``--kill-on-bad-exit=1`` (NeMo-Run's) ends the other rank and the job is
  FAILED within seconds;
- ``--backend bridge``: two tasks, each the bridge venv's python running ``recipes.bridge_backend`` (ranks from
  Slurm's variables), train the tiny LoRA to the end and leave one adapter.

Skipped without slurm-wlm/munge (`make slurm`), unless FUNDCOMMENT_REQUIRE_SERVER=1 (`make test`): then it fails.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, SlurmError, missing_commands

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "nemo_configs" / "tiny_lora.yaml"
# micro-batch 1 as in tests/test_distributed.py: one task and two data-parallel tasks then see the same samples
COMMON = ["train.micro_batch_size=1", "train.global_batch_size=8", "train.val_check_interval=0",
          "tracking.tensorboard=false"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")


def require_slurm() -> None:
    missing = missing_commands()
    if missing:
        msg = f"Slurm not installed ({', '.join(missing)} missing): `make slurm` (apt-get install slurm-wlm munge)"
        if os.environ.get("FUNDCOMMENT_REQUIRE_SERVER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def test_the_cluster_fixture_stops_what_it_started(tmp_path):
    """A cluster of its own, started and stopped: none of its daemons is left, also when its start fails."""
    require_slurm()
    with SlurmCluster(tmp_path / "c") as cluster:
        assert cluster.node_state() == "idle"
        procs = dict(cluster.procs)
    assert set(procs) == {"munged", "slurmctld", "slurmd"}
    assert all(p.poll() is not None for p in procs.values())

    class Broken(SlurmCluster):
        def _write_config(self):
            super()._write_config()
            self.conf.write_text(self.conf.read_text() + "NoSuchOption=1\n")

    broken = Broken(tmp_path / "broken")
    with pytest.raises(SlurmError, match="slurmctld"):
        broken.start()
    assert broken.procs and all(p.poll() is not None for p in broken.procs.values())  # munged was stopped


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """One cluster for the module (~2 s to start); stopped at the end, whatever happened."""
    require_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    with cluster:
        yield cluster


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The tiny model (its data and NeMo import are made by the first submission, on the submitting side)."""
    from recipes.models import build_tiny
    d = tmp_path_factory.mktemp("slurm_inputs")
    build_tiny(d / "model")
    return d


def submit(slurm: SlurmCluster, out: Path, inputs: Path, *extra: str, backend: str = "nemo") -> dict:
    """`python -m recipes.finetune ... --executor slurm` (returns once sbatch took the job); its slurm_job.json."""
    cmd = [sys.executable, "-m", "recipes.finetune", "--config", str(CONFIG), "--backend", backend, "--output", str(out),
           "--executor", "slurm", "--account", "fundcomment", "--partition", slurm.partition,
           "--container-image", "none", "--packager", "none", "--env", "OMP_NUM_THREADS=1",
           f"model.hf_path={inputs / 'model'}", f"data.dataset_dir={inputs / 'data'}", *COMMON, *extra]
    env = {**slurm.env, "NEMORUN_HOME": str(out.parent / "nemorun_home"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = json.loads((out / "slurm_job.json").read_text())
    assert f"submitted: Slurm job {job['job_id']}" in r.stdout
    return job


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def finished(slurm: SlurmCluster, job: dict, timeout: float = 300) -> dict:
    info = slurm.wait_job(job["job_id"], ENDED, timeout)
    return info


def job_processes(job_id: str) -> dict[str, int]:
    """{SLURM_PROCID: pid} of the job's python ranks (the fdl_runner processes srun started)."""
    ranks = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode() and b"nemo_run.core.runners.fdl_runner" in cmd:
            ranks[env[b"SLURM_PROCID"].decode()] = int(d.name)
    return ranks


@pytest.fixture(scope="module")
def one_task(slurm, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm_one") / "run"
    job = submit(slurm, out, inputs, "train.max_steps=4")
    return out, job, finished(slurm, job)


@pytest.mark.slow
def test_a_slurm_job_trains_the_tiny_lora_to_the_end(slurm, one_task):
    from recipes import nemo_recipe as nr
    out, job, info = one_task
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), slurm.log_tail()
    assert {"JobId": job["job_id"], "JobState": "COMPLETED"}.items() <= {
        **next(r for r in slurm.completed_jobs() if r["JobId"] == job["job_id"])}.items()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert all(r["samples"] == 8 and r["backend"] == "nemo" for r in metrics(out))
    assert nr.checkpoint_step(nr.last_checkpoint(out)) == 3  # NeMo names it by the 0-based step index
    log = Path(job["log"]).read_text()
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in log
    # the srun line NeMo-Run wrote, as the batch script ran it (set -x): no Pyxis options left, host paths
    ran = [line for line in Path(job["batch_log"]).read_text().splitlines() if line.startswith("+ command srun")]
    assert len(ran) == 1 and "--container" not in ran[0] and " /nemo_run/" not in ran[0], ran  # no container path
    assert "--kill-on-bad-exit=1" in ran[0] and "python -m nemo_run.core.runners.fdl_runner" in ran[0]
    assert f"export PATH={Path(sys.executable).parent}:$PATH" in Path(job["sbatch_script"]).read_text()
    # NeMo-Run's own commands find the experiment in its home (its status needs sacct: none here)
    code = "import sys, nemo_run as run; print(run.Experiment.from_id(sys.argv[1]).jobs[0].handle)"
    r = subprocess.run([sys.executable, "-c", code, job["experiment_id"]], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "NEMORUN_HOME": str(out.parent / "nemorun_home")})
    assert r.returncode == 0 and r.stdout.strip().endswith(f"/{job['job_id']}"), r.stdout + r.stderr[-2000:]


@pytest.mark.slow
def test_two_slurm_tasks_train_data_parallel_like_one(slurm, inputs, one_task, tmp_path):
    """train.num_devices=2 as a CPU job: srun starts two ranks (no torchrun; Lightning's SLURMEnvironment)."""
    out = tmp_path / "run"
    job = submit(slurm, out, inputs, "train.max_steps=4", "train.num_devices=2", "--gpus-per-node", "0")
    info = finished(slurm, job)
    assert (info["JobState"], info["ExitCode"], info["NumTasks"]) == ("COMPLETED", "0:0", "2"), slurm.log_tail()
    one, two = metrics(one_task[0]), metrics(out)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert (a["tokens"], a["samples"]) == (b["tokens"], b["samples"])  # summed over both ranks


@pytest.mark.slow
def test_scancel_then_the_same_command_resumes_from_the_last_checkpoint(slurm, inputs, one_task, tmp_path):
    from recipes import nemo_recipe as nr
    out = tmp_path / "run"
    steps = ["train.max_steps=150", "train.checkpoint_every_n_steps=25"]
    first = submit(slurm, out, inputs, *steps)
    deadline = time.monotonic() + 300
    while True:
        try:
            ckpt = nr.last_checkpoint(out)
            break
        except FileNotFoundError:
            assert slurm.job(first["job_id"]).get("JobState") in ("PENDING", "RUNNING"), slurm.job(first["job_id"])
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    slurm.run("scancel", first["job_id"])
    t_cancel = time.monotonic()
    info = finished(slurm, first, 120)
    cancelled_after = time.monotonic() - t_cancel
    assert info["JobState"] == "CANCELLED", info
    before = metrics(out)
    assert before and before[-1]["step"] < 150, "the job ended before scancel"
    # steps done at the newest finished checkpoint (another may have followed the first; NeMo's names are 0-based)
    saved = nr.checkpoint_step(nr.last_checkpoint(out)) + 1
    assert saved > nr.checkpoint_step(ckpt) and saved % 25 == 0 and saved < before[-1]["step"] + 1

    t_resubmit = time.monotonic()
    second = submit(slurm, out, inputs, *steps)
    info = finished(slurm, second)
    resumed_in = time.monotonic() - t_resubmit
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), slurm.log_tail()
    after = metrics(out)
    assert [r["step"] for r in after] == list(range(1, 151))  # no step twice, none missing
    assert after[:saved] == before[:saved]  # the steps up to the checkpoint are the first job's
    log = Path(second["log"]).read_text()
    assert f"step={saved - 1}" in log and "`Trainer.fit` stopped: `max_steps=150` reached." in log
    print(f"scancel at step {before[-1]['step']} (checkpoint after step {saved}): CANCELLED after {cancelled_after:.1f} s; "
          f"the same command again: submitted and finished steps {saved + 1}-150 in {resumed_in:.1f} s")


@pytest.mark.slow
def test_a_killed_rank_fails_the_slurm_job_quickly(slurm, inputs, one_task, tmp_path):
    """SIGKILL of rank 1's process: srun (--kill-on-bad-exit=1) terminates rank 0, the batch script exits non-zero."""
    from recipes import nemo_recipe as nr
    out = tmp_path / "run"
    job = submit(slurm, out, inputs, "train.max_steps=400", "train.num_devices=2", "--gpus-per-node", "0")
    deadline = time.monotonic() + 300
    while len(metrics(out)) < 2:
        assert slurm.job(job["job_id"]).get("JobState") in ("PENDING", "RUNNING"), slurm.log_tail()
        assert time.monotonic() < deadline, "the job did not reach step 2"
        time.sleep(0.3)
    ranks = job_processes(job["job_id"])
    assert set(ranks) == {"0", "1"}, ranks
    for pid in ranks.values():  # the ranks' `python` is this (venv's) python: its bin dir leads the job's PATH
        env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
        assert env[b"PATH"].decode().split(":")[0] == str(Path(sys.executable).parent), env[b"PATH"]
    os.kill(ranks["1"], signal.SIGKILL)
    t_kill = time.monotonic()
    info = finished(slurm, job, 180)
    ended_after = time.monotonic() - t_kill
    print(f"killed rank 1 at step {len(metrics(out))}: job {info['JobState']} {info['ExitCode']} {ended_after:.1f} s later")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert ended_after < 60, ended_after
    assert job_processes(job["job_id"]) == {}  # rank 0 is gone too
    batch_log = Path(job["batch_log"]).read_text()  # srun's own messages go to the batch script's output
    assert "task 1: Killed" in batch_log and "task 0: Terminated" in batch_log, batch_log[-3000:]
    assert "job exited with code 143" in batch_log  # NeMo-Run's script passes srun's status on
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and len(records) < 400
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        nr.last_checkpoint(out)


@pytest.mark.slow
def test_a_slurm_job_of_the_bridge_backend_trains_the_tiny_lora(slurm, inputs, tmp_path):
    """`--backend bridge --executor slurm`, a CPU job of two tasks without a container: the inputs and the bridge's
    base checkpoint are made before sbatch, each task is `.venv-bridge/bin/python -m recipes.bridge_backend run`."""
    from recipes.bridge_recipe import bridge_python
    try:
        py = bridge_python()
    except FileNotFoundError as e:
        if os.environ.get("FUNDCOMMENT_REQUIRE_SERVER") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    out = tmp_path / "run"
    job = submit(slurm, out, inputs, "train.max_steps=3", "train.num_devices=2", "--gpus-per-node", "0",
                 backend="bridge")
    assert (Path(f"{inputs / 'model'}-megatron") / "bridge_import.json").is_file()  # made before the job
    info = finished(slurm, job)
    assert (info["JobState"], info["ExitCode"], info["NumTasks"]) == ("COMPLETED", "0:0", "2"), (
        slurm.log_tail() + Path(job["log"]).read_text()[-3000:] if Path(job["log"]).is_file() else slurm.log_tail())
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["backend"] == "bridge" and r["samples"] == 8 for r in records)  # both ranks' micro-batches
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not list(out.glob("adapter.tmp*"))
    ran = [line for line in Path(job["batch_log"]).read_text().splitlines() if line.startswith("+ command srun")]
    assert len(ran) == 1 and "--container" not in ran[0], ran
    assert f"--kill-on-bad-exit=1 {py} -m recipes.bridge_backend run --config {CONFIG} " in ran[0]
    assert Path(job["log"]).read_text().count(f"done: {out}\n") == 2  # both tasks ran to the end
