"""Fact fidelity: every number and named instrument of a draft survives its rewrite.

A changed return, index level, rate or month is a compliance incident that BLEU hardly sees (one wrong
digit costs almost nothing). This module extracts the facts of a comment and compares a draft with its
rewrite, deterministically, naming the span of each finding in both texts.

**Facts.** Numbers with their unit, sign and period, and instruments from a vocabulary:

* units: ``%``; ``pt`` (ポイント, %ポイント, pt, %pt: house style writes a change of a rate in
  %ポイント, drafts often ポイント); ``bp``; money in yen or dollars with 万/億/兆 folded in
  (``1.5兆円`` = ``1兆5,000億円`` = 1.5e12 円); 倍; 銘柄; 社; 件; years (``2023年``), months (``1月``,
  ``2023年1月``) and days are **period** facts;
* sign: an explicit ``+``/``-``/``−``/``▲``/``△``/マイナス/プラス before the number, else a direction word
  right after it (``2.1%下落``, ``2.1%の低下``, ``0.3%ポイント下回りました`` are negative; 上昇, 上回る,
  増加 positive), else ``+`` for a change that follows a change marker (前月末比 2.1% = +2.1%); a level
  (``2,501.71ポイント``) has no sign;
* period of a change: the marker before it in the same clause — 前月末比/前月比/対前月/前月末から (month
  on month), 前年比/前年同月比 (year on year), 年初来 (year to date), 前週比 (week on week); ``同`` repeats
  the previous one;
* instruments: :data:`INSTRUMENTS` (TOPIX, 日経平均株価, S&P500, 東証REIT指数, 米国10年国債, …) with
  their aliases (``S&P 500``, ``米10年国債``, …), extendable with a JSON file ``{"canonical": ["alias",
  ...]}`` (:func:`load_vocabulary`). Digits inside an instrument name (S&P**500**) are not numbers.

Equivalent forms match: full-/half-width digits and punctuation (NFKC), thousands separators,
パーセント = %, ``２．１％下落`` = ``-2.1%``, ``▲1.2%`` = ``-1.2%``, ``2.10%`` = ``2.1%`` (values are
decimals). List numbering at a line start (``1. 市場動向``) is layout, not a fact.

**Findings** (:func:`compare`): facts are paired exactly first (value, unit, sign, period); what is left is
paired as ``sign_flipped`` (same magnitude and unit, other sign, or a sign lost), ``period_changed`` (same number, other
period), ``unit_changed`` (same signed value, other unit), ``value_changed`` (same unit and kind, other
value, in order of appearance); the rest is ``missing`` (in the draft only) or ``added`` (in the rewrite
only). Instruments are ``missing``/``added`` by name.

**What it cannot catch**: facts without numbers or a listed name (``円安が進みました`` → ``円高``; a
sector, a driver, a paraphrased reason), a direction word far from its number, a number moved to another
instrument in the same text, a unit written as a word the lists do not know. It is a check of the
numbers and names, not of meaning.

    python -m benchmarks.fidelity --pairs pairs.jsonl [--json findings.json] [--vocabulary extra.json]
"""
from __future__ import annotations

import json
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Iterable, Optional

from benchmarks import tracking
from recipes.schema import char_class

# canonical name -> aliases (compared after NFKC; longest alias first at match time)
INSTRUMENTS: dict[str, list[str]] = {
    "TOPIX": ["TOPIX", "東証株価指数"],
    "日経平均株価": ["日経平均株価", "日経平均", "日経225"],
    "S&P500": ["S&P500種株価指数", "S&P 500", "S&P500", "S&P総合500"],
    "NYダウ": ["NYダウ", "ダウ平均株価", "ダウ工業株30種平均", "ダウ平均"],
    "ナスダック総合指数": ["ナスダック総合指数", "NASDAQ総合指数", "ナスダック指数"],
    "東証REIT指数": ["東証REIT指数", "東証リート指数"],
    "米国10年国債": ["米国10年国債", "米10年国債", "アメリカ10年国債", "米国10年債", "米10年債"],
    "ドイツ10年国債": ["ドイツ10年国債", "独10年国債", "ドイツ10年債", "独10年債"],
    "日本10年国債": ["日本10年国債", "国内10年国債", "日本10年債", "10年国債"],
    "MSCIコクサイ指数": ["MSCIコクサイ指数", "MSCIコクサイ"],
    "MSCIエマージング指数": ["MSCIエマージング・マーケット指数", "MSCIエマージング指数", "MSCI新興国指数"],
    "WTI原油先物": ["WTI原油先物", "WTI原油", "WTI"],
    "FTSE世界国債インデックス": ["FTSE世界国債インデックス", "FTSE WGBI", "WGBI"],
}

