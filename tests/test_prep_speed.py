"""Data preparation at batch-tokenizer speed, with the same output: recipes.data renders the chat template
once (recipes.prompt.prompt_renderer) and tokenises with two batch calls per split
(recipes.tokens.tokenize_pairs); both give exactly what one render and one tokenizer call per row give.
benchmarks.prep_speed measures the ratio (README figure), exercised here on a small input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.data import load_tokenizer, prepare, read_prepared, read_records
from recipes.prompt import build_messages, prompt_renderer, render_prompt
from recipes.tokens import tokenize_pair, tokenize_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_renderer_gives_what_the_template_renders_per_row(tok):
    render = prompt_renderer(tok)
    for r in read_records(ROOT / "datasets/demo_pairs.jsonl"):
        msgs = build_messages(r.draft, r.section, r.date, r.fund)
        assert render(msgs[1]["content"]) == render_prompt(tok, msgs)


def test_renderer_falls_back_when_the_template_changes_the_content(tok):
    import copy
    trimming = copy.copy(tok)
    trimming.chat_template = tok.chat_template.replace("message['content']", "message['content'] | trim")
    assert trimming.chat_template != tok.chat_template  # the template does insert message['content']
    render = prompt_renderer(trimming)
    msgs = build_messages("  下書き  ", "市場動向", "2024-01")
    assert render(msgs[1]["content"]) == render_prompt(trimming, msgs)
    assert render.__name__ == "direct"  # the probes saw the trim: every call renders


def test_batch_tokenisation_equals_one_call_per_pair(tok):
    recs = read_records(ROOT / "datasets/demo_pairs.jsonl")
    prompts = [render_prompt(tok, build_messages(r.draft, r.section, r.date, r.fund)) for r in recs]
    finals = [r.final for r in recs]
    for seq in (64, 512):
        assert tokenize_pairs(tok, prompts, finals, seq) == [tokenize_pair(tok, p, f, seq)
                                                             for p, f in zip(prompts, finals)]
    assert any(p.truncated for p in tokenize_pairs(tok, prompts, finals, 64))  # the cut path is exercised


def test_prepared_files_and_stats_are_those_of_the_per_row_path(tmp_path, tiny_model_dir, tok):
    from benchmarks.prep_speed import build_pairs
    src = build_pairs(500, tmp_path / "pairs.jsonl")
    stats = prepare(src, tmp_path / "out", tiny_model_dir, seq_length=96)
    for split in ("training", "validation", "test"):
        rows = read_prepared(tmp_path / "out" / f"{split}.jsonl")
        hf = {r["id"]: r for r in read_prepared(tmp_path / "out" / "hf" / f"{split}.jsonl")}
        p_tok = c_tok = trunc = 0
        for row in rows:
            assert row["input"] == render_prompt(tok, hf[row["id"]]["prompt"])  # the per-row render
            pair = tokenize_pair(tok, row["input"], row["output"], 96)  # one call per text
            p_tok, c_tok, trunc = p_tok + pair.prompt_tokens, c_tok + pair.completion_tokens, trunc + pair.truncated
        assert stats["tokens"][split] == {"prompt": p_tok, "completion": c_tok}
        assert stats["truncated"][split] == trunc
    assert sum(stats["truncated"].values()) > 0 and sum(stats["rows"].values()) == 500


def test_prep_speed_command_reports_the_ratio_and_can_fail(tmp_path, tiny_model_dir, capsys):
    from benchmarks.prep_speed import main
    assert main(["--pairs", "300", "--tokenizer", str(tiny_model_dir), "--workdir", str(tmp_path / "w"),
                 "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["pairs"] == r["rows_written"] == 300 and r["texts"] == 600 and r["ratio"] > 0
    assert main(["--pairs", "300", "--tokenizer", str(tiny_model_dir), "--workdir", str(tmp_path / "w2"),
                 "--max-ratio", "0.001"]) == 1
    assert "FAIL" in capsys.readouterr().err


def test_prep_speed_times_the_whole_command_with_its_fidelity_report(tmp_path, tiny_model_dir):
    from benchmarks.prep_speed import measure
    r = measure(300, tiny_model_dir, tmp_path / "w", command=True)
    assert r["measured"] == "python -m recipes.prepare_data" and r["rows_written"] == 300 and r["ratio"] > 0
    report = json.loads((tmp_path / "w" / "prepared" / "fidelity.json").read_text(encoding="utf-8"))
    assert report["pairs"] == 300


def test_fidelity_report_in_a_worker_equals_the_one_in_process(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import multiprocessing

    from benchmarks.prep_speed import build_pairs
    from recipes import prepare_data
    src = build_pairs(300, tmp_path / "pairs.jsonl")
    rows = src.read_text(encoding="utf-8").splitlines()
    first = json.loads(rows[0])
    rows[0] = json.dumps({**first, "final": first["final"].replace("%", "ポイント", 1)}, ensure_ascii=False)
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    args = ["--input", str(src), "--tokenizer", str(tiny_model_dir)]
    assert prepare_data.main(args + ["--output", str(tmp_path / "forked")]) == 0
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])  # no fork: in this process
    assert prepare_data.main(args + ["--output", str(tmp_path / "here")]) == 0
    a, b = ((tmp_path / d / "fidelity.json").read_text(encoding="utf-8") for d in ("forked", "here"))
    assert a == b and json.loads(a)["pairs"] == 300 and json.loads(a)["with_findings"] >= 1
    bad = tmp_path / "bad.jsonl"  # prepare's own error wins, and no worker is left behind
    bad.write_text(rows[1] + "\n" + json.dumps({**first, "final": ""}, ensure_ascii=False) + "\n", encoding="utf-8")
    monkeypatch.undo()
    assert prepare_data.main(["--input", str(bad), "--tokenizer", str(tiny_model_dir),
                              "--output", str(tmp_path / "bad")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert not multiprocessing.active_children()
