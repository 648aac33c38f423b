"""HF baseline on a tiny random Llama: real TRL/peft runs on CPU, loss falls, outputs are HF format."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.metrics import StepTimer, read_metrics
from run_checks import kill_when_step, paused_after
from tracking_checks import assert_mlflow_like_metrics, assert_resumed_mlflow_run, assert_tracked_like_metrics
from recipes.config import load_config
from recipes.finetune import main as finetune_main
from recipes.hf_backend import (PadCollator, hf_lora_targets, last_checkpoint, load_split, training_arguments,
                                validation_rows)
from recipes.tokens import IGNORE_INDEX, tokenize_pair

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data_dir(tiny_model_dir, tmp_path_factory):
    from recipes.data import prepare
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(ROOT / "datasets/demo_pairs.jsonl", out, tiny_model_dir, seq_length=256)
    return out


def _overrides(model_dir, data_dir, out, *extra):
    return [f"model.hf_path={model_dir}", f"data.dataset_dir={data_dir}", f"output_dir={out}", *extra]


def _first_last(losses, k=3):
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


@pytest.mark.parametrize("config", ["tiny_lora", "tiny_sft"])
def test_tiny_run_loss_falls_and_writes_outputs(config, tiny_model_dir, tiny_data_dir, tmp_path, mlflow_uri):
    """Also tracked in MLflow: tiny_lora on the test's MLflow server (when it can run), tiny_sft in a file: store."""
    out = tmp_path / config
    store = mlflow_uri if config == "tiny_lora" else f"file:{tmp_path / 'mlruns'}"
    tracking = [f"tracking.mlflow={store}"] if store else []
    rc = finetune_main(["--config", str(ROOT / f"nemo_configs/{config}.yaml"), "--backend", "hf",
                        *_overrides(tiny_model_dir, tiny_data_dir, out, "train.max_steps=12", *tracking)])
    assert rc == 0
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 13))
    for r in recs:
        assert r["backend"] == "hf" and r["step_time_s"] > 0
        assert r["samples"] == 8                       # global batch: 2 micro-batches of 4
        assert 0 < r["loss_tokens"] < r["tokens"] <= r["tokens_padded"]
    first, last = _first_last([r["loss"] for r in recs])
    assert last < first - 0.1, (first, last)  # a random model starts at ~ln(vocab)=6.9
    assert recs[0]["lr"] < recs[2]["lr"]        # linear warmup over the first 2 steps
    assert (out / "resolved_config.yaml").is_file()
    assert_tracked_like_metrics(out, recs)
    if store:
        client, run = assert_mlflow_like_metrics(out, recs, "hf", config)
        assert run.data.params["learning_rate"] == run.data.params["optim.lr"]  # transformers' own params too
        assert all(r["grad_norm"] > 0 for r in recs)
    if config == "tiny_lora":
        cfg = json.loads((out / "adapter/adapter_config.json").read_text())
        assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert (out / "adapter/adapter_model.safetensors").is_file()
    else:
        assert (out / "model/config.json").is_file() and (out / "model/model.safetensors").is_file()
        assert (out / "model/tokenizer_config.json").is_file()


def test_cpu_run_never_enables_bf16_or_checkpointing():
    from trl import SFTConfig
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml")
    args = SFTConfig(**training_arguments(cfg, "/tmp/x", use_cpu=True))
    assert args.bf16 is False and args.fp16 is False and args.gradient_checkpointing is False
    assert args.gradient_accumulation_steps == 2 and args.per_device_train_batch_size == 4
    assert args.lr_scheduler_type.value == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr": cfg.optim.min_lr}


def test_bf16_on_cpu_is_an_error(tiny_model_dir, tiny_data_dir, tmp_path):
    from recipes.hf_backend import HFRecipe
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml",
                      _overrides(tiny_model_dir, tiny_data_dir, tmp_path, "train.precision=bf16-mixed"))
    with pytest.raises(ValueError, match="train.precision"):
        HFRecipe(cfg).setup()


def test_lora_target_mapping():
    assert hf_lora_targets(["linear_qkv", "linear_fc1"], "llama") == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]