KINDS = ("missing", "added", "value_changed", "sign_flipped", "unit_changed", "period_changed")

_SIGN_BEFORE = r"(?P<sign>[+\-−‐–▲△]|マイナス|プラス)?"
_NUMBER = r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
_MONEY = (r"(?P<m_head>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?P<m_big>[兆億万])"
          r"(?:(?P<m_oku>\d{1,3}(?:,\d{3})+|\d+)億)?(?:(?P<m_man>\d{1,3}(?:,\d{3})+|\d+)万)?(?P<m_cur>円|ドル)")
_UNITS = (("%ポイント", "pt"), ("%pt", "pt"), ("ポイント", "pt"), ("pt", "pt"), ("%", "%"), ("bps", "bp"),
          ("bp", "bp"), ("ベーシスポイント", "bp"), ("円", "円"), ("ドル", "ドル"), ("倍", "倍"), ("銘柄", "銘柄"),
          ("社", "社"), ("件", "件"), ("カ月", "months"), ("ヵ月", "months"), ("ヶ月", "months"))
_UNIT_RE = "|".join(re.escape(u) for u, _ in sorted(_UNITS, key=lambda x: -len(x[0])))
_TOKEN = re.compile(
    rf"(?P<year>\d{{4}})年(?:(?P<ym>\d{{1,2}})月)?|(?<![\d.])(?P<month>\d{{1,2}})月(?!間)"
    rf"|{_SIGN_BEFORE}(?:{_MONEY}|{_NUMBER}(?P<unit>{_UNIT_RE})?)")
_UNIT_MAP = dict(_UNITS)
_BIG = {"兆": Decimal(10) ** 12, "億": Decimal(10) ** 8, "万": Decimal(10) ** 4}
_DIRECTION = re.compile(r"\s*(?:の)?(?P<w>下落|低下|下回|減少|悪化|マイナス|上昇|上回|増加|改善|プラス)")
_NEG_WORDS = ("下落", "低下", "下回", "減少", "悪化", "マイナス")
_PERIODS = (("前月末比", "mom"), ("前月比", "mom"), ("対前月", "mom"), ("前月末から", "mom"), ("前月から", "mom"),
            ("前年同月比", "yoy"), ("前年比", "yoy"), ("対前年", "yoy"), ("前年末比", "ytd"), ("年初来", "ytd"),
            ("前週比", "wow"), ("前週末比", "wow"))
_PERIOD_RE = re.compile("|".join(re.escape(p) for p, _ in sorted(_PERIODS, key=lambda x: -len(x[0]))) + r"|同(?=[+\-−▲△\d]|マイナス|プラス)")
_CLAUSE_END = re.compile(r"[、。，,；;（）()\n「」]")
_LIST_NUMBER = re.compile(r"(?m)^[ \t]*\d{1,2}[.)．）][ \t]*")


@dataclass(frozen=True)
class Fact:
    """One fact of a text: ``kind`` is ``number``, ``period`` or ``instrument``."""

    kind: str
    value: str  # Decimal as text ("-2.1" is signed; "2501.71" a level), "2023-01", or the instrument's canonical name
    unit: str = ""  # %, pt, bp, 円, ドル, 倍, 銘柄, ... ("" for a bare number)
    sign: str = ""  # "+", "-" or "" (no sign: a level)
    period: str = ""  # mom, yoy, ytd, wow or ""
    start: int = 0  # span in the original text
    end: int = 0
    text: str = ""  # the original text of the span

    @property
    def magnitude(self) -> str:
        return self.value.lstrip("-") if self.kind == "number" else self.value

    def describe(self) -> str:
        if self.kind == "instrument":
            return self.value
        if self.kind == "period":
            return self.value
        sign = self.sign if self.sign == "+" else ""
        period = f" ({self.period})" if self.period else ""
        return f"{sign}{self.value}{self.unit}{period}"


