"""Tests of benchmarks.bleu: sacrebleu's own Japanese case, per-section scores, file formats, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu

from benchmarks import bleu

KYOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "sacrebleu-kyoto"

HYPS = ["当月の国内株式市場は、米国の利下げ期待により上昇しました。",
        "当ファンドの基準価額は、前月末比2.1%上昇しました。",
        "今後は、地政学リスクに注意しつつ、分散投資を続ける方針です。",
        "為替市場では円高が進みました。"]
REFS = ["当月の国内株式市場は、米国の利下げ期待を背景に上昇しました。",
        "当ファンドの基準価額は、前月末比2.1%の上昇となりました。",
        "今後の運用につきましては、地政学リスクの高まりに注視しつつ、分散投資を継続する方針です。",
        "為替市場では、円高・ドル安が進みました。"]
SECTIONS = ["市場動向", "運用状況", "今後の見通しと運用方針", "市場動向"]


@pytest.fixture(scope="module")
def kyoto():
    if not (KYOTO / "kyoto-test.hyp.ja").is_file():
        pytest.skip(f"{KYOTO} not present")
    return KYOTO / "kyoto-test.hyp.ja", KYOTO / "kyoto-test.ref.ja"


def test_sacrebleu_kyoto_case(kyoto):
    # sacrebleu's test.sh: `sacrebleu -w 2 -l en-ja -b kyoto-test.ref.ja < kyoto-test.hyp.ja` -> 14.48
    hyp, ref = kyoto
    r = bleu.score_files(hyp, ref)
    assert r.score == pytest.approx(14.48, abs=0.01)
    assert r.score01 == pytest.approx(r.score / 100)
    assert "tok:ja-mecab" in r.signature and "nrefs:1" in r.signature
    assert (r.sys_len, r.ref_len, r.n_segments) == (27688, 26370, 1160)
    assert [round(p, 1) for p in r.precisions] == [44.9, 19.3, 9.7, 5.2]
    assert r.per_section == {}


def test_identical_is_100():
    r = bleu.corpus_score(REFS, REFS)
    assert r.score == pytest.approx(100.0) and r.score01 == pytest.approx(1.0)
    assert r.chrf == pytest.approx(100.0) and r.bp == 1.0


def test_matches_sacrebleu_directly():
    r = bleu.corpus_score(HYPS, REFS)
    expected = sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="ja-mecab")
    assert r.score == expected.score and 0 < r.score < 100
    assert r.chrf == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    # ja-mecab segments words: a char-level or whitespace BLEU would differ.
    assert r.score != sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="13a").score


def test_per_section_split(kyoto):
    hyp, ref = (p.read_text(encoding="utf-8").splitlines()[:300] for p in kyoto)
    labels = [("A", "B", "C")[i % 3] for i in range(300)]
    labels[0] = None  # an unlabelled segment counts in the corpus only
    r = bleu.corpus_score(hyp, ref, sections=labels)
    assert list(r.per_section) == ["B", "C", "A"]  # first-seen order
    assert sum(n for _, n in r.per_section.values()) == r.n_segments - 1 == 299
    for s, (score, n) in r.per_section.items():
        idx = [i for i, lab in enumerate(labels) if lab == s]
        assert n == len(idx)
        assert score == pytest.approx(bleu.corpus_score([hyp[i] for i in idx], [ref[i] for i in idx]).score)
    assert len({round(s, 6) for s, _ in r.per_section.values()}) == 3


def _write(path: Path, rows) -> Path:
    path.write_text("".join((json.dumps(r, ensure_ascii=False) if isinstance(r, dict) else r) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def test_jsonl_and_text_inputs_agree(tmp_path):
    hyp_txt = _write(tmp_path / "hyp.txt", HYPS)
    ref_txt = _write(tmp_path / "ref.txt", REFS)
    pred = _write(tmp_path / "pred.jsonl", [{"id": str(i), "prediction": h, "reference": r}
                                            for i, (h, r) in enumerate(zip(HYPS, REFS))])
    test = _write(tmp_path / "test.jsonl", [{"id": str(i), "input": "…", "output": r, "section": s}
                                            for i, (r, s) in enumerate(zip(REFS, SECTIONS))])
    a = bleu.score_files(hyp_txt, ref_txt)
    b = bleu.score_files(pred, test)
    c = bleu.score_files(pred, pred)  # generate's output carries its references
    assert a.score == b.score == c.score
    assert a.per_section == {} and c.per_section == {}
    assert b.per_section["市場動向"][1] == 2
    # sections come from the predictions when the references have none
    pred2 = _write(tmp_path / "pred2.jsonl", [{"output": h, "section": s} for h, s in zip(HYPS, SECTIONS)])
    assert bleu.score_files(pred2, ref_txt).per_section == b.per_section


def test_text_keeps_empty_lines(tmp_path):
    hyp = tmp_path / "h.txt"
    hyp.write_text("\n".join(["", *HYPS[1:]]) + "\n", encoding="utf-8")
    segs = bleu.load_segments(hyp)
    assert len(segs.texts) == 4 and segs.texts[0] == ""
    r = bleu.score_files(hyp, _write(tmp_path / "r.txt", REFS))
    assert r.n_segments == 4 and r.score < bleu.corpus_score(HYPS, REFS).score


def test_line_count_mismatch_is_an_error(tmp_path, capsys):
    hyp = _write(tmp_path / "hyp.txt", HYPS[:3])
    ref = _write(tmp_path / "ref.txt", REFS)
    with pytest.raises(ValueError) as e:
        bleu.score_files(hyp, ref)
    msg = str(e.value)
    assert "3 predictions" in msg and "4 references" in msg and str(hyp) in msg and str(ref) in msg
    assert bleu.main(["--predictions", str(hyp), "--references", str(ref)]) == 2
    assert "line counts differ" in capsys.readouterr().err


def test_bad_jsonl_rows_name_file_and_line(tmp_path):
    bad = _write(tmp_path / "p.jsonl", [{"prediction": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: no 'prediction' or 'output' field"):
        bleu.load_segments(bad)
    bad = _write(tmp_path / "q.jsonl", [{"prediction": 3}])
    with pytest.raises(ValueError, match=r"q\.jsonl:1: field 'prediction' must be a string"):
        bleu.load_segments(bad)
    bad = _write(tmp_path / "r.jsonl", ['{"prediction": "a"}', "{oops"])
    with pytest.raises(ValueError, match=r"r\.jsonl:2: invalid JSON"):
        bleu.load_segments(bad)


def test_id_order_mismatch_is_an_error(tmp_path):
    pred = _write(tmp_path / "p.jsonl", [{"id": "a", "prediction": "x"}, {"id": "b", "prediction": "y"}])
    ref = _write(tmp_path / "r.jsonl", [{"id": "b", "output": "y"}, {"id": "a", "output": "x"}])
    with pytest.raises(ValueError, match="segment 1: id 'a'"):
        bleu.score_files(pred, ref)


def test_errors_for_bad_arguments():
    with pytest.raises(ValueError, match="unknown sacrebleu tokenizer"):
        bleu.corpus_score(HYPS, REFS, tokenize="mecab")
    with pytest.raises(ValueError, match="no segments"):
        bleu.corpus_score([], [])
    with pytest.raises(ValueError, match="section labels"):
        bleu.corpus_score(HYPS, REFS, sections=SECTIONS[:2])


def test_cli_prints_and_writes_json(tmp_path, capsys):
    pred = _write(tmp_path / "pred.jsonl", [{"prediction": h} for h in HYPS])
    test = _write(tmp_path / "test.jsonl", [{"output": r, "section": s} for r, s in zip(REFS, SECTIONS)])
    out = tmp_path / "res" / "bleu.json"
    assert bleu.main(["--predictions", str(pred), "--references", str(test), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = bleu.corpus_score(HYPS, REFS, sections=SECTIONS)
    assert f"BLEU = {expected.score:.2f}" in printed and f"{expected.score01:.4f}" in printed
    assert "chrF2" in printed and "tok:ja-mecab" in printed and "今後の見通しと運用方針" in printed
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["score"] == expected.score and saved["signature"] == expected.signature
    assert saved["per_section"]["市場動向"]["n"] == 2
    assert [p.name for p in out.parent.iterdir()] == ["bleu.json"]  # no temp file left
    with pytest.raises(SystemExit):  # never overwrite an input
        bleu.main(["--predictions", str(pred), "--references", str(test), "--json", str(test)])


# ---------------------------------------------------------------------------------------------
# fact fidelity against the drafts and house style


def _synth_pairs(n: int = 30, seed: int = 7) -> list[dict]:
    from recipes.synth_data import generate_pairs

    return generate_pairs(n, seed)


def test_copying_the_draft_is_faithful_but_breaks_house_style():
    """Fidelity alone would rank a copy of the draft first (nothing changed, so nothing is lost); house style
    catches it, since the drafts break it. The reference finals are high on both."""
    pairs = _synth_pairs()
    drafts, finals = [p["draft"] for p in pairs], [p["final"] for p in pairs]
    copy = bleu.check_comments(drafts, drafts).rates()
    assert copy["fact_recall"] == copy["fact_precision"] == copy["faithful_share"] == 1.0
    assert copy["style_compliance"] < 0.2
    ref = bleu.check_comments(finals, drafts)
    rates = ref.rates()
    assert rates["fact_recall"] >= 0.95 and rates["fact_precision"] >= 0.95 and rates["faithful_share"] >= 0.9
    assert rates["style_compliance"] >= 0.95
    assert ref.fidelity()["draft_facts"] > len(pairs)  # the synthetic comments do carry numbers
    # a rewrite that changes a number is caught: lower recall, a finding with its spans
    bad = [f.replace("%", "1%", 1) for f in finals]  # -2.1% -> -2.11%
    checks = bleu.check_comments(bad, drafts)
    assert checks.rates()["fact_recall"] < rates["fact_recall"] and checks.fidelity()["findings"]["value_changed"] > 0
    assert checks.style()["compliance"] == rates["style_compliance"]


def test_cli_fidelity_and_style_with_drafts(tmp_path, capsys):
    from recipes.prompt import user_message

    pairs = _synth_pairs(8)
    finals = [p["final"] for p in pairs]
    pred = _write(tmp_path / "pred.jsonl", [{"id": str(i), "prediction": p["draft"]} for i, p in enumerate(pairs)])
    # the NeMo-format test.jsonl: the draft is inside the rendered prompt
    chatml = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    test = _write(tmp_path / "test.jsonl", [{"id": str(i), "input": chatml.format(user_message(p["draft"], p["section"],
                                                                                              p["date"])),
                                             "output": p["final"], "section": p["section"]} for i, p in enumerate(pairs)])
    out = tmp_path / "bleu.json"
    assert bleu.main(["--predictions", str(pred), "--references", str(test), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"drafts: {test}" in printed and "fact fidelity" in printed and "recall = 1.0000" in printed
    assert "house style" in printed and "paired bootstrap of these rates: does not apply" in printed
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["drafts"] == str(test) and saved["fidelity"]["fact_recall"] == 1.0
    assert saved["rates"]["style_compliance"] < 0.5 and saved["style"]["n"] == 8
    assert saved["rates_bootstrap"]["applies"] is False
    assert saved["score"] == bleu.corpus_score([p["draft"] for p in pairs], finals).score  # BLEU as before
    # --drafts: a text file, one draft per line; the finals rewritten from them are faithful and in style
    txt = _write(tmp_path / "drafts.txt", [p["draft"].replace("\n", " ") for p in pairs])
    hyp = _write(tmp_path / "finals.jsonl", [{"prediction": f} for f in finals])
    ref = _write(tmp_path / "ref.txt", finals)
    assert bleu.main(["--predictions", str(hyp), "--references", str(ref), "--drafts", str(txt), "--json", str(out)]) == 0
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["fidelity"]["fact_recall"] >= 0.95 and saved["rates"]["style_compliance"] == 1.0
    # no drafts anywhere: BLEU and style only, and the output says so
    assert bleu.main(["--predictions", str(hyp), "--references", str(ref), "--json", str(out)]) == 0
    assert "fact fidelity: not available" in capsys.readouterr().out
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["fidelity"] is None and saved["drafts"] is None and saved["style"]["compliance"] == 1.0
    # a drafts file of another length is an error
    short = _write(tmp_path / "short.txt", ["x"])
    assert bleu.main(["--predictions", str(hyp), "--references", str(ref), "--drafts", str(short)]) == 2
    assert "1 drafts in" in capsys.readouterr().err


def test_load_drafts_reads_chat_rows_and_names_a_row_without_one(tmp_path):
    from recipes.prompt import build_messages

    msgs = build_messages("下落した。", "市場動向", "2024-06", "F", final="下落しました。")
    hf = _write(tmp_path / "hf.jsonl", [{"id": "a", "prompt": msgs[:2], "completion": msgs[2:]}])
    segs = bleu.load_drafts(hf)
    assert segs.texts == ["下落した。"] and segs.ids == ["a"]
    bad = _write(tmp_path / "bad.jsonl", [{"draft": "x"}, {"output": "y"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no draft"):
        bleu.load_drafts(bad)
