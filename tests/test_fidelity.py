"""benchmarks.fidelity: the facts of a draft survive its rewrite.

A table of hand-written draft/rewrite cases, each with the findings it must give (equivalent forms give
none; each kind of error gives its kind, naming the span in both texts); properties on real text (a text
agrees with itself and with its normalised forms); the demo pairs and the generator keep every fact; the
command reads the raw pair formats with prepare_data's errors and writes its JSON atomically.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from benchmarks.fidelity import FactExtractor, compare, extract_facts, load_vocabulary, main, summarize

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# (draft, rewrite): equivalent forms, no finding
EQUIVALENT = [
    ("TOPIXは2,501.71ポイントとなった。", "TOPIXは2501.71ポイントとなりました。"),                    # thousands separator
    ("TOPIXは２，５０１．７１ポイントとなった。", "TOPIXは2,501.71ポイントとなりました。"),                # full-width digits
    ("TOPIXは２．１％下落した。", "TOPIXは前月末比-2.1%となりました。"),                                 # word sign = symbol
    ("TOPIXは▲1.2%となった。", "TOPIXは-1.2%となりました。"),                                           # ▲ is minus
    ("TOPIXは△1.2%となった。", "TOPIXは-1.2%となりました。"),                                           # △ is minus
    ("TOPIXはマイナス1.2%となった。", "TOPIXは-1.2%となりました。"),
    ("純資産は1.5兆円となった。", "純資産は1兆5,000億円となりました。"),                                 # 兆/億 folded
    ("純資産は1億5,000万円となった。", "純資産は1.5億円となりました。"),
    ("基準価額は2.1パーセント上昇した。", "基準価額は2.1%上昇しました。"),                               # パーセント
    ("利回りは0.15ポイント低下した。", "利回りは前月末比-0.15%ポイントとなりました。"),                  # ポイント = %ポイント
    ("TOPIXは前月比2.1%の上昇となった。", "TOPIXは前月末比+2.1%となりました。"),                        # period words
    ("TOPIXは対前月で2.1%下落した。", "TOPIXは前月末比-2.1%となりました。"),
    ("TOPIXは前月末から2.1%下落した。", "TOPIXは前月末比-2.1%となりました。"),
    ("米国は前月末比-0.15%ポイント、ドイツは同0.25%ポイントの低下となった。",
     "米国は前月末比-0.15%ポイント、ドイツは同-0.25%ポイントとなりました。"),                           # 同 repeats the period
    ("S&P 500は上昇した。", "S&P500は上昇しました。"),                                                   # instrument aliases
    ("S＆P500種株価指数は上昇した。", "S&P500は上昇しました。"),
    ("米10年国債利回りは2.50%となった。", "米国10年国債利回りは2.50%となりました。"),
    ("利回りは2.10%となった。", "利回りは2.1%となりました。"),                                         # decimals as values
    ("TOPIXは2,501.71ﾎﾟｲﾝﾄとなった。", "TOPIXは2,501.71ポイントとなりました。"),                        # half-width kana
    ("基準価額は＋2.1％となった。", "基準価額は+2.1%となりました。"),
    ("BMを0.3ポイント上回った。", "ベンチマークを0.3%ポイント上回りました。"),                           # direction after
    ("1. 市場動向\nTOPIXは前月末比+2.1%となった。", "TOPIXは前月末比+2.1%となりました。"),                # list numbering
    ("２０２３年１月の運用状況", "2023年1月の運用状況"),
    ("平素は格別のご高配を賜り、厚く御礼申し上げます。TOPIXは+2.1%。", "TOPIXは+2.1%となりました。"),    # greeting dropped
    ("３銘柄を新規に組み入れた。", "3銘柄を新規に組み入れました。"),
    ("TOPIXは−2.1%となった。", "TOPIXは-2.1%となりました。"),                                           # U+2212 minus
    ("基準価額は前月末比2.1%となった。", "基準価額は前月末比+2.1%となりました。"),                        # unsigned change = +
]

# (draft, rewrite, [(kind, draft text, rewrite text), ...])
ERRORS = [
    ("TOPIXは前月末比+2.1%。", "TOPIXは前月末比+2.2%。", [("value_changed", "+2.1%", "+2.2%")]),
    ("TOPIXは2.1%上昇した。", "TOPIXは前月末比-2.1%。", [("sign_flipped", "2.1%", "-2.1%")]),
    ("TOPIXは▲0.5%。", "TOPIXは+0.5%。", [("sign_flipped", "▲0.5%", "+0.5%")]),
    ("TOPIXは2.1%の下落。", "TOPIXは前月末比+2.1%。", [("sign_flipped", "2.1%", "+2.1%")]),
    ("TOPIXは2.1%下落した。", "TOPIXは2.1%となりました。", [("sign_flipped", "2.1%", "2.1%")]),  # direction lost
    ("利回りは0.15%上昇。", "利回りは0.15%ポイント上昇。", [("unit_changed", "0.15%", "0.15%ポイント")]),
    ("純資産は1.5兆円。", "純資産は1.5兆ドル。", [("unit_changed", "1.5兆円", "1.5兆ドル")]),
    ("3銘柄を売却した。", "3社を売却しました。", [("unit_changed", "3銘柄", "3社")]),
    ("TOPIXは前月比+2.1%。", "TOPIXは前年比+2.1%。", [("period_changed", "+2.1%", "+2.1%")]),
    ("TOPIXは年初来+5.0%。", "TOPIXは前月末比+5.0%。", [("period_changed", "+5.0%", "+5.0%")]),
    ("2023年1月の運用状況", "2023年2月の運用状況", [("period_changed", "2023年1月", "2023年2月")]),
    ("1月の運用状況", "2月の運用状況", [("period_changed", "1月", "2月")]),
    ("TOPIXは2,501.71ポイント（前月末比-2.1%）。", "TOPIXは前月末比-2.1%。", [("missing", "2,501.71ポイント", "")]),
    ("TOPIXは下落した。", "TOPIXは前月末比-2.1%下落しました。", [("added", "", "-2.1%")]),
    ("TOPIXと日経平均株価は上昇した。", "TOPIXは上昇しました。", [("missing", "日経平均株価", "")]),
    ("株式市場は上昇した。", "S&P500は上昇しました。", [("added", "", "S&P500")]),
    ("TOPIXは+2.1%。", "日経平均株価は+2.1%。", [("missing", "TOPIX", ""), ("added", "", "日経平均株価")]),
    ("TOPIXは2,501.71ポイント。", "TOPIXは2,510.71ポイント。", [("value_changed", "2,501.71ポイント", "2,510.71ポイント")]),
    ("利回りは2.50%。", "利回りは2.05%。", [("value_changed", "2.50%", "2.05%")]),
    ("純資産は1兆5,000億円。", "純資産は1兆5,500億円。", [("value_changed", "1兆5,000億円", "1兆5,500億円")]),
    ("TOPIXは+1.2%、S&P500は+1.2%。", "TOPIXとS&P500は+1.2%。", [("missing", "+1.2%", "")]),
    ("基準価額は前月末比+1.4%、ベンチマーク（+1.0%）を0.4%ポイント上回った。",
     "基準価額は前月末比+1.4%、ベンチマーク（+1.0%）を0.4%ポイント下回りました。",
     [("sign_flipped", "0.4%ポイント", "0.4%ポイント")]),
    ("利回りは2.50%（前月末比+0.15%ポイント）。", "利回りは2.50%（前月末比+0.51%ポイント）。",
     [("value_changed", "+0.15%ポイント", "+0.51%ポイント")]),
    ("TOPIXは２．１％下落。", "TOPIXは前月末比-1.2%。", [("value_changed", "２．１％", "-1.2%")]),
]


def kinds(draft: str, final: str) -> list[tuple[str, str, str]]:
    return [(f.kind, f.draft_text, f.final_text) for f in compare(draft, final).findings]


@pytest.mark.parametrize("draft,final", EQUIVALENT)
def test_equivalent_forms_give_no_finding(draft, final):
    c = compare(draft, final)
    assert c.findings == [], [f.message for f in c.findings]
    assert c.recall == c.precision == 1.0 and c.faithful


@pytest.mark.parametrize("draft,final,expected", ERRORS)
def test_each_kind_of_error_is_found_with_its_spans(draft, final, expected):
    c = compare(draft, final)
    assert kinds(draft, final) == expected
    for f in c.findings:  # the spans name the text in both originals
        if f.draft_span:
            assert draft[f.draft_span[0]:f.draft_span[1]] == f.draft_text
        if f.final_span:
            assert final[f.final_span[0]:f.final_span[1]] == f.final_text
    assert not c.faithful and (c.recall < 1.0 or c.precision < 1.0)


def test_the_table_covers_every_kind():
    assert len(EQUIVALENT) + len(ERRORS) >= 40
    assert {k for *_, exp in ERRORS for k, _, _ in exp} == {"missing", "added", "value_changed", "sign_flipped",
                                                           "unit_changed", "period_changed"}


def test_facts_carry_value_unit_sign_period_and_span():
    text = "当月の国内株式市場は下落し、TOPIXは２，５０１．７１ﾎﾟｲﾝﾄ（対前月で２．１％下落）となった。"
    got = [(f.kind, f.value, f.unit, f.sign, f.period, f.text) for f in extract_facts(text)]
    assert got == [("instrument", "TOPIX", "", "", "", "TOPIX"),
                   ("number", "2501.71", "pt", "", "", "２，５０１．７１ﾎﾟｲﾝﾄ"),
                   ("number", "-2.1", "%", "-", "mom", "２．１％")]


def test_vocabulary_is_extendable_by_a_file(tmp_path):
    p = tmp_path / "vocab.json"
    p.write_text(json.dumps({"JPX日経400": ["JPX日経インデックス400"]}, ensure_ascii=False), encoding="utf-8")
    ex = FactExtractor(load_vocabulary(p))
    facts = ex.facts("JPX日経インデックス400は上昇")
    assert [(f.kind, f.value) for f in facts] == [("instrument", "JPX日経400")]  # its 400 is no number
    assert [f.kind for f in compare("JPX日経400は上昇", "株式は上昇", ex).findings] == ["missing"]
    p.write_text('["not", "a", "mapping"]')
    with pytest.raises(ValueError, match="vocab.json"):
        load_vocabulary(p)


def _real_texts() -> list[str]:
    texts = [json.loads(line)[k] for line in (ROOT / "datasets/demo_pairs.jsonl").read_text(encoding="utf-8").splitlines()
             for k in ("draft", "final")]
    for p in sorted(SHARED.glob("**/*.jsonl"))[:4]:
        for line in p.read_text(encoding="utf-8").splitlines()[:200]:
            row = json.loads(line)
            texts += [v for v in row.values() if isinstance(v, str) and len(v) > 20][:2]
    return texts


def test_a_text_agrees_with_itself_and_its_normalised_forms():
    from recipes.schema import normalize_text
    texts = _real_texts()
    assert len(texts) >= 200
    with_facts = 0
    for t in texts:
        for other in (t, unicodedata.normalize("NFKC", t), normalize_text(t)):
            c = compare(t, other)
            assert c.findings == [], (t, other, [f.message for f in c.findings])
        with_facts += bool(extract_facts(t))
    assert with_facts >= 100  # the property is not vacuous


def test_demo_pairs_and_generated_pairs_keep_every_fact():
    from recipes.synth_data import generate_pairs
    rows = [json.loads(line) for line in (ROOT / "datasets/demo_pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    rows += generate_pairs(500, 3)
    summary, _ = summarize((r["draft"], r["final"]) for r in rows)
    d = summary.to_dict()
    assert d["faithful_share"] == 1.0 and d["fact_recall"] == 1.0 and d["draft_facts"] > 700


def test_command_reads_each_raw_format_and_writes_one_object_per_row(tmp_path, capsys):
    import csv

    import openpyxl
    rows = [{"date": "2024-01", "draft": "TOPIXは前月末比+2.1%。", "final": "TOPIXは前月末比+2.1%。"},
            {"date": "2024-01", "draft": "TOPIXは2.1%上昇した。", "final": "TOPIXは前月末比-2.1%。", "x": "ignored"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with open(tmp_path / "p.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["date", "draft", "final", "x"])
        w.writeheader()
        w.writerows(rows)
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["draft", "final"])
    for r in rows:
        ws.append([r["draft"], r["final"]])
    wb.save(tmp_path / "p.xlsx")
    for src in ("p.jsonl", "p.csv", "p.xlsx"):
        out = tmp_path / f"{src}.json"
        assert main(["--pairs", str(tmp_path / src), "--json", str(out)]) == 0
        got = json.loads(out.read_text(encoding="utf-8"))
        assert [r["faithful"] for r in got] == [True, False]
        assert [r["row"] for r in got] == ([1, 2] if src == "p.jsonl" else [2, 3])
        assert got[1]["findings"][0]["kind"] == "sign_flipped"
    printed = capsys.readouterr().out
    assert "2 pairs, 1 with findings" in printed and "sign flipped" in printed


def test_command_bad_input_names_file_row_and_field_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"draft": "TOPIXは+1%"}\n{"draft": "", "final": "x"}\n', encoding="utf-8")
    out = tmp_path / "out.json"
    assert main(["--pairs", str(bad), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: field 'final': missing" in err and f"{bad}:2: field 'draft': empty text" in err
    assert not out.exists()
    assert main(["--pairs", str(tmp_path / "none.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_command_help_runs():
    r = subprocess.run([sys.executable, "-m", "benchmarks.fidelity", "--help"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert r.returncode == 0 and "--pairs" in r.stdout and "cannot catch" in r.stdout


def test_prepare_data_reports_but_keeps_pairs_that_change_a_fact(tmp_path, tiny_model_dir, capsys):
    from recipes.prepare_data import main as prepare_main
    rows = [json.loads(line) for line in (ROOT / "datasets/demo_pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    rows[0] = {**rows[0], "final": rows[0]["final"].replace("-2.1%", "+2.1%")}  # a sign flip in one final
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "data"
    assert prepare_main(["--input", str(src), "--output", str(out), "--tokenizer", str(tiny_model_dir)]) == 0
    err = capsys.readouterr().err
    assert "1 of 100 pair(s) have a final that changes a fact" in err and f"{src}:1: sign flipped" in err
    report = json.loads((out / "fidelity.json").read_text(encoding="utf-8"))
    assert report["pairs"] == 100 and report["with_findings"] == 1
    assert report["rows"][0]["findings"][0]["kind"] == "sign_flipped"
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert sum(stats["rows"].values()) == 100  # reported, not dropped