@dataclass(frozen=True)
class Finding:
    """A difference between a draft and its rewrite; spans are ``[start, end)`` in each original text."""

    kind: str  # one of KINDS
    message: str
    draft_span: Optional[tuple[int, int]] = None
    final_span: Optional[tuple[int, int]] = None
    draft_text: str = ""
    final_text: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["draft_span"] = list(self.draft_span) if self.draft_span else None
        d["final_span"] = list(self.final_span) if self.final_span else None
        return d


@dataclass
class Comparison:
    draft_facts: list[Fact]
    final_facts: list[Fact]
    findings: list[Finding]
    kept: int  # draft facts found unchanged in the rewrite (= rewrite facts that are in the draft)

    @property
    def recall(self) -> float:
        """Share of the draft's facts kept (1.0 for a draft without facts)."""
        return self.kept / len(self.draft_facts) if self.draft_facts else 1.0

    @property
    def precision(self) -> float:
        """Share of the rewrite's facts that are the draft's (1.0 for a rewrite without facts)."""
        return self.kept / len(self.final_facts) if self.final_facts else 1.0

    @property
    def faithful(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"faithful": self.faithful, "findings": [f.to_dict() for f in self.findings],
                "draft_facts": len(self.draft_facts), "final_facts": len(self.final_facts), "kept": self.kept,
                "recall": self.recall, "precision": self.precision}


# ---------------------------------------------------------------------------------------------
# normalisation with an offset map back to the original text


def _unstable_class() -> re.Pattern:
    """A regex of the BMP characters NFKC changes (plus U+2212 MINUS SIGN): only their runs need the
    per-character pass; everything else maps one to one."""
    cls = char_class([c for c in range(0x80, 0x10000) if not 0xD800 <= c <= 0xDFFF
                      and unicodedata.normalize("NFKC", chr(c)) != chr(c)] + [0x2212])
    return re.compile(f"{cls}+|パーセント")


_UNSTABLE = _unstable_class()


def normalize(text: str) -> tuple[str, list[int]]:
    """NFKC form of ``text`` (full-width digits/punctuation and half-width katakana folded; パーセント -> %,
    U+2212 -> -) and, for each of its characters, the index of the original character it came from."""
    out: list[str] = []
    pos: list[int] = []
    last = 0
    for m in _UNSTABLE.finditer(text):
        if m.start() > last:
            out.append(text[last:m.start()])
            pos.extend(range(last, m.start()))
        if m.group() == "パーセント":
            out.append("%")
            pos.append(m.start())
        else:
            for i in range(m.start(), m.end()):
                n = "-" if text[i] == "−" else unicodedata.normalize("NFKC", text[i])
                if n in ("\u3099", "\u309a") and out:  # a half-width (han)dakuten: compose with the kana before it
                    prev = out.pop()
                    out.append(prev[:-1] + unicodedata.normalize("NFC", prev[-1:] + n))
                    continue
                out.append(n)
                pos.extend([i] * len(n))
        last = m.end()
    if last == 0 and not out:
        return text, list(range(len(text)))
    out.append(text[last:])
    pos.extend(range(last, len(text)))
    return "".join(out), pos


def load_vocabulary(path: str | Path | None = None) -> dict[str, list[str]]:
    """:data:`INSTRUMENTS` plus the instruments of a JSON file ``{"canonical": ["alias", ...]}``."""
    vocab = {k: list(v) for k, v in INSTRUMENTS.items()}
    if path is None:
        return vocab
    p = Path(path)
    try:
        extra = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: vocabulary file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None
    if not isinstance(extra, dict) or not all(isinstance(v, list) and all(isinstance(a, str) and a for a in v)
                                              for v in extra.values()):
        raise ValueError(f'{p}: expected {{"canonical name": ["alias", ...], ...}}')
    for name, aliases in extra.items():
        vocab.setdefault(name, [])
        vocab[name] += [a for a in [name, *aliases] if a not in vocab[name]]
    return vocab


