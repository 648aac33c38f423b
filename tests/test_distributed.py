"""Several training processes on one machine (torchrun, gloo), each checked against one process.

The tiny LoRA config with micro-batch 1 and global batch 8: one process accumulates 8 micro-batches, two
processes 4 each. NeMo data parallel (DP=2), NeMo tensor parallel (TP=2) and HF data parallel (DP=2) give the
loss, gradient norm and token counts of the single-process run at every step (loss within 1e-5: the sums are
reduced in another order; HF logs its loss to 4 decimals). Why micro-batch 1: NeMo's loss is the mean of the
micro-batches' per-token means, and with DP=2 Megatron's sampler gives rank r the samples r, r+2, ... of each
global batch, so with micro-batch 4 the two layouts average different micro-batches (measured: 0.009 apart at
step 1); with micro-batch 1 every micro-batch is one sample in both. Only rank 0 writes metrics.jsonl, with the
counts summed over the data-parallel ranks. A DP=2 checkpoint is continued by one process exactly as the
single-process run's own checkpoint is.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "nemo_configs" / "tiny_lora.yaml"
STEPS = 4
COMMON = ["train.micro_batch_size=1", "train.global_batch_size=8", "train.val_check_interval=0",
          "train.checkpoint_every_n_steps=0", "tracking.tensorboard=false"]


def _finetune(backend: str, out: Path, inputs: Path, nproc: int = 1, steps: int = STEPS, extra=()) -> list[dict]:
    args = ["-m", "recipes.finetune", "--config", str(CONFIG), "--backend", backend, "--output", str(out),
            f"model.hf_path={inputs / 'model'}", f"data.dataset_dir={inputs / 'data'}", f"train.max_steps={steps}",
            f"train.num_devices={nproc}", *COMMON, *extra]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{backend} x{nproc}: " + (r.stdout[-2000:] + r.stderr[-4000:])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny model whose 1,024 embedding rows NeMo need not pad at TP=2 (see the TP test), its data and NeMo
    import made by a first single-process run (so the ranks of the later runs only read them)."""
    from recipes.models import build_tiny
    d = tmp_path_factory.mktemp("distributed")
    build_tiny(d / "model", embedding_rows=1024)
    return d


