"""Character-level diffs for Japanese text as escaped HTML, for the review page.

The diff itself is ``recipes.textdiff.char_diff`` (on characters, the common head and tail matched
first, short unchanged runs between two changes folded into them); :func:`ops_html` renders its
operations as ``<del>`` / ``<ins>`` spans with inline styles (the page shows it with ``st.html``)
and :func:`diff_html` diffs and renders in one call. Every piece of text is HTML-escaped, so a
draft cannot inject markup into the page.
"""
from __future__ import annotations

import html

from recipes.textdiff import EQUAL, INSERT, Op, char_diff

DEL_STYLE = "background:#ffd7d5;color:#82071e;text-decoration:line-through"
INS_STYLE = "background:#ccffd8;color:#055d20;text-decoration:none"
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
