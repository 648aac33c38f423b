"""The CPU demo end to end on the real small model, shrunk to fit CI: few steps, few rows, short outputs.
(`make demo` runs the full-size version.)"""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_writes_report_with_bleu_before_and_after(small_model_dir, tmp_path):
    from recipes.demo import main
    out = tmp_path / "demo"
    rc = main(["--output", str(out), "--limit", "2", "--max-new-tokens", "12", "--backends", "hf",
               f"model.hf_path={small_model_dir}", f"data.dataset_dir={tmp_path / 'data'}",
               "train.max_steps=2", "optim.warmup_steps=1"])
    assert rc == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(results["bleu"]) == {"base", "hf_lora"}
    for res in results["bleu"].values():
        assert 0.0 <= res["score"] <= 100.0 and "tok:ja-mecab" in res["signature"]
        assert res["n_segments"] == 2
    assert "BLEU on the test split" in report and "hf_lora" in report and "![loss](loss.png)" in report
    assert (out / "loss.png").stat().st_size > 1000
    assert len((out / "predictions_hf_lora.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert [r["step"] for r in map(json.loads, (out / "runs/hf/metrics.jsonl").read_text().splitlines())] == [1, 2]
    # step 6: served by vLLM, compared with a paired bootstrap, speed measured, the app screenshotted
    served = results["served"]
    models = served["compare"]["models"]
    assert set(models) == {"base", "hf-lora"} and models["hf-lora"]["adapter"] == "hf-lora"
    assert models["hf-lora"]["bleu"]["significance"]["BLEU"]["p_value"] is not None
    assert set(served["speed"]["summaries"]) == {"base", "hf-lora"}
    assert all(s["errors"] == 0 and s["output_tokens"] > 0
               for levels in served["speed"]["summaries"].values() for s in levels.values())
    assert "## Served models" in report and "| hf-lora | 4 |" in report
    for png in ("model_eval/bleu.png", "inference_speed/throughput.png", "review_app/review_app.png"):
        assert (out / png).stat().st_size > 5000, png
