"""What one fund-report comment is, row by row: its three sections (and the headings external
managers use for them), its report month, and the text normalisation every row goes through.

The core definitions shared by the data pipeline (recipes.data validates file and database rows
with them) and the review app (review_app.store checks a review before saving it, review_app.app
and review_app.llm normalise what the page shows and saves). Pure functions of their arguments;
the rules are documented in datasets/README.md.
"""
from __future__ import annotations

import datetime as dt
import re
import unicodedata

SECTIONS = ("市場動向", "運用状況", "今後の見通しと運用方針")

_ZERO_WIDTH = {"\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"}


def char_class(code_points) -> str:
    """A regex character class ``[...]`` matching exactly these code points (consecutive ones as ranges)."""
    cps = sorted(set(code_points))
    ranges, start, prev = [], cps[0], cps[0]
    for c in cps[1:]:
        if c != prev + 1:
            ranges.append((start, prev))
            start = c
        prev = c
    ranges.append((start, prev))
    return "[" + "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges) + "]"


def _removed_class() -> re.Pattern:
    """Rule 2's characters as one regex class: control (Cc) except LF, format (Cf) and _ZERO_WIDTH. Cf
    characters exist only in planes 0, 1 and 14 (Unicode 15), which are scanned once at import."""
    return re.compile(char_class({ord(c) for c in _ZERO_WIDTH} | {
        c for plane in (range(0x0, 0x20000), range(0xE0000, 0xF0000)) for c in plane
        if c != 0x0A and not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) in ("Cc", "Cf")}))


_REMOVED = _removed_class()
_HALF_KANA = re.compile(r"[\uff61-\uff9f]+")  # half-width katakana and ｡｢｣､･ punctuation
_FULL_ALNUM = re.compile(r"[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a]")  # ０-９ Ａ-Ｚ ａ-ｚ
_NUM_SEP = re.compile(r"(?<=[0-9])[\uff0e\uff0c](?=[0-9])")  # ．，inside a number (after digits map)


def normalize_text(s: str) -> str:
    """Make text encoding-clean without restyling it. Exactly these changes, nothing else:

    1. line endings CRLF / CR -> LF; tab -> space;
    2. control characters (except LF) and zero-width / format characters (ZWSP, ZWJ, ZWNJ, word
       joiner, BOM, soft hyphen, other Unicode category Cf) are removed;
    3. half-width katakana (U+FF61-FF9F, with its ｡｢｣､･) -> full-width (NFKC on that range only, so
       ｶﾞ becomes ガ);
    4. full-width ASCII letters and digits (Ａ-Ｚ ａ-ｚ ０-９) -> half-width, and a full-width ．or ，
       between two digits (a decimal point / thousands separator) -> . / ,;
    5. runs of ASCII spaces -> one space; spaces at line ends and the text's ends are trimmed.

    Everything else is kept as written: 「」（）、。・①㈱％＋－ full-width punctuation, full-width
    spaces inside the text, アメリカ/米国, です/である. Turning a draft into house style is the
    model's job, so the normaliser must not do part of the rewrite; for every input
    ``NFKC(normalize_text(s)) == NFKC(s)`` up to rules 1, 2 and 5.
    """
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    s = _REMOVED.sub("", s)
    s = _HALF_KANA.sub(lambda m: unicodedata.normalize("NFKC", m.group()), s)
    s = _FULL_ALNUM.sub(lambda m: chr(ord(m.group()) - 0xFEE0), s)
    s = _NUM_SEP.sub(lambda m: chr(ord(m.group()) - 0xFEE0), s)
    s = re.sub(r" {2,}", " ", s)
    s = "\n".join(line.rstrip(" ") for line in s.split("\n"))
    return s.strip()


# Headings external managers use for the same section (compared after _section_key).
SECTION_SYNONYMS = {
    "市場動向": ["市場概況", "市場環境", "市況", "マーケット動向", "マーケットレビュー", "market review", "market"],
    "運用状況": ["運用経過", "ファンドの運用状況", "運用実績", "ポートフォリオの状況", "performance review",
             "performance"],
    "今後の見通しと運用方針": ["今後の見通し", "今後の運用方針", "運用方針", "見通し", "今後の方針",
                      "今後の見通しおよび運用方針", "今後の見通し及び運用方針", "outlook", "outlook & strategy"],
}


def _section_key(s: str) -> str:
    """Heading as compared for synonyms: NFKC, lower case, no brackets/markers/numbering/spaces."""
    s = unicodedata.normalize("NFKC", s).lower().strip()
    s = re.sub(r"^(\d+[.)]|[■□●◆・\-])\s*", "", s)
    return re.sub(r"[\s【】\[\]<>＜＞〈〉《》()]", "", s)


_SECTION_LOOKUP = {_section_key(k): k for k in SECTIONS}
_SECTION_LOOKUP.update({_section_key(v): k for k, vs in SECTION_SYNONYMS.items() for v in vs})


def canonical_section(s: str) -> str | None:
    """The canonical heading for ``s`` (itself or a synonym), or None if unknown."""
    return _SECTION_LOOKUP.get(_section_key(s))


_DATE_FORMS = [re.compile(p) for p in (r"(\d{4})[-/](\d{1,2})", r"(\d{4})[-/](\d{1,2})[-/](\d{1,2})",
                                         r"(\d{4})年(\d{1,2})月", r"(\d{4})年(\d{1,2})月(\d{1,2})日")]
DATE_HELP = "expected YYYY-MM, YYYY/MM, YYYY-MM-DD, YYYY/MM/DD or YYYY年M月"


def parse_month(value) -> str | None:
    """'YYYY-MM' for a month or a day in that month (the report date); None if not a date."""
    if isinstance(value, (dt.date, dt.datetime)):  # an XLSX date cell
        return f"{value.year:04d}-{value.month:02d}"
    s = unicodedata.normalize("NFKC", str(value)).strip()
    for pat in _DATE_FORMS:
        m = pat.fullmatch(s)
        if m:
            y, mo, *d = (int(g) for g in m.groups())
            try:
                dt.date(y, mo, d[0] if d else 1)
            except ValueError:
                return None
            return f"{y:04d}-{mo:02d}" if 1900 <= y <= 2100 else None
    return None
