"""benchmarks.report and benchmarks.flops: the report and plots from recorded runs (tests/fixtures/bench),
statistics recomputed here independently, FLOP counts checked by hand on the tiny config, the GPU path
with a fake NVML, and runs without samples (as the demo writes them)."""
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.flops import flops_model, lora_params, matmul_params, model_shape, peak_tflops
from benchmarks.report import build_report, default_output, main, measured_records, per_step_times, percentile
from benchmarks.runs import RunsDiffer
from benchmarks.sampler import ResourceSampler

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests/fixtures/bench/runs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The tiny preset (artifacts/models/tiny/config.json, also recorded in the fixtures' bench_run.json).
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "vocab_size": 1000,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True}


@pytest.fixture
def runs(tmp_path) -> dict:
    shutil.copytree(FIXTURES, tmp_path / "runs")
    return {b: tmp_path / "runs" / b for b in ("nemo", "hf")}


def _metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _png_ok(p: Path) -> bool:
    return p.is_file() and p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000


# ---------------------------------------------------------------------------------------------
# FLOPs by hand


def test_tiny_param_count_by_hand():
    shape = model_shape(TINY)
    # per layer: q 64*64 + k,v 2*(64*32) + o 64*64 + gate/up/down 3*(64*176)
    per_layer = 4096 + 4096 + 4096 + 33792
    assert per_layer == 46080
    p = matmul_params(shape)
    assert p["per_layer"] == per_layer and p["blocks"] == 2 * 46080 == 92160
    assert p["lm_head"] == 1000 * 64 and p["n"] == 92160 + 64000 == 156160
    assert p["total"] == 156160  # tied: the head is the embedding
    assert matmul_params(model_shape({**TINY, "tie_word_embeddings": False}))["total"] == 156160 + 64000
    # LoRA r=8, NeMo shapes: qkv 8*(64+64+2*32), proj 8*(64+64), fc1 8*(64+2*176), fc2 8*(176+64)
    per_layer_lora = 8 * 192 + 8 * 128 + 8 * 416 + 8 * 240
    assert per_layer_lora == 7808
    targets = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    assert lora_params(shape, 8, targets) == 2 * 7808
    assert lora_params(shape, 8, ("linear_qkv",)) == 2 * 1536
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora_params(shape, 8, ("q_proj",))


