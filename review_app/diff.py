"""Character-level diffs for Japanese text as escaped HTML, for the review page.

The diff itself is ``recipes.textdiff.char_diff`` (on characters, the common head and tail matched
first, short unchanged runs between two changes folded into them); :func:`ops_html` renders its
operations as ``<del>`` / ``<ins>`` spans with inline styles (the page shows it with ``st.html``)
and :func:`diff_html` diffs and renders in one call. :func:`marked_html` shows one text with spans
of it (the numbers and instruments benchmarks.fidelity found) wrapped in ``<mark>``. Every piece of
text is HTML-escaped, so a draft cannot inject markup into the page.
"""
from __future__ import annotations

import html
from typing import Iterable, NamedTuple

from recipes.textdiff import EQUAL, INSERT, Op, char_diff

DEL_STYLE = "background:#ffd7d5;color:#82071e;text-decoration:line-through"
INS_STYLE = "background:#ccffd8;color:#055d20;text-decoration:none"
# a span with a finding (changed, missing or added) / a fact found unchanged in the other text
MARK_STYLES = {"finding": "background:#ffe08a;color:#5c3b00;outline:2px solid #d4a72c;border-radius:2px",
               "fact": "background:#e6edf5;color:inherit;border-radius:2px"}
BOX_STYLE = ("white-space:pre-wrap;word-break:break-all;line-height:1.8;padding:0.5em 0.75em;"
             "border:1px solid #d0d7de;border-radius:6px;font-size:0.95rem")


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


class Mark(NamedTuple):
    """``text[start:end]`` to be marked; ``kind`` is a key of :data:`MARK_STYLES`; ``title`` the tooltip."""
    start: int
    end: int
    kind: str = "finding"
    title: str = ""


def marked_html(text: str, marks: Iterable[Mark]) -> str:
    """``text`` as one ``<div>`` of escaped text with each mark's span wrapped in
    ``<mark class="fact-KIND" title="..." style="...">``. Where marks overlap, the one starting first
    wins (a ``finding`` before a ``fact`` at the same start) and the other is left out. A span outside
    the text is a ValueError (spans must come from this very text)."""
    order = {k: i for i, k in enumerate(MARK_STYLES)}
    chosen: list[Mark] = []
    for m in sorted(marks, key=lambda m: (m.start, order.get(m.kind, len(order)), -m.end)):
        if not 0 <= m.start < m.end <= len(text):
            raise ValueError(f"mark [{m.start}, {m.end}) is outside a text of {len(text)} characters")
        if m.kind not in MARK_STYLES:
            raise ValueError(f"mark kind {m.kind!r}: expected one of {', '.join(MARK_STYLES)}")
        if chosen and m.start < chosen[-1].end:
            continue
        chosen.append(m)
    out, at = [], 0
    for m in chosen:
        out.append(html.escape(text[at:m.start], quote=True))
        title = f' title="{html.escape(m.title, quote=True)}"' if m.title else ""
        out.append(f'<mark class="fact-{m.kind}"{title} style="{MARK_STYLES[m.kind]}">'
                   f"{html.escape(text[m.start:m.end], quote=True)}</mark>")
        at = m.end
    out.append(html.escape(text[at:], quote=True))
    return f'<div class="fact-marks" style="{BOX_STYLE}">' + "".join(out) + "</div>"
