"""Character-level diffs for Japanese text, as operations and as escaped HTML.

Japanese has no spaces, so a word or line diff marks a whole sentence as changed when one particle
was fixed. Here ``difflib.SequenceMatcher`` runs on characters (``autojunk=False``: with autojunk
the very common kana such as の and は would be ignored in texts over 200 characters), and a
replacement shows as the deleted characters followed by the inserted ones.

:func:`char_diff` returns the operations; :func:`diff_html` renders them as ``<del>`` / ``<ins>``
spans with inline styles (the page shows it with ``st.html``); every piece of text is HTML-escaped,
so a draft cannot inject markup into the page.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from difflib import SequenceMatcher

EQUAL, INSERT, DELETE = "equal", "insert", "delete"

DEL_STYLE = "background:#ffd7d5;color:#82071e;text-decoration:line-through"
INS_STYLE = "background:#ccffd8;color:#055d20;text-decoration:none"
BOX_STYLE = ("white-space:pre-wrap;word-break:break-all;line-height:1.8;padding:0.5em 0.75em;"
             "border:1px solid #d0d7de;border-radius:6px;font-size:0.95rem")


@dataclass(frozen=True)
class Op:
    tag: str  # EQUAL, INSERT or DELETE
    text: str


def char_diff(a: str, b: str, merge_short: int = 1) -> list[Op]:
    """Operations turning ``a`` into ``b``, character by character.

    ``merge_short``: an unchanged run of at most this many characters between two changes is
    folded into them (so 上昇し → 下落し reads as one replacement, not as a shared し between
    edits). 0 keeps the raw SequenceMatcher result. Joining the EQUAL and DELETE texts always gives
    back ``a``, and EQUAL and INSERT gives ``b``.
    """
    # common head and tail first: SequenceMatcher takes the longest match first, which for text
    # with repeated phrases can align a single edit far from where it was made
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
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


def _span(op: Op) -> str:
    text = html.escape(op.text, quote=True)
    if op.tag == EQUAL:
        return text
    # an inserted/deleted line break is otherwise invisible: show a ↵ before it
    text = text.replace("\n", "↵\n")
    tag, style = ("ins", INS_STYLE) if op.tag == INSERT else ("del", DEL_STYLE)
    return f'<{tag} style="{style}">{text}</{tag}>'


def ops_html(ops: list[Op]) -> str:
    """The operations as one ``<div>`` of escaped text with ``<ins>``/``<del>`` spans."""
    return f'<div class="char-diff" style="{BOX_STYLE}">' + "".join(_span(op) for op in ops) + "</div>"


def diff_html(a: str, b: str, merge_short: int = 1) -> str:
    """HTML showing how ``a`` became ``b`` (deleted characters struck through in red, inserted ones
    in green); all text escaped."""
    return ops_html(char_diff(a, b, merge_short))
