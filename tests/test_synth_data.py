"""Synthetic pair generator: determinism, house style of the finals, facts kept in the drafts,
the committed demo set and its schema."""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from recipes import synth_data
from recipes.synth_data import generate_pairs, house_style_violations

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo_pairs.jsonl"
HEADING_LINES = {h for hs in synth_data.HEADINGS.values() for h in hs}
NUM = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")


def numbers(text: str) -> list[float]:
    """Absolute values of the numbers in a comment, whatever their width or separators. A draft's
    own heading line ('1. 市場動向') is dropped first: it is layout, not a fact."""
    lines = [ln for ln in text.split("\n") if ln.strip() not in HEADING_LINES]
    t = unicodedata.normalize("NFKC", "\n".join(lines))
    return sorted(float(m.replace(",", "")) for m in NUM.findall(t))


def test_deterministic_for_n_and_seed():
    assert generate_pairs(40, 7) == generate_pairs(40, 7)
    assert generate_pairs(40, 7) != generate_pairs(40, 8)


def test_rows_have_the_documented_columns_and_values():
    rows = generate_pairs(120, 1)
    assert len(rows) == 120
    for r in rows:
        assert list(r) == list(synth_data.COLUMNS)
        assert re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", r["date"])
        assert r["section"] in synth_data.SECTIONS
        assert r["manager"] == synth_data.FUNDS[r["fund"]]["manager"]
    assert rows == sorted(rows, key=lambda r: r["date"])
    # one row per fund+month+section; spread over enough months for a split by time
    assert len({(r["date"], r["fund"], r["section"]) for r in rows}) == len(rows)
    per_month = Counter(r["date"] for r in rows)
    assert len(per_month) >= 12
    assert max(per_month.values()) - min(per_month.values()) <= 1
    assert len({r["fund"] for r in rows}) >= 4


def test_more_rows_than_fit_in_the_minimum_months_add_months():
    rows = generate_pairs(500, 0)
    cells = len(synth_data.FUNDS) * len(synth_data.SECTIONS)
    assert len({r["date"] for r in rows}) == -(-500 // cells)
    assert len({(r["date"], r["fund"], r["section"]) for r in rows}) == 500


def test_numbers_in_draft_and_final_agree():
    rows = generate_pairs(300, 3)
    for r in rows:
        assert numbers(r["draft"]) == numbers(r["final"]), (r["draft"], r["final"])
    assert sum(bool(numbers(r["final"])) for r in rows) > len(rows) / 2  # the check is not vacuous


def test_finals_follow_house_style_and_drafts_do_not():
    rows = generate_pairs(300, 4)
    for r in rows:
        assert house_style_violations(r["final"]) == [], r["final"]
        assert 40 <= len(r["final"]) <= 160
        assert 1 <= r["final"].count("。") <= 3
    deviating = sum(bool(house_style_violations(r["draft"])) for r in rows)
    assert deviating / len(rows) > 0.8
    # each kind of deviation the card promises occurs somewhere
    kinds = Counter(v.split(":")[0] for r in rows for v in house_style_violations(r["draft"]))
    assert len(kinds) == len(synth_data.STYLE_CHECKS), kinds


@pytest.mark.parametrize("text,rule", [
    ("アメリカ株式市場は上昇しました。", "2"),
    ("TOPIXは前月末比＋２．１％となりました。", "3"),
    ("TOPIXは前月比2.1%の上昇となりました。", "4"),
    ("S&P500は4927.00ポイントとなりました。", "5"),
    ("BMを上回りました。", "6"),
    ("【市場概況】\n上昇しました。", "7"),
    ("上昇した。", "1"),
    ("上昇しました。下落した", "1"),
])
def test_style_checker_flags_each_rule(text, rule):
    assert any(v.startswith(rule + " ") for v in house_style_violations(text))


def test_dearu_transform_keeps_the_sentence():
    assert synth_data.to_dearu("上昇しました。予想します。方針です。目指します。") == "上昇した。予想する。方針である。目指す。"


def test_cli_writes_each_format(tmp_path):
    for suffix in (".jsonl", ".csv", ".xlsx"):
        out = tmp_path / f"pairs{suffix}"
        synth_data.main(["--n", "12", "--seed", "2", "--output", str(out)])
        assert out.stat().st_size > 0
    lines = (tmp_path / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == generate_pairs(12, 2)
    with pytest.raises(ValueError, match="suffix"):
        synth_data.write_rows([], tmp_path / "pairs.txt")


def test_demo_set_is_the_generator_output_stated_in_the_card():
    card = (ROOT / "datasets" / "README.md").read_text(encoding="utf-8")
    m = re.search(r"--n (\d+) --seed (\d+) --output datasets/demo_pairs\.jsonl", card)
    assert m, "datasets/README.md must give the command that wrote demo_pairs.jsonl"
    rows = [json.loads(x) for x in DEMO.read_text(encoding="utf-8").splitlines()]
    assert rows == generate_pairs(int(m.group(1)), int(m.group(2)))


def test_demo_rows_match_the_schema():
    schema = json.loads((ROOT / "datasets" / "schema.json").read_text(encoding="utf-8"))
    props = schema["properties"]
    for line in DEMO.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert set(schema["required"]) <= set(row)
        assert re.fullmatch(props["date"]["pattern"], row["date"])
        assert row["section"] in props["section"]["enum"]
        assert all(isinstance(row[k], str) and row[k].strip() for k in ("draft", "final"))
