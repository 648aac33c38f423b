"""normalize_text: exactly the documented mappings, and meaning intact on real Japanese financial
text (chABSA securities-report sentences, Economy Watchers Survey comments; CC BY 4.0, read by
path from /work/shared/data and skipped when absent)."""
from __future__ import annotations

import difflib
import json
import unicodedata
from pathlib import Path

import pytest

from recipes.schema import normalize_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KEEP = "「」（）①②㈱％、。・：　＋－！？【】"  # must survive unchanged (full-width space included)


def nfkc(s: str) -> str:
    return unicodedata.normalize("NFKC", s)


def is_documented_mapping(orig: str, new: str) -> bool:
    """orig -> new is one of the normaliser's mappings: half-width katakana -> full-width,
    full-width ASCII letters/digits (and ．，inside numbers) -> half-width."""
    mapped = all("\uff61" <= c <= "\uff9f" or c.isascii() is False and nfkc(c).isalnum() and nfkc(c).isascii()
                 or c in "．，" for c in orig)
    return mapped and nfkc(orig) == new


@pytest.mark.parametrize("raw,expected", [
    ("a\r\nb\rc", "a\nb\nc"),
    ("  前月末比+2.1%  ", "前月末比+2.1%"),
    ("米国\u200b株式\ufeff市場\u00ad", "米国株式市場"),
    ("ﾍﾞﾝﾁﾏｰｸ｢ﾎﾟｲﾝﾄ｣", "ベンチマーク「ポイント」"),
    ("ＴＯＰＩＸは２，５０１．７１ポイント（前月末比－２．１％）", "TOPIXは2,501.71ポイント（前月末比－2.1％）"),
    ("１．日本。", "1．日本。"),  # ．not between digits: punctuation, kept
    ("末尾．", "末尾．"),
    ("a    b\tc", "a b c"),
    ("行末   \n次の行", "行末\n次の行"),
    ("・アメリカ株式は上昇した。\n・FRB", "・アメリカ株式は上昇した。\n・FRB"),
    ("①㈱　全角スペース　のまま", "①㈱　全角スペース　のまま"),
    ("bell\x07 and nul\x00", "bell and nul"),
])
def test_documented_mappings(raw, expected):
    assert normalize_text(raw) == expected


def test_idempotent():
    s = "ﾃｽﾄ　１２３ＡＢＣ\r\n  ％（）"
    assert normalize_text(normalize_text(s)) == normalize_text(s)


def _real_sentences() -> list[str]:
    out = []
    chabsa = SHARED / "chabsa" / "chabsa_sample_sentences.txt"
    if chabsa.is_file():
        out += [x for x in chabsa.read_text(encoding="utf-8").splitlines() if x.strip()]
    ews_dir = SHARED / "economy-watchers"
    for f in sorted(ews_dir.glob("ews_*_sample.jsonl")) if ews_dir.is_dir() else []:
        for line in f.read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            out += [d[k] for k in ("追加説明及び具体的状況の説明", "景気の先行きに対する判断理由") if d.get(k)]
    if len(out) < 100:
        pytest.skip(f"real text samples not found under {SHARED}")
    return out


def test_real_text_changes_only_at_documented_characters():
    sents = _real_sentences()
    changed = 0
    for s in sents:
        n = normalize_text(s)
        changed += n != s
        for op, a, b, x, y in difflib.SequenceMatcher(None, s, n, autojunk=False).get_opcodes():
            if op != "equal":
                assert is_documented_mapping(s[a:b], n[x:y]), (s, s[a:b], n[x:y])
    # the samples do contain full-width digits/letters, so the mapping check above is exercised
    assert changed > 10


def test_real_text_meaning_intact_under_nfkc():
    for s in _real_sentences():
        assert nfkc(normalize_text(s)) == nfkc(s.strip()), s


def test_real_text_keeps_japanese_punctuation_and_symbols():
    sents = _real_sentences()
    joined = "".join(sents)
    present = [c for c in KEEP if c in joined]
    assert {"「", "」", "（", "）", "％", "、", "。"} <= set(present)  # the test sees them
    for s in sents:
        n = normalize_text(s)
        for c in KEEP:
            assert n.count(c) == s.count(c), (c, s)
