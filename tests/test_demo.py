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


def test_report_shows_fact_fidelity_and_style_beside_bleu(tmp_path):
    """The report's tables (no model run: the fault server answers with the draft, i.e. copies it)."""
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "tests"))
    from fault_server import FaultServer

    from benchmarks.bleu import check_comments, corpus_score
    from benchmarks.model_eval import evaluate, load_examples, parse_endpoint_spec
    from recipes.demo import served_section, write_report
    from recipes.prompt import build_messages
    from recipes.synth_data import generate_pairs

    pairs = generate_pairs(6, 2)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"prompt": m[:2], "completion": m[2:], "id": f"i{k}"}, ensure_ascii=False) + "\n"
                            for k, m in enumerate(build_messages(p["draft"], p["section"], p["date"], p["fund"],
                                                                 final=p["final"]) for p in pairs)), encoding="utf-8")
    with FaultServer(models=("base", "hf-lora")) as fs:
        eps = [parse_endpoint_spec(f"base={fs.base_url},model=base"),
               parse_endpoint_spec(f"hf-lora={fs.base_url},model=base,adapter=hf-lora")]
        compare = evaluate(data, tmp_path / "model_eval", eps, max_tokens=300, bootstrap=50, baseline="base",
                           progress=False)
    speed = {"max_tokens": 8, "requests_per_level": 1, "summaries": {}}
    lines = "\n".join(served_section({"compare": compare, "speed": speed, "screenshot": None, "tuned": "hf-lora"}))
    assert "| fact recall | fact precision | no finding | style compliance |" in lines
    assert "### Fact fidelity and house style" in lines and "*drafts copied*" in lines and "Δ style compliance" in lines
    # the test-split table: the draft copied vs the finals
    exs = load_examples(data)
    drafts = [e.draft for e in exs]
    rows = [{"id": e.id, "section": e.section, "reference": e.reference, "prediction": e.draft} for e in exs]
    res = corpus_score(drafts, [e.reference for e in exs])
    checks = {"base": check_comments(drafts, drafts), "reference": check_comments([e.reference for e in exs], drafts)}
    cfg = SimpleNamespace(name="t", method="lora", model=SimpleNamespace(hf_path="m", preset="small"),
                          train=SimpleNamespace(max_steps=1, global_batch_size=1, seq_length=8, warmup_steps_excluded=0),
                          optim=SimpleNamespace(lr=1e-4, scheduler="cosine"))
    stats = {"months": {s: ["2023-01"] for s in ("training", "validation", "test")},
             "rows": {s: 1 for s in ("training", "validation", "test")}}
    write_report(tmp_path, cfg, stats, {"base": (res, rows)}, {}, {}, 1.0, checks=checks)
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| base | " in report and "| 1.000 | 1.000 | 1.000 |" in report and "| *reference finals* |" in report
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["checks"]["base"]["rates"]["fact_recall"] == 1.0
    assert saved["checks"]["base"]["rates"]["style_compliance"] < 0.5
    assert saved["checks"]["reference"]["rates"]["style_compliance"] == 1.0