def test_loader_masks_prompt_and_appends_eos(tiny_model_dir, tiny_data_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = load_split(tiny_data_dir / "training.jsonl", tok, 256)
    rec = json.loads((tiny_data_dir / "training.jsonl").read_text(encoding="utf-8").splitlines()[0])
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    n_prompt = labels.count(IGNORE_INDEX)
    assert tok.decode(ids[:n_prompt]) == rec["input"]
    assert tok.decode(ids[n_prompt:-1]) == rec["output"]
    batch = PadCollator(tok.pad_token_id)(rows[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"].sum()) == sum(len(r["input_ids"]) for r in rows[:3])


def test_truncation_keeps_the_answer(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tp = tokenize_pair(tok, "長い前置き。" * 50, "最終稿です。", seq_length=32)
    assert tp.truncated and len(tp.input_ids) == 32
    assert tok.decode(tp.input_ids[tp.prompt_tokens:-1]) == "最終稿です。"


def test_tracking_off_writes_no_event_files(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "off"
    rc = finetune_main(["--config", str(ROOT / "nemo_configs/tiny_lora.yaml"), "--backend", "hf",
                        *_overrides(tiny_model_dir, tiny_data_dir, out, "train.max_steps=2", "tracking.tensorboard=false")])
    assert rc == 0 and len(read_metrics(out)) == 2
    assert not (out / "tb").exists()


def test_only_global_rank_zero_writes_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    t = StepTimer(tmp_path / "r3", backend="hf")
    t.begin()
    t.end(1, 1.0, 1e-3)
    t.close()
    assert not (tmp_path / "r3" / "metrics.jsonl").exists()
    monkeypatch.setenv("RANK", "0")
    t = StepTimer(tmp_path / "r0", backend="hf")
    t.begin()
    t.end(1, 1.0, 1e-3)
    t.close()
    assert len(read_metrics(tmp_path / "r0")) == 1


def test_tracked_scalars_are_the_records_fields(tmp_path):
    from benchmarks.metrics import TRACKED, StepRecord, tracked_scalars
    rec = StepRecord(step=3, loss=2.5, lr=1e-3, step_time_s=0.5, tokens=100, tokens_padded=128, loss_tokens=40,
                     samples=8, time_s=1.5, backend="hf", grad_norm=0.75)
    got = tracked_scalars(rec)
    assert set(got) == set(TRACKED)
    assert got["tokens_per_s"] == 200.0 and got["loss"] == 2.5 and got["samples"] == 8.0
    rec.cuda_max_allocated_bytes, rec.step_time_s, rec.loss = 2**30, 0.0, None
    got = tracked_scalars(rec)  # no loss, no time: left out, not logged as 0; GPU peak when measured
    assert "loss" not in got and "tokens_per_s" not in got and got["cuda_max_allocated_bytes"] == 2**30


def test_read_tensorboard_reads_a_summary_writers_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from benchmarks.metrics import read_tensorboard
    w = SummaryWriter(log_dir=str(tmp_path / "tb"))
    for step in (1, 2, 3):
        w.add_scalar("train/loss", 1.0 / step, step)
    w.close()
    got = read_tensorboard(tmp_path / "tb")
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3] and abs(got["train/loss"][2][1] - 1 / 3) < 1e-6
    with pytest.raises(FileNotFoundError, match="no TensorBoard"):
        read_tensorboard(tmp_path / "missing")


def test_checkpoints_every_n_steps_keep_the_newest_two():
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml", ["train.checkpoint_every_n_steps=4"])
    a = training_arguments(cfg, "/x", use_cpu=True)
    assert (a["save_strategy"], a["save_steps"], a["save_total_limit"]) == ("steps", 4, 2)
    assert a["output_dir"] == "/x/hf/checkpoints"
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml", ["train.checkpoint_every_n_steps=0"])
    assert training_arguments(cfg, "/x", use_cpu=True)["save_strategy"] == "no"


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    assert last_checkpoint(tmp_path) is None
    ckpts = tmp_path / "hf" / "checkpoints"
    for n, complete in [(4, True), (12, True), (16, False), (8, True)]:
        (ckpts / f"checkpoint-{n}").mkdir(parents=True)
        if complete:
            (ckpts / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (ckpts / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == ckpts / "checkpoint-12"  # by number, not name; 16 was cut mid-save


def test_a_resumed_timer_keeps_the_steps_up_to_its_checkpoint(tmp_path):
    t = StepTimer(tmp_path, backend="hf")
    for step in (1, 2, 3):
        t.begin()
        t.end(step, 1.0, 1e-3)
    t.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    with pytest.raises(ValueError, match="metrics.jsonl:4: not JSON"):
        read_metrics(tmp_path)
    t = StepTimer(tmp_path, backend="hf", resume_step=2)
    t.begin()
    t.end(3, 0.5, 1e-3)
    t.close()
    recs = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 1.0), (3, 0.5)]
    StepTimer(tmp_path, backend="hf").close()  # a fresh run starts the file anew
    assert read_metrics(tmp_path) == []


def _two_rank_step(rank, init_file, out_dir):
    import torch
    import torch.distributed as dist
    from benchmarks.metrics import all_reduce_sum
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        t = StepTimer(out_dir, backend="hf")  # only global rank 0 writes metrics.jsonl
        t.begin()
        t.add_batch(tokens=10 + rank, tokens_padded=16, loss_tokens=3 + rank, samples=1)
        rec = t.end(1, 1.0, 1e-3)
        t.close()
        sums = all_reduce_sum([0.25 * (rank + 1), 2.0], torch.float64)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
            {"counts": [rec.tokens, rec.tokens_padded, rec.loss_tokens, rec.samples], "sums": sums}))
    finally:
        dist.destroy_process_group()


def test_step_counts_and_sums_are_over_every_rank(tmp_path):
    """Two gloo processes: each rank's step record counts both ranks' micro-batches (rank 0's is the one
    written), and all_reduce_sum gives every rank the same sums."""
    import torch.multiprocessing as mp
    mp.start_processes(_two_rank_step, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    rec, = read_metrics(tmp_path)
    assert (rec["tokens"], rec["tokens_padded"], rec["loss_tokens"], rec["samples"]) == (21, 32, 7, 2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"counts": [21, 32, 7, 2], "sums": [0.75, 4.0]}


def test_lora_under_bf16_mixed_keeps_the_frozen_base_in_bf16(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """bf16-mixed LoRA holds the frozen base in bf16 as NeMo and the bridge do, the adapters in fp32, the matmuls
    under autocast: run for real here on the CPU (torch's CPU autocast; the CPU rule "fp32 only" is lifted for
    this test), two steps, an fp32 adapter written. Full SFT and fp32 runs load fp32 weights."""
    import torch
    from safetensors.torch import load_file
    from recipes import hf_backend
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml", _overrides(
        tiny_model_dir, tiny_data_dir, tmp_path / "run", "train.precision=bf16-mixed", "train.max_steps=2",
        "train.limit_val_batches=0", "tracking.tensorboard=false"))
    assert hf_backend.weights_dtype(cfg) == torch.bfloat16
    for other in ({"method": "sft"}, {"train.precision": "fp32"}):
        assert hf_backend.weights_dtype(cfg.replace(**other)) == torch.float32, other
    monkeypatch.setattr(hf_backend, "check_runs_on_cpu", lambda cfg: None)
    recipe = hf_backend.HFRecipe(cfg)
    recipe.setup()
    dtypes = {}
    for name, p in recipe.trainer.model.named_parameters():
        dtypes.setdefault(("lora" if "lora_" in name else "base", p.requires_grad), set()).add(p.dtype)
    assert dtypes == {("base", False): {torch.bfloat16}, ("lora", True): {torch.float32}}
    assert recipe.trainer.args.bf16
    try:
        out = recipe.train()
    finally:
        recipe.cleanup()
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2] and all(6 < r["loss"] < 8 for r in recs)
    assert {w.dtype for w in load_file(str(out / "adapter_model.safetensors")).values()} == {torch.float32}


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    """LoRA, 8 steps, a Trainer checkpoint every 4. Killed once step 6 is logged, the same command resumes from
    hf/checkpoints/checkpoint-4 (weights, optimizer, scheduler, RNG, data position): steps 1-4 kept as written,
    5-8 trained again with the data, lr and loss of an uninterrupted run; the adapter is written at the end.
    MLflow: the rerun ends the killed run (left RUNNING) as KILLED and starts one tagged with it."""
    overrides = ("train.max_steps=8", "train.checkpoint_every_n_steps=4", "tracking.tensorboard=false")
    cmd = [sys.executable, "-m", "recipes.finetune", "--config", str(ROOT / "nemo_configs/tiny_lora.yaml"),
           "--backend", "hf"]
    ref = tmp_path / "reference"
    r = subprocess.run([*cmd, *_overrides(tiny_model_dir, tiny_data_dir, ref, *overrides)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    reference = read_metrics(ref)

    out = tmp_path / "resume"
    args = [*cmd, *_overrides(tiny_model_dir, tiny_data_dir, out, *overrides, f"tracking.mlflow=file:{tmp_path / 'mlruns'}")]
    proc = subprocess.Popen(args, cwd=ROOT, env=paused_after(6), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    killed = kill_when_step(proc, out / "metrics.jsonl", 6)
    assert [r["step"] for r in killed][:6] == [1, 2, 3, 4, 5, 6] and len(killed) < 8, "not killed mid-way"
    assert last_checkpoint(out).name == "checkpoint-4" and not (out / "adapter").exists()
    killed_run = json.loads((out / "mlflow_run.json").read_text())["run_id"]

    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "hf: resuming from" in r.stdout and "(step 4)" in r.stdout
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert resumed[:4] == killed[:4]
    assert [r["time_s"] for r in resumed[4:6]] != [r["time_s"] for r in killed[4:6]]  # 5-6 were trained again
    for got, want in zip(resumed, reference):
        assert (got["tokens"], got["loss_tokens"], got["lr"]) == (want["tokens"], want["loss_tokens"], want["lr"])
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5), got["step"]
    assert sorted(p.name for p in (out / "hf" / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert_resumed_mlflow_run(out, killed_run, resumed[4:], "hf", "tiny_lora")


def test_validation_uses_whole_global_batches_as_nemo_does():
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml", ["train.limit_val_batches=2", "train.val_check_interval=0"])
    assert cfg.train.global_batch_size == 8
    rows = list(range(21))
    assert validation_rows(cfg, rows) == rows[:16]         # two whole global batches of 8
    assert validation_rows(cfg, rows[:12]) == rows[:8]     # the incomplete second batch is dropped
    assert validation_rows(cfg, rows[:7]) == []            # less than one batch: no validation
    a = training_arguments(cfg, "/x", use_cpu=True)
    assert (a["eval_strategy"], a["eval_steps"]) == ("steps", cfg.train.max_steps)  # 0: once, after the last step
    cfg = load_config(ROOT / "nemo_configs/tiny_lora.yaml", ["train.limit_val_batches=0", "train.val_check_interval=5"])
    assert training_arguments(cfg, "/x", use_cpu=True)["eval_strategy"] == "no"