class FactExtractor:
    """Extracts :class:`Fact` lists; one instance per vocabulary (its alias regex is compiled once)."""

    def __init__(self, vocabulary: dict[str, list[str]] | None = None):
        vocab = vocabulary or INSTRUMENTS
        aliases = sorted({(unicodedata.normalize("NFKC", a), name) for name, al in vocab.items() for a in [name, *al]},
                         key=lambda x: -len(x[0]))
        self._alias = {a: name for a, name in aliases}
        self._alias_re = re.compile("|".join(re.escape(a) for a, _ in aliases)) if aliases else None

    def facts(self, text: str) -> list[Fact]:
        norm, pos = normalize(text)
        facts: list[Fact] = []

        def span(a: int, b: int) -> tuple[int, int]:
            return pos[a], pos[b - 1] + 1

        cut = []  # spans that are no numbers: instrument names (S&P500), list numbering
        if self._alias_re is not None:
            for m in self._alias_re.finditer(norm):
                s, e = span(m.start(), m.end())
                facts.append(Fact("instrument", self._alias[m.group()], start=s, end=e, text=text[s:e]))
                cut.append((m.start(), m.end()))
        cut += [(m.start(), m.end()) for m in _LIST_NUMBER.finditer(norm)]
        work = norm
        for a, b in cut:
            work = work[:a] + "\x00" * (b - a) + work[b:]
        last_period = ""
        for m in _TOKEN.finditer(work):
            s, e = span(m.start(), m.end())
            if m.group("year"):
                value = m.group("year") + (f"-{int(m.group('ym')):02d}" if m.group("ym") else "")
                facts.append(Fact("period", value, start=s, end=e, text=text[s:e]))
                continue
            if m.group("month"):
                facts.append(Fact("period", f"--{int(m.group('month')):02d}", start=s, end=e, text=text[s:e]))
                continue
            if m.group("m_head"):
                value = Decimal(m.group("m_head").replace(",", "")) * _BIG[m.group("m_big")]
                for g, mult in (("m_oku", _BIG["億"]), ("m_man", _BIG["万"])):
                    if m.group(g):
                        value += Decimal(m.group(g).replace(",", "")) * mult
                unit = m.group("m_cur")
            else:
                value = Decimal(m.group("num").replace(",", ""))
                unit = _UNIT_MAP.get(m.group("unit") or "", "")
            sign = ""
            raw = m.group("sign")
            if raw:
                sign = "+" if raw in ("+", "プラス") else "-"
            period = self._period_before(work, m.start(), last_period)
            after = _DIRECTION.match(work, m.end())
            if not sign and after:
                sign = "-" if after.group("w").startswith(_NEG_WORDS) else "+"
            if not sign and period:
                sign = "+"  # a change after 前月末比 without a sign is a rise
            if period:
                last_period = period
            value = value.normalize()
            text_value = format(-value if sign == "-" else value, "f")
            facts.append(Fact("number", text_value, unit=unit, sign=sign, period=period, start=s, end=e,
                              text=text[s:e]))
        facts.sort(key=lambda f: (f.start, f.end))
        return facts

    @staticmethod
    def _period_before(work: str, at: int, last: str) -> str:
        """The change marker before position ``at`` in the same clause ('' when none)."""
        lo = at
        while lo > 0 and not _CLAUSE_END.match(work[lo - 1]) and at - lo < 16:
            lo -= 1
        found = ""
        for m in _PERIOD_RE.finditer(work[lo:at + 2]):
            found = last if m.group() == "同" else dict(_PERIODS).get(m.group(), "")
        return found


_DEFAULT = FactExtractor()


def extract_facts(text: str, extractor: FactExtractor | None = None) -> list[Fact]:
    return (extractor or _DEFAULT).facts(text)


# ---------------------------------------------------------------------------------------------
# comparison


def _key(f: Fact) -> tuple:
    return (f.kind, f.value, f.unit, f.sign, f.period)


