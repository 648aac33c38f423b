"""recipes.textdiff and review_app.diff: character-level diffs of Japanese text and their HTML
(escaping, markup)."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from recipes.textdiff import DELETE, EQUAL, INSERT, Op, char_diff, diff_counts
from review_app.diff import diff_html

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _side(ops: list[Op], keep: str) -> str:
    return "".join(op.text for op in ops if op.tag in (EQUAL, keep))


def test_insertion_marks_only_the_inserted_characters():
    assert char_diff("日経平均は上昇した。", "日経平均株価は上昇した。") == [
        Op(EQUAL, "日経平均"), Op(INSERT, "株価"), Op(EQUAL, "は上昇した。")]


def test_deletion_marks_only_the_deleted_characters():
    assert char_diff("株価は上昇しました。", "株価は上昇した。") == [
        Op(EQUAL, "株価は上昇し"), Op(DELETE, "まし"), Op(EQUAL, "た。")]


def test_replacement_is_delete_then_insert():
    ops = char_diff("米国の株式市場は下落した。", "アメリカの株式市場は上昇した。")
    assert ops == [Op(DELETE, "米国"), Op(INSERT, "アメリカ"), Op(EQUAL, "の株式市場は"),
                   Op(DELETE, "下落"), Op(INSERT, "上昇"), Op(EQUAL, "した。")]
    assert diff_counts(ops) == {"inserted": 6, "deleted": 4, "equal": 9}


def test_short_shared_runs_between_changes_are_merged():
    a, b = "円安が進行", "円高が加速"
    raw = char_diff(a, b, merge_short=0)
    assert raw == [Op(EQUAL, "円"), Op(DELETE, "安"), Op(INSERT, "高"), Op(EQUAL, "が"),
                   Op(DELETE, "進行"), Op(INSERT, "加速")]
    assert char_diff(a, b) == [Op(EQUAL, "円"), Op(DELETE, "安が進行"), Op(INSERT, "高が加速")]


def test_single_edit_in_repetitive_text_stays_where_it_was_made():
    """SequenceMatcher alone aligns on the longest match first: in text with repeated phrases a
    one-character edit then shows as a long insertion plus a long deletion elsewhere."""
    a = "当ファンドの基準価額は上昇しました。" * 20
    b = a[:150] + "下" + a[151:]
    ops = char_diff(a, b)
    assert diff_counts(ops) == {"inserted": 1, "deleted": 1, "equal": len(a) - 1}
    assert ops[1] == Op(DELETE, a[150]) and ops[2] == Op(INSERT, "下")


def test_frequent_kana_are_not_junk_in_long_texts():
    """Over 200 characters, SequenceMatcher's autojunk ignores characters such as の and 、 when
    it looks for matches, which makes some diffs much larger than the edit."""
    from difflib import SequenceMatcher
    a = "".join(_real_sentences()[:4])
    assert len(a) > 400

    def changed(ops) -> int:
        n = diff_counts(ops)
        return max(n["inserted"], n["deleted"])

    rng, worse_with_autojunk = random.Random(0), 0
    for _ in range(300):
        t = list(a)
        for _ in range(2):
            i = rng.randrange(len(t))
            t[i:i + rng.randint(1, 3)] = rng.choice(["、", "の", "は", "を"])
        b = "".join(t)
        ours = changed(char_diff(a, b, merge_short=0))
        junked = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in
                     SequenceMatcher(None, a, b).get_opcodes() if tag != "equal")
        assert ours <= junked
        worse_with_autojunk += ours + 5 < junked
    assert worse_with_autojunk >= 1  # the case this guards against does occur on real text


def _real_sentences() -> list[str]:
    path = SHARED / "chabsa" / "chabsa_sample_sentences.txt"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return [s for s in path.read_text(encoding="utf-8").splitlines() if len(s) > 20][:60]


@pytest.mark.parametrize("merge_short", [0, 1, 3])
def test_ops_rebuild_both_texts_on_real_sentences(merge_short):
    rng = random.Random(merge_short)
    for s in _real_sentences():
        t = list(s)
        for _ in range(3):  # a deletion, an insertion and a replacement at random places
            i = rng.randrange(len(t))
            op = rng.choice(("del", "ins", "rep"))
            if op == "del":
                del t[i:i + rng.randint(1, 4)]
            elif op == "ins":
                t[i:i] = list("（注）")
            else:
                t[i:i + 2] = list("増加")
        b = "".join(t)
        ops = char_diff(s, b, merge_short)
        assert _side(ops, DELETE) == s and _side(ops, INSERT) == b
        assert all(op.text for op in ops)
        if merge_short:  # after merging no change is split by a run of <= merge_short equal chars
            for x, y, z in zip(ops, ops[1:], ops[2:]):
                assert not (y.tag == EQUAL and len(y.text) <= merge_short and x.tag != EQUAL and z.tag != EQUAL)


def test_html_escapes_text_and_uses_only_diff_markup():
    a = '基準価額は<script>alert("x")</script>上昇'
    b = '基準価額は<b onclick="steal()">大幅に</b>上昇 A&B'
    html = diff_html(a, b)
    assert "<script" not in html and "<b " not in html and 'onclick="' not in html
    assert "A&amp;B" in html
    removed = diff_html(a, "基準価額は上昇")
    assert re.search(r"<del[^>]*>&lt;script&gt;alert\(&quot;x&quot;\)&lt;/script&gt;</del>", removed)
    assert {t for t in re.findall(r"</?([a-zA-Z]+)", html)} <= {"div", "ins", "del"}
    # what is inside <ins>/<del> is exactly the inserted/deleted text, once unescaped
    import html as h
    ins = "".join(h.unescape(x) for x in re.findall(r"<ins[^>]*>(.*?)</ins>", html, re.S))
    dels = "".join(h.unescape(x) for x in re.findall(r"<del[^>]*>(.*?)</del>", html, re.S))
    ops = char_diff(a, b)
    assert ins == "".join(o.text for o in ops if o.tag == INSERT)
    assert dels == "".join(o.text for o in ops if o.tag == DELETE)


def test_html_marks_japanese_insertions_and_deletions():
    html = diff_html("株価は大きく上昇した。", "日経平均株価は上昇した。")
    assert re.search(r"<ins[^>]*>日経平均</ins>株価は<del[^>]*>大きく</del>上昇した。</div>$", html)


def test_inserted_line_break_is_visible():
    html = diff_html("市場動向。運用状況。", "市場動向。\n運用状況。")
    assert re.search(r"<ins[^>]*>↵\n</ins>", html)


def test_identical_texts_have_no_changes():
    s = "基準価額は前月末比で上昇しました。"
    assert char_diff(s, s) == [Op(EQUAL, s)]
    assert "<ins" not in diff_html(s, s) and "<del" not in diff_html(s, s)
    assert char_diff("", "") == []
