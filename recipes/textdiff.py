"""Character-level diffs for Japanese text, as operations: the one diff behind the review app's
HTML (review_app.diff) and the model-comparison examples (benchmarks.model_eval's examples.md).

Japanese has no spaces, so a word or line diff marks a whole sentence as changed when one particle
was fixed. Here ``difflib.SequenceMatcher`` runs on characters (``autojunk=False``: with autojunk
the very common kana such as の and は would be ignored in texts over 200 characters), and a
replacement shows as the deleted characters followed by the inserted ones.

:func:`char_diff` returns the operations (:class:`Op`, ``(tag, text)`` tuples); :func:`diff_counts`
counts their characters. Rendering them is the caller's business.
"""
from __future__ import annotations

from difflib import SequenceMatcher
from typing import NamedTuple

EQUAL, INSERT, DELETE = "equal", "insert", "delete"


class Op(NamedTuple):
    tag: str  # EQUAL, INSERT or DELETE
    text: str


def char_diff(a: str, b: str, merge_short: int = 1, trim_ends: bool = True) -> list[Op]:
    """Operations turning ``a`` into ``b``, character by character.

    ``trim_ends``: the common head and tail are matched first, so one edit in text with repeated
    phrases is shown where it was made (SequenceMatcher alone takes the longest match first and
    can align it far away); False gives SequenceMatcher's own alignment of the whole texts.
    ``merge_short``: an unchanged run of at most this many characters between two changes is
    folded into them (so 上昇し → 下落し reads as one replacement, not as a shared し between
    edits). 0 keeps the SequenceMatcher result. Joining the EQUAL and DELETE texts always gives
    back ``a``, and EQUAL and INSERT gives ``b``. ``merge_short=0, trim_ends=False`` is exactly
    SequenceMatcher's opcodes, a replacement as DELETE then INSERT.
    """
    head = tail = 0
    if trim_ends:
        while head < min(len(a), len(b)) and a[head] == b[head]:
            head += 1
        while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
            tail += 1
    ops: list[Op] = [Op(EQUAL, a[:head])] if head else []
    a_mid, b_mid = a[head:len(a) - tail], b[head:len(b) - tail]
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, a_mid, b_mid, autojunk=False).get_opcodes():
        if tag in ("delete", "replace"):
            ops.append(Op(DELETE, a_mid[i1:i2]))
        if tag in ("insert", "replace"):
            ops.append(Op(INSERT, b_mid[j1:j2]))
        if tag == "equal":
            ops.append(Op(EQUAL, a_mid[i1:i2]))
    if tail:
        ops.append(Op(EQUAL, a[len(a) - tail:]))
    ops = _coalesce(ops)
    if merge_short > 0:
        ops = _merge_short_equals(ops, merge_short)
    return ops


def _coalesce(ops: list[Op]) -> list[Op]:
    """Join neighbouring operations of the same kind (the head/tail split can leave two EQUALs)."""
    out: list[Op] = []
    for op in ops:
        if out and out[-1].tag == op.tag:
            out[-1] = Op(op.tag, out[-1].text + op.text)
        else:
            out.append(op)
    return out


def _merge_short_equals(ops: list[Op], limit: int) -> list[Op]:
    """Fold short EQUAL runs that sit between changes into the surrounding DELETE/INSERT, then
    coalesce neighbours into one DELETE followed by one INSERT per changed stretch."""
    out: list[Op] = []
    i = 0
    while i < len(ops):
        if ops[i].tag == EQUAL:
            out.append(ops[i])
            i += 1
            continue
        # a changed stretch: changes, possibly with short equal runs inside
        dels, inss = [], []
        while i < len(ops):
            op = ops[i]
            if op.tag == DELETE:
                dels.append(op.text)
            elif op.tag == INSERT:
                inss.append(op.text)
            elif len(op.text) <= limit and i + 1 < len(ops):
                dels.append(op.text)  # the shared characters were deleted and re-inserted
                inss.append(op.text)
            else:
                break
            i += 1
        if "".join(dels):
            out.append(Op(DELETE, "".join(dels)))
        if "".join(inss):
            out.append(Op(INSERT, "".join(inss)))
    return out


def diff_counts(ops: list[Op]) -> dict[str, int]:
    """Characters inserted, deleted and kept."""
    n = {EQUAL: 0, INSERT: 0, DELETE: 0}
    for op in ops:
        n[op.tag] += len(op.text)
    return {"inserted": n[INSERT], "deleted": n[DELETE], "equal": n[EQUAL]}