def compare(draft: str, final: str, extractor: FactExtractor | None = None) -> Comparison:
    """The findings of ``final`` against ``draft`` (see the module docstring for the pairing order)."""
    ex = extractor or _DEFAULT
    d_facts, f_facts = ex.facts(draft), ex.facts(final)
    d_left, f_left = list(d_facts), list(f_facts)
    kept = 0
    # 1. exact (a draft fact without a period also matches the same number with one, and vice versa)
    for strict in (True, False):
        for d in list(d_left):
            for f in f_left:
                if _key(d) == _key(f) or (not strict and d.kind == f.kind == "number"
                                          and _key(d)[:4] == _key(f)[:4] and not (d.period and f.period)):
                    d_left.remove(d)
                    f_left.remove(f)
                    kept += 1
                    break
    findings: list[Finding] = []

    def pair(rule, kind, message):
        for d in list(d_left):
            for f in f_left:
                if d.kind == f.kind == "number" and rule(d, f):
                    d_left.remove(d)
                    f_left.remove(f)
                    findings.append(Finding(kind, message(d, f), (d.start, d.end), (f.start, f.end), d.text, f.text))
                    break

    pair(lambda d, f: d.magnitude == f.magnitude and d.unit == f.unit and d.sign != f.sign,
         "sign_flipped", lambda d, f: f"sign {'flipped' if d.sign and f.sign else 'changed'}: {d.describe()} in the "
                                      f"draft, {f.describe()} in the rewrite")
    pair(lambda d, f: d.value == f.value and d.unit == f.unit and d.sign == f.sign and d.period != f.period,
         "period_changed", lambda d, f: f"period changed: {d.describe()} in the draft, {f.describe()} in the rewrite")
    pair(lambda d, f: d.value == f.value and d.unit != f.unit,
         "unit_changed", lambda d, f: f"unit changed: {d.describe()} in the draft, {f.describe()} in the rewrite")
    pair(lambda d, f: d.unit == f.unit and bool(d.sign) == bool(f.sign),
         "value_changed", lambda d, f: f"value changed: {d.describe()} in the draft, {f.describe()} in the rewrite")
    for d in list(d_left):  # periods: a changed month/year is a changed period
        f = next((f for f in f_left if f.kind == d.kind == "period" and len(f.value) == len(d.value)), None)
        if f is not None:
            d_left.remove(d)
            f_left.remove(f)
            findings.append(Finding("period_changed", f"period changed: {d.value} in the draft, {f.value} in the "
                                    "rewrite", (d.start, d.end), (f.start, f.end), d.text, f.text))
    for d in d_left:
        findings.append(Finding("missing", f"missing from the rewrite: {d.describe()}", (d.start, d.end), None,
                                d.text, ""))
    for f in f_left:
        findings.append(Finding("added", f"not in the draft: {f.describe()}", None, (f.start, f.end), "", f.text))
    findings.sort(key=lambda x: (x.draft_span or x.final_span or (0, 0))[0])
    return Comparison(d_facts, f_facts, findings, kept)


@dataclass
class Summary:
    """Fidelity over many pairs (what evaluation reports per model)."""

    pairs: int = 0
    faithful: int = 0
    draft_facts: int = 0
    final_facts: int = 0
    kept: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})

    def add(self, c: Comparison) -> None:
        self.pairs += 1
        self.faithful += c.faithful
        self.draft_facts += len(c.draft_facts)
        self.final_facts += len(c.final_facts)
        self.kept += c.kept
        for f in c.findings:
            self.by_kind[f.kind] += 1

    def to_dict(self) -> dict:
        return {"pairs": self.pairs, "faithful_share": self.faithful / self.pairs if self.pairs else None,
                "fact_recall": self.kept / self.draft_facts if self.draft_facts else None,
                "fact_precision": self.kept / self.final_facts if self.final_facts else None,
                "draft_facts": self.draft_facts, "final_facts": self.final_facts, "kept": self.kept,
                "findings": dict(self.by_kind)}


def summarize(pairs: Iterable[tuple[str, str]], extractor: FactExtractor | None = None) -> tuple[Summary, list[Comparison]]:
    s, out = Summary(), []
    for draft, final in pairs:
        c = compare(draft, final, extractor)
        s.add(c)
        out.append(c)
    return s, out


# ---------------------------------------------------------------------------------------------
# command line