@pytest.fixture(scope="module")
def one_nemo(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_nemo") / "run"
    return out, _finetune("nemo", out, inputs)


@pytest.fixture(scope="module")
def one_hf(inputs, one_nemo, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_hf") / "run"
    return out, _finetune("hf", out, inputs)


def assert_same_steps(one: list[dict], many: list[dict], loss_tol: float) -> None:
    assert [r["step"] for r in many] == [r["step"] for r in one] == list(range(1, len(one) + 1))  # rank 0 alone
    for a, b in zip(one, many):
        assert abs(a["loss"] - b["loss"]) <= loss_tol, (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
        # the whole global batch's counts, summed over the data-parallel ranks, not rank 0's share
        assert (a["tokens"], a["loss_tokens"], a["samples"]) == (b["tokens"], b["loss_tokens"], b["samples"]), a["step"]
        assert b["lr"] == pytest.approx(a["lr"])


@pytest.mark.slow
def test_nemo_data_parallel_matches_one_process(one_nemo, inputs, tmp_path_factory):
    """With the inputs not made yet (a copy of the model, no NeMo import, no prepared data): the ranks make them
    once between them (recipes.inputs.ensure_inputs, recipes.fileio.made_by_rank_zero)."""
    import shutil
    fresh = tmp_path_factory.mktemp("nemo_dp")
    shutil.copytree(inputs / "model", fresh / "model")
    many = _finetune("nemo", fresh / "run", fresh, nproc=2)
    assert_same_steps(one_nemo[1], many, loss_tol=1e-5)
    assert all(r["samples"] == 8 for r in many)
    assert sorted(p.name for p in fresh.iterdir()) == ["data", "model", "model-nemo", "run"]  # no temp dirs left


@pytest.mark.slow
def test_nemo_run_local_executor_launches_the_same_data_parallel_run(one_nemo, inputs, tmp_path_factory):
    """The launcher a DGX uses: `--executor local` is NeMo-Run's LocalExecutor with torchrun (here with gloo and
    the CPU recipe on every rank)."""
    many = _finetune("nemo", tmp_path_factory.mktemp("nemo_run_local") / "run", inputs, nproc=1,
                     extra=["train.num_devices=2", "--executor", "local"])
    assert_same_steps(one_nemo[1], many, loss_tol=1e-5)


@pytest.mark.slow
def test_nemo_tensor_parallel_matches_one_process(one_nemo, inputs, tmp_path_factory):
    many = _finetune("nemo", tmp_path_factory.mktemp("nemo_tp") / "run", inputs, nproc=2,
                     extra=["parallel.tensor_model_parallel_size=2"])
    assert_same_steps(one_nemo[1], many, loss_tol=1e-5)


@pytest.mark.slow
def test_hf_data_parallel_matches_one_process(one_hf, inputs, tmp_path_factory):
    many = _finetune("hf", tmp_path_factory.mktemp("hf_dp") / "run", inputs, nproc=2)
    assert_same_steps(one_hf[1], many, loss_tol=1e-4)


@pytest.mark.slow
def test_hf_data_parallel_run_resumes_after_a_kill(one_hf, inputs, tmp_path_factory):
    """HF, two processes, 8 steps, a Trainer checkpoint every 4: killed once step 6 is logged, the same torchrun
    command resumes from checkpoint-4 (on CPU through hf_backend.cpu_load_location: transformers maps the
    optimizer state to cpu:0, which torch.load refuses) and steps 5-8 equal an uninterrupted two-process run's."""
    from run_checks import kill_when_step, paused_after
    ckpt = ("train.checkpoint_every_n_steps=4",)
    full = _finetune("hf", tmp_path_factory.mktemp("hf_dp_full") / "run", inputs, nproc=2, steps=8, extra=ckpt)
    out = tmp_path_factory.mktemp("hf_dp_kill") / "run"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "recipes.finetune",
            "--config", str(CONFIG), "--backend", "hf", "--output", str(out), f"model.hf_path={inputs / 'model'}",
            f"data.dataset_dir={inputs / 'data'}", "train.max_steps=8", "train.num_devices=2", *COMMON, *ckpt]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=paused_after(6, env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = kill_when_step(proc, out / "metrics.jsonl", 6)
    assert [r["step"] for r in killed][:6] == [1, 2, 3, 4, 5, 6] and len(killed) < 8, "not killed mid-way"
    resumed = _finetune("hf", out, inputs, nproc=2, steps=8, extra=ckpt)
    assert [r["step"] for r in resumed] == list(range(1, 9)) and resumed[:4] == killed[:4]
    for a, b in zip(full, resumed):
        assert (a["tokens"], a["loss_tokens"], a["lr"]) == (b["tokens"], b["loss_tokens"], b["lr"]), a["step"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])


@pytest.mark.slow
def test_a_data_parallel_checkpoint_continues_in_one_process(one_nemo, inputs, tmp_path_factory):
    """Steps 5-6 from the DP=2 run's step-4 checkpoint equal steps 5-6 from the single-process checkpoint."""
    dp = tmp_path_factory.mktemp("nemo_dp_resume") / "run"
    _finetune("nemo", dp, inputs, nproc=2)
    from_dp = _finetune("nemo", dp, inputs, steps=STEPS + 2)
    from_one = _finetune("nemo", one_nemo[0], inputs, steps=STEPS + 2)
    assert [r["step"] for r in from_dp] == [r["step"] for r in from_one] == list(range(1, STEPS + 3))
    for a, b in zip(from_one[STEPS:], from_dp[STEPS:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert (a["tokens"], a["samples"]) == (b["tokens"], b["samples"])  # the same data position


def test_sequence_parallel_is_refused_before_a_run_without_te_or_apex():
    from recipes import nemo_recipe as nr
    from recipes.nemo_kernels import check_sequence_parallel
    cfg = load_config(CONFIG, ["train.num_devices=2", "parallel.tensor_model_parallel_size=2",
                               "parallel.sequence_parallel=true"])
    recipe = nr.build_recipe(cfg, "/tmp/o", cpu=True, with_model=False)
    with pytest.raises(ValueError, match="sequence parallel not supported by torch LayerNorm"):
        check_sequence_parallel(recipe)
    check_sequence_parallel(recipe, have=lambda m: m == "transformer_engine")  # the container: runs
    # what each rank gets from NeMo-Run (recipes.launch.train): the built partial, checked the same way
    import functools
    from types import SimpleNamespace
    built = functools.partial(print, trainer=SimpleNamespace(strategy=SimpleNamespace(sequence_parallel=True)))
    with pytest.raises(ValueError, match="needs Transformer Engine or Apex"):
        check_sequence_parallel(built)
    check_sequence_parallel(nr.build_recipe(load_config(CONFIG), "/tmp/o", cpu=True, with_model=False))


def test_hf_refuses_a_process_count_that_is_not_the_configs(tmp_path, monkeypatch):
    """train.num_devices=2 started as one process would train on half the global batch per step."""
    from recipes.hf_backend import HFRecipe
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config(CONFIG, ["train.num_devices=2", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="has 1 process"):
        HFRecipe(cfg).setup()
    assert not (tmp_path / "resolved_config.yaml").exists()


def test_a_checkpoint_with_its_unfinished_marker_is_not_finished(tmp_path):
    from recipes import nemo_recipe as nr
    d = nr.checkpoint_dir(tmp_path)
    for name in ("step=1", "step=3"):
        (d / name / "weights").mkdir(parents=True)
        (d / name / "context").mkdir()
    (d / "step=3-unfinished").touch()  # killed while saving step 3
    assert nr.last_checkpoint(tmp_path).name == "step=1"
    (d / "step=3-unfinished").unlink()
    assert nr.last_checkpoint(tmp_path).name == "step=3"


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_quickly_and_leaves_no_finished_run(one_nemo, inputs, tmp_path):
    """SIGKILL of rank 1 mid-run: torchrun ends rank 0 too, within seconds, with an error naming the rank; the
    metrics that were written are whole steps, and no checkpoint passes for a finished one."""
    import time

    import psutil
    from recipes import nemo_recipe as nr
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "recipes.finetune", "--config", str(CONFIG), "--backend", "nemo", "--output", str(out),
           f"model.hf_path={inputs / 'model'}", f"data.dataset_dir={inputs / 'data'}", "train.max_steps=400",
           "train.num_devices=2", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach step 2"
            time.sleep(0.5)
        ranks = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None and "recipes.finetune" in child.cmdline():
                ranks[rank] = child
        assert set(ranks) == {"0", "1"}, ranks
        ranks["1"].kill()
        t_kill = time.monotonic()
        output, _ = proc.communicate(timeout=120)
        ended_after = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"killed rank 1: the run ended {ended_after:.1f} s later, exit status {proc.returncode}")
    assert proc.returncode != 0 and ended_after < 60, (proc.returncode, ended_after)
    assert "rank" in output and ("SIGKILL" in output or "Signal 9" in output), output[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # whole lines only
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and len(records) < 400
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        nr.last_checkpoint(out)


def test_collective_timeout_reaches_the_hf_backend():
    from recipes.hf_backend import training_arguments
    cfg = load_config(CONFIG, ["train.collective_timeout_min=7"])
    assert training_arguments(cfg, "/tmp/o", use_cpu=True)["ddp_timeout"] == 420
    with pytest.raises(ConfigError, match="train.collective_timeout_min"):
        load_config(CONFIG, ["train.collective_timeout_min=0"])