def test_param_count_matches_the_real_hf_model():
    """N must equal the weights of every nn.Linear in the actual transformers model (LM head included)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(model_shape(TINY))["n"] == linear
    total = sum(p.numel() for p in model.parameters())
    norms = (2 * 2 + 1) * 64  # two RMSNorms per layer + the final one
    assert matmul_params(model_shape(TINY))["total"] == total - norms


def test_flops_per_token_and_per_step_by_hand():
    shape = model_shape(TINY)
    n, nl = 156160, 15616
    attn = 12 * 2 * 64  # 12 * L * q (q = 4 heads * 16)
    lora = flops_model(shape, "lora", 8, ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))
    sft = flops_model(shape, "sft")
    assert lora.per_token(100) == 4 * n + 6 * nl + attn * 100
    assert sft.per_token(100) == 6 * n + attn * 100
    # a step of 2 sequences, 300 real tokens: attention at the mean length 150
    assert lora.step_flops(300, 2) == 300 * (4 * n + 6 * nl) + attn * 300 * 150
    assert lora.step_flops(0, 0) == 0.0
    with pytest.raises(ValueError, match="method"):
        flops_model(shape, "dpo")


def test_peak_table_by_nvml_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert peak_tflops("NVIDIA H100 PCIe")[0] == 756.5
    assert peak_tflops("NVIDIA H200")[0] == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak_tflops("NVIDIA L40S")[0] == 362.05 and peak_tflops("NVIDIA L4")[0] == 121.0
    assert peak_tflops("Tesla T4") is None and peak_tflops(None) is None


# ---------------------------------------------------------------------------------------------
# statistics helpers


def test_percentile_matches_numpy():
    import numpy as np
    xs = [0.3, 0.1, 0.7, 0.2, 0.5]
    for q in (0, 10, 50, 90, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert np.isnan(percentile([], 50))  # no values


def test_records_covering_several_steps_are_divided():
    recs = [{"step": 2, "step_time_s": 1.0}, {"step": 4, "step_time_s": 0.6}, {"step": 5, "step_time_s": 0.25}]
    assert per_step_times(recs) == [(2, 0.5, 2), (4, 0.3, 2), (5, 0.25, 1)]
    kept, note = measured_records(recs, 4)
    assert [r["step"] for r in kept] == [5] and note is None
    kept, note = measured_records(recs, 9)
    assert len(kept) == 3 and "include the warm-up" in note


# ---------------------------------------------------------------------------------------------
# the report from the recorded runs


def test_report_from_recorded_runs(runs, tmp_path):
    out = tmp_path / "report"
    path = build_report([runs["nemo"], runs["hf"]], out)
    text = path.read_text()
    summary = json.loads((out / "summary.json").read_text())
    for p in ("step_time.png", "utilization.png", "memory.png", "loss.png"):
        assert _png_ok(out / p), p
        assert f"({p})" in text

    # step-time statistics, recomputed from metrics.jsonl (warm-up: train.warmup_steps_excluded = 1)
    med = {}
    for b, d in runs.items():
        recs = _metrics(d)
        times = [r["step_time_s"] for r in recs if r["step"] > 1]
        med[b] = statistics.median(times)
        s = next(x for x in summary["runs"] if x["backend"] == b)
        assert s["measured_steps"] == len(recs) - 1 == 5
        assert s["step_time_median_s"] == pytest.approx(med[b])
        assert f"| {b} | 5 | {med[b]:.4f} |" in text
        tps = sum(r["tokens"] for r in recs[1:]) / sum(r["step_time_s"] for r in recs[1:])
        assert s["tokens_per_s_per_device"] == pytest.approx(tps)
        # model FLOPs of the tiny LoRA run by hand: 4N + 6N_lora per token + attention at the mean length
        flops = sum(r["tokens"] * (4 * 156160 + 6 * 15616) + 1536 * r["tokens"] ** 2 / r["samples"] for r in recs[1:])
        assert s["model_tflops_per_device"] == pytest.approx(flops / sum(r["step_time_s"] for r in recs[1:]) / 1e12)
        assert s["mfu"] is None
    ratio = med["hf"] / med["nemo"]
    assert summary["speedup"]["t_hf_over_t_nemo"] == pytest.approx(ratio)
    assert summary["speedup"]["step_time_reduction"] == pytest.approx((med["hf"] - med["nemo"]) / med["hf"])
    lo, hi = summary["speedup"]["ratio_ci95"]
    assert lo <= hi
    assert f"**{ratio:.3f}x**" in text and f"**{100 * (1 - med['nemo'] / med['hf']):.1f} %**" in text

    # CPU labelling, NVML absence, anchors with both readings of "44 % better"
    assert text.startswith("# Training benchmark (CPU)") and "**CPU run.**" in text and "n/a (CPU)" in text
    assert "NVMLError_LibraryNotFound" in text and "no MFU" in text
    assert "step time ~44 % better (LoRA)" in text and "1.44x = reduction 30.6 %" in text and "= 1.79x" in text
    assert "35 % better" not in text  # the SFT anchor does not sit beside a LoRA run
    assert "**156,160**" in text and "N_lora = 15,616" in text
    assert "sampler CPU" in text and "CPU % mean" in text


def test_the_last_validation_loss_of_each_run_is_in_the_loss_table(runs, tmp_path):
    """eval/loss from each run's TensorBoard files (as every backend writes it), the last validation's; a run
    without event files shows a dash."""
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(runs["hf"] / "tb"))
    for step, v in ((3, 6.5), (6, 6.25)):
        w.add_scalar("eval/loss", v, step)
    w.close()
    build_report([runs["nemo"], runs["hf"]], tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    got = {s["backend"]: s["last_eval_loss"] for s in summary["runs"]}
    assert got == {"hf": [6, 6.25], "nemo": None}
    text = (tmp_path / "report.md").read_text()
    assert "| last eval/loss (step) |" in text and " | 6.250 (6) |" in text
    assert re.search(r"^\| nemo \| [\d.]+ \| [\d.]+ \| – \|$", text, re.M), text


def test_warmup_override(runs, tmp_path):
    build_report([runs["nemo"], runs["hf"]], tmp_path, warmup=3)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for s in summary["runs"]:
        times = [r["step_time_s"] for r in _metrics(runs[s["backend"]]) if r["step"] > 3]
        assert s["measured_steps"] == 3 and s["step_time_median_s"] == pytest.approx(statistics.median(times))
    assert summary["warmup_source"] == "--warmup"


def test_refused_report_writes_nothing(runs, tmp_path, capsys):
    cfg = runs["hf"] / "resolved_config.yaml"
    cfg.write_text(cfg.read_text().replace("global_batch_size: 8", "global_batch_size: 16"))
    out = tmp_path / "rep"
    with pytest.raises(RunsDiffer, match="train.global_batch_size"):
        build_report([runs["nemo"], runs["hf"]], out)
    assert main([str(runs["nemo"]), str(runs["hf"]), "--output", str(out)]) == 3
    err = capsys.readouterr().err
    assert "config train.global_batch_size: nemo=8, hf=16" in err and "--allow-mismatch" in err
    assert not (out / "report.md").exists()
    assert main([str(runs["nemo"]), str(runs["hf"]), "--output", str(out), "--allow-mismatch"]) == 0
    assert "**NOT comparable**" in (out / "report.md").read_text()


def test_cli_default_output(runs, capsys):
    assert default_output([runs["nemo"], runs["hf"]]) == runs["hf"].parent.parent.resolve()
    assert main([str(runs["nemo"]), str(runs["hf"])]) == 0
    assert (runs["hf"].parent.parent / "report.md").is_file()
    assert default_output([runs["hf"], Path("/tmp")]) is None


def test_runs_without_samples_like_the_demo(runs, tmp_path):
    """recipes.finetune output dirs (no samples.jsonl, no bench_run.json): report still written, says so;
    FLOPs from the config.json at model.hf_path."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    for d in runs.values():
        (d / "samples.jsonl").unlink()
        (d / "bench_run.json").unlink()
        cfg = d / "resolved_config.yaml"
        cfg.write_text(cfg.read_text().replace("hf_path: artifacts/models/tiny", f"hf_path: {model}"))
    text = build_report([runs["nemo"], runs["hf"]], tmp_path / "out").read_text()
    assert "No samples.jsonl in these runs" in text and "not run through benchmarks.train_speed" in text
    assert "**156,160**" in text
    assert not (tmp_path / "out" / "utilization.png").exists() and _png_ok(tmp_path / "out" / "step_time.png")