def check_file(pairs_path: str | Path, vocabulary: str | Path | None = None) -> tuple[Summary, list[dict]]:
    """(summary, one object per input row in input order) for a raw pair file (CSV/XLSX/JSONL with
    ``draft`` and ``final``; other columns ignored). DataError as ``recipes.prepare_data`` gives."""
    from recipes.data import read_text_pairs

    ex = FactExtractor(load_vocabulary(vocabulary)) if vocabulary else _DEFAULT
    rows = read_text_pairs(pairs_path)
    summary, out = Summary(), []
    for line, row in rows:
        c = compare(row["draft"], row["final"], ex)
        summary.add(c)
        out.append({"row": line, **c.to_dict()})
    return summary, out


def summary_text(summary: Summary, results: list[dict], source: str, limit: int = 20) -> str:
    d = summary.to_dict()

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    lines = [f"{source}: {d['pairs']} pairs, {d['pairs'] - summary.faithful} with findings; "
             f"faithful {pct(d['faithful_share'])}, fact recall {pct(d['fact_recall'])}, "
             f"fact precision {pct(d['fact_precision'])} ({d['draft_facts']} draft facts, {d['final_facts']} rewrite facts)"]
    if any(d["findings"].values()):
        lines.append("findings: " + ", ".join(f"{k} {v}" for k, v in d["findings"].items() if v))
    shown = 0
    for r in results:
        for f in r["findings"]:
            if shown == limit:
                lines.append("... (all findings: --json)")
                return "\n".join(lines)
            lines.append(f"  row {r['row']}: {f['message']}"
                         + (f" — draft {f['draft_span']} {f['draft_text']!r}" if f["draft_span"] else "")
                         + (f", rewrite {f['final_span']} {f['final_text']!r}" if f["final_span"] else ""))
            shown += 1
    return "\n".join(lines)


def speed(n: int, seed: int = 0, repeat: int = 3) -> dict:
    """Seconds to check ``n`` generated pairs (recipes.synth_data: drafts in every manager's style), best of
    ``repeat`` runs on this process's core, with the facts counted (the README's figure)."""
    import time

    from recipes.synth_data import generate_pairs
    pairs = [(r["draft"], r["final"]) for r in generate_pairs(n, seed)]
    best, summary = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        summary, _ = summarize(pairs)
        best = min(best, time.perf_counter() - t0)
    return {"pairs": n, "seconds": round(best, 3), "pairs_per_s": round(n / best), "facts": summary.draft_facts
            + summary.final_facts, "faithful_share": summary.to_dict()["faithful_share"]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from recipes.data import DataError
    from recipes.fileio import write_json_atomic

    ap = argparse.ArgumentParser(prog="python -m benchmarks.fidelity",
                                 description="Check that every number and named instrument of each draft survives "
                                             "its final (rewrite): findings per row, recall and precision of facts.",
                                 epilog="What it cannot catch: facts without numbers or a listed name, a direction word "
                                        "far from its number (see the module docstring).")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="CSV/XLSX/JSONL with draft and final columns (other columns ignored)")
    src.add_argument("--speed", type=int, metavar="N", help="benchmark: check N generated pairs, print seconds "
                     "(run with OMP_NUM_THREADS=1; one core)")
    ap.add_argument("--json", metavar="OUT", help="write one object per input row (in input order) with its findings")
    ap.add_argument("--vocabulary", metavar="FILE",
                    help='JSON {"canonical name": ["alias", ...]} of instruments to add to the built-in list')
    ap.add_argument("--show", type=int, default=20, metavar="N", help="findings to print (default 20)")
    tracking.add_arguments(ap)  # --pairs: the summary as fidelity/pairs, fidelity/faithful_share, ...
    args = ap.parse_args(argv)
    if args.speed:
        print(json.dumps(speed(args.speed)))
        return 0
    try:
        summary, results = check_file(args.pairs, args.vocabulary)
    except DataError as e:
        print("\n".join(e.errors), file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_text(summary, results, args.pairs, args.show))
    if args.json:
        write_json_atomic(args.json, results)
    return tracking.log_from_args(args, tracking.flat_numbers(summary.to_dict(), "fidelity"))


if __name__ == "__main__":
    sys.exit(main())
