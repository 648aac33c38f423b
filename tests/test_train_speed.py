"""benchmarks.runs and benchmarks.train_speed: fingerprints, the refusal to compare unlike runs (on
recorded fixtures), the command line, and (slow) a real two-backend benchmark of the tiny config."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from benchmarks.runs import (RunsDiffer, check_comparable, compare_runs, data_fingerprint, load_run,
                             model_fingerprint)
from benchmarks.train_speed import main
from run_checks import require_bridge_python

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests/fixtures/bench/runs"


@pytest.fixture
def runs(tmp_path) -> dict:
    """Writable copies of the recorded nemo and hf run dirs: {backend: path}."""
    shutil.copytree(FIXTURES, tmp_path / "runs")
    return {b: tmp_path / "runs" / b for b in ("nemo", "hf")}


def _edit_yaml(path: Path, key: str, value) -> None:
    d = yaml.safe_load(path.read_text())
    node = d
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    path.write_text(yaml.safe_dump(d))


def _edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_recorded_runs_are_comparable(runs):
    a, b = load_run(runs["nemo"]), load_run(runs["hf"])
    assert (a.backend, b.backend) == ("nemo", "hf")
    assert a.config["output_dir"] != b.config["output_dir"]  # differs by design and is ignored
    assert compare_runs([a, b]) == []
    check_comparable([a, b])


def test_refuses_different_hyperparameters(runs):
    _edit_yaml(runs["hf"] / "resolved_config.yaml", "optim.lr", 0.02)
    _edit_yaml(runs["hf"] / "resolved_config.yaml", "train.micro_batch_size", 2)
    diff = compare_runs([load_run(runs["nemo"]), load_run(runs["hf"])])
    assert diff == ["config optim.lr: nemo=0.01, hf=0.02", "config train.micro_batch_size: nemo=4, hf=2"]
    with pytest.raises(RunsDiffer, match="optim.lr"):
        check_comparable([load_run(runs["nemo"]), load_run(runs["hf"])])


def test_warmup_setting_and_name_do_not_matter(runs):
    _edit_yaml(runs["hf"] / "resolved_config.yaml", "train.warmup_steps_excluded", 3)
    _edit_yaml(runs["hf"] / "resolved_config.yaml", "name", "renamed")
    assert compare_runs([load_run(runs["nemo"]), load_run(runs["hf"])]) == []


def test_refuses_different_data_model_hardware_and_failed_runs(runs):
    def data(d):
        d["data"]["sha256"]["training.jsonl"] = "0" * 64

    def model(d):
        d["model"]["fingerprint"]["weight_bytes"]["model.safetensors"] += 4

    _edit_json(runs["hf"] / "bench_run.json", data)
    _edit_json(runs["hf"] / "bench_run.json", model)
    _edit_json(runs["nemo"] / "bench_run.json", lambda d: d.update(status="failed", returncode=1))
    samples = (runs["hf"] / "samples.jsonl").read_text().splitlines()
    meta = json.loads(samples[0])
    meta["gpus"] = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 1}]
    (runs["hf"] / "samples.jsonl").write_text("\n".join([json.dumps(meta)] + samples[1:]) + "\n")
    diff = compare_runs([load_run(runs["nemo"]), load_run(runs["hf"])])
    text = "\n".join(diff)
    assert "data training.jsonl sha256: nemo=" in text and "hf=000000000000" in text
    assert "model fingerprint" in text
    assert "hardware (GPUs seen by NVML): nemo=none, hf=['NVIDIA H100 80GB HBM3']" in text
    assert "run nemo: status 'failed' (exit code 1)" in text
    assert len(diff) == 4


def test_data_fingerprint_tracks_content(tmp_path):
    (tmp_path / "training.jsonl").write_text('{"input": "a", "output": "b"}\n')
    (tmp_path / "validation.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("not data")
    fp = data_fingerprint(tmp_path)
    assert sorted(fp) == ["training.jsonl", "validation.jsonl"]
    (tmp_path / "training.jsonl").write_text('{"input": "a", "output": "c"}\n')
    fp2 = data_fingerprint(tmp_path)
    assert fp2["training.jsonl"] != fp["training.jsonl"] and fp2["validation.jsonl"] == fp["validation.jsonl"]
    with pytest.raises(FileNotFoundError, match="no prepared"):
        data_fingerprint(tmp_path / "missing")


def test_model_fingerprint(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    fp = model_fingerprint(tmp_path)
    assert fp["weight_bytes"] == {"model.safetensors": 10} and list(fp["sha256"]) == ["config.json"]
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_fingerprint(tmp_path / "nope")


def test_load_run_errors_name_the_file(runs, tmp_path):
    (runs["hf"] / "metrics.jsonl").write_text('{"step": 1, "step_time_s": "slow", "tokens": 1, "samples": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: field step_time_s"):
        load_run(runs["hf"])
    with pytest.raises(FileNotFoundError, match="resolved_config.yaml"):
        load_run(tmp_path)


def test_cli_refuses_existing_run_dir_and_bad_backends(tmp_path, capsys):
    (tmp_path / "runs" / "hf").mkdir(parents=True)
    cfg = str(ROOT / "nemo_configs/tiny_lora.yaml")
    assert main(["--config", cfg, "--backends", "hf", "--steps", "2", "--output", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", cfg, "--backends", "hf,tf", "--output", str(tmp_path)])
    assert main(["--config", cfg, "--output", str(tmp_path / "x"), "train.seq_length=zero"]) == 2
    assert "train.seq_length" in capsys.readouterr().err


@pytest.mark.slow
def test_real_benchmark_of_the_three_backends(tiny_model_dir, tmp_path):
    """3 steps of the tiny LoRA config with NeMo, HF, then Megatron-Bridge (its own venv), sampled, checked and
    reported."""
    require_bridge_python()
    out = tmp_path / "bench"
    rc = main(["--config", str(ROOT / "nemo_configs/tiny_lora.yaml"), "--backends", "nemo,hf,bridge", "--steps", "3",
               "--output", str(out), "--interval", "0.25", f"model.hf_path={tiny_model_dir}",
               f"data.dataset_dir={tmp_path / 'data'}", f"data.source={ROOT / 'datasets/demo_pairs.jsonl'}"])
    assert rc == 0
    for b in ("nemo", "hf", "bridge"):
        d = out / "runs" / b
        info = json.loads((d / "bench_run.json").read_text())
        assert info["status"] == "ok" and info["env"]["OMP_NUM_THREADS"]
        assert info["data"]["sha256"] == data_fingerprint(tmp_path / "data")
        run = load_run(d)
        assert [r["step"] for r in run.metrics] == [1, 2, 3] and run.backend == b
        assert all(r["mono_s"] is not None for r in run.metrics)
        assert run.samples["samples"] and run.samples["end"]["n_samples"] == len(run.samples["samples"])
        # the steps happened while the sampler watched: its clock brackets them
        t = [s["t_mono"] for s in run.samples["samples"]]
        assert t[0] < run.metrics[0]["mono_s"] and run.metrics[-1]["mono_s"] < t[-1] + 0.3
    report = (out / "report.md").read_text()
    assert "Training benchmark (CPU)" in report and "t_hf / t_nemo" in report
    assert "t_nemo / t_bridge" in report
    bridge_info = json.loads((out / "runs" / "bridge" / "bench_run.json").read_text())
    assert bridge_info["versions"]["megatron-bridge"] and bridge_info["versions"]["megatron-core"].startswith("0.16")
    summary = json.loads((out / "summary.json").read_text())
    bv = summary["bridge_vs_nemo"]
    assert bv["same_tokens_every_step"] and bv["steps_compared"] == 3  # the same samples in the same order
    assert bv["lr_differs_steps"] == [1, 2]  # only the warmup formula differs (tiny_lora: warmup_steps 2)
    assert all((out / p).is_file() for p in ("step_time.png", "utilization.png", "memory.png", "loss.png"))


def test_keep_going_reports_the_backends_that_ran_and_why_one_failed(tiny_model_dir, tmp_path, monkeypatch):
    """--keep-going (what the GPU smoke test runs with): the bridge fails (its python is missing), HF still
    trains; the report covers HF, summary.json says why the bridge failed, the exit code is 1. Without the flag
    the first failure stops the benchmark."""
    monkeypatch.setenv("FUNDCOMMENT_BRIDGE_PYTHON", str(tmp_path / "no-such-python"))
    common = ["--config", str(ROOT / "nemo_configs/tiny_lora.yaml"), "--steps", "2", "--interval", "0.25",
              f"model.hf_path={tiny_model_dir}", f"data.dataset_dir={tmp_path / 'data'}",
              f"data.source={ROOT / 'datasets/demo_pairs.jsonl'}"]
    assert main([*common, "--backends", "bridge,hf", "--output", str(tmp_path / "stop")]) == 1
    assert not (tmp_path / "stop" / "runs" / "hf").exists()
    out = tmp_path / "bench"
    assert main([*common, "--backends", "bridge,hf", "--output", str(out), "--keep-going"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [r["backend"] for r in summary["runs"]] == ["hf"]
    assert set(summary["failed"]) == {"bridge"} and "no-such-python" in summary["failed"]["bridge"]
    assert json.loads((out / "runs" / "bridge" / "bench_run.json").read_text())["status"] == "failed"
    assert (out / "report.md").is_file()


def test_a_run_past_its_timeout_is_stopped_with_its_children(tiny_model_dir, tmp_path, capsys):
    """--timeout-s: the bridge's run (recipes.finetune and the bridge python it starts) is stopped while it
    starts up; bench_run.json says "timed out" and no process of the run is left."""
    import psutil
    require_bridge_python()
    out = tmp_path / "bench"
    rc = main(["--config", str(ROOT / "nemo_configs/tiny_lora.yaml"), "--backends", "bridge", "--steps", "2",
               "--output", str(out), "--timeout-s", "8", "--keep-going", f"model.hf_path={tiny_model_dir}",
               f"data.dataset_dir={tmp_path / 'data'}", f"data.source={ROOT / 'datasets/demo_pairs.jsonl'}"])
    assert rc == 1
    info = json.loads((out / "runs" / "bridge" / "bench_run.json").read_text())
    assert info["status"] == "timed out" and info["timeout_s"] == 8 and info["wall_s"] < 8 + 45
    assert "timed out after 8 s" in capsys.readouterr().err
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
            if str(out / "runs" / "bridge") in " ".join(p.info["cmdline"] or [])]
    assert left == []


def test_hf_with_several_processes_goes_through_torchrun(tmp_path):
    from benchmarks.train_speed import backend_command
    one = backend_command("c.yaml", "hf", tmp_path, ["train.max_steps=2"])
    assert one[1:3] == ["-m", "recipes.finetune"] and one[-1] == "train.max_steps=2"
    two = backend_command("c.yaml", "hf", tmp_path, [], processes=2)
    assert two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert two[5:7] == ["-m", "recipes.finetune"]
    # NeMo's Lightning trainer starts its own processes from train.num_devices
    assert backend_command("c.yaml", "nemo", tmp_path, [], processes=2)[1:3] == ["-m", "recipes.finetune"]


def test_bridge_with_several_processes_is_its_own_venvs_torchrun(tmp_path, monkeypatch):
    import sys
    from benchmarks.train_speed import backend_command
    monkeypatch.setenv("FUNDCOMMENT_BRIDGE_PYTHON", sys.executable)  # any existing python stands in for the venv's
    one = backend_command("c.yaml", "bridge", tmp_path, ["x=1"])
    assert one[1:3] == ["-m", "recipes.finetune"] and one[one.index("--backend") + 1] == "bridge"
    two = backend_command("c.yaml", "bridge", tmp_path, ["x=1"], processes=2)
    assert two[0] == sys.executable and two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert two[5:8] == ["-m", "recipes.bridge_backend", "run"] and two[-1] == "x=1"
    monkeypatch.setenv("FUNDCOMMENT_BRIDGE_PYTHON", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="make bridge-install"):
        backend_command("c.yaml", "bridge", tmp_path, [], processes=2)