def test_gpu_report_path_with_fake_nvml(runs, tmp_path):
    """The same recorded steps with GPU samples (taken by the real sampler through a fake pynvml):
    H100 peak, MFU = TFLOP/s / 989.4, GPU util/memory plots and table."""
    from test_sampler import fake_pynvml  # tests/ is on sys.path (rootdir conftest, no package)
    for d in runs.values():
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
        with ResourceSampler(proc.pid, d / "samples.jsonl", interval_s=0.2, nvml=fake_pynvml(proc.pid)):
            proc.wait()  # bench_run.json stays: it holds the model's config.json; the samples name the GPUs
    out = tmp_path / "gpu"
    text = build_report([runs["nemo"], runs["hf"]], out).read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cpu"] is False and summary["peak_tflops"][0] == 989.4
    for s in summary["runs"]:
        assert s["mfu"] == pytest.approx(s["model_tflops_per_device"] / 989.4)
        r = s["resources"]
        assert r["gpus_used"] == [0] and r["gpu_util_mean"] == 97.0 and r["gpu_power_mean_w"] == 650.0
        assert r["gpu_mem_used_peak_gib"] == 60.0
    assert text.startswith("# Training benchmark (GPU)") and "CPU run" not in text
    assert "| nemo | 97.0 | 60.0 / 60.0 |" in text
    assert _png_ok(out / "utilization.png") and _png_ok(out / "memory.png")


def test_report_demo_runs(runs, tmp_path, capsys):
    """recipes.demo's hook: <out>/runs/{hf,nemo} -> <out>/benchmark/report.md; never raises."""
    from benchmarks.report import report_demo_runs
    demo = runs["hf"].parent.parent
    path = report_demo_runs(demo)
    assert path == demo / "benchmark" / "report.md" and "t_hf / t_nemo" in path.read_text()
    cfg = runs["hf"] / "resolved_config.yaml"
    cfg.write_text(cfg.read_text().replace("seq_length: 384", "seq_length: 512"))
    assert report_demo_runs(demo) is None and "train.seq_length" in capsys.readouterr().out
    assert report_demo_runs(tmp_path / "empty") is None
