"""Corpus BLEU (and chrF) of rewritten comments against the house-style finals, via sacrebleu.

BLEU is never re-implemented here: :func:`corpus_score` calls ``sacrebleu.metrics.BLEU`` with the
``ja-mecab`` tokenizer (MeCab + IPADIC, as ``sacrebleu -l en-ja`` does) and ``CHRF`` with its
defaults, and keeps sacrebleu's signature string so every reported number says how it was made.
Scores are given on sacrebleu's 0-100 scale (``score``) and on the 0-1 scale used in the team's
reports (``score01``). Per-section BLEU is the corpus BLEU of each section's segments on its own.

References are one stream parallel to the hypotheses (one reference per segment).

Input files (:func:`load_segments`): plain text with one segment per line, or JSONL (``.jsonl``)
with the text in ``prediction`` / ``output`` (predictions) or ``output`` / ``reference``
(references), plus an optional ``section`` and ``id``. That reads the prepared test.jsonl and
``recipes.generate`` output directly::

    python -m benchmarks.bleu --predictions runs/hf/predictions.jsonl --references data/test.jsonl
    python -m benchmarks.bleu --predictions hyp.txt --references ref.txt --json bleu.json

Beside BLEU, for every prediction: **house style** (``recipes.synth_data.house_style_violations``;
the compliance rate is the share of predictions with no violation) and, when the drafts are known,
**fact fidelity** against the draft (``benchmarks.fidelity.compare``: fact recall = draft facts kept,
fact precision = prediction facts that are the draft's, the share of comments with no finding). BLEU
alone rewards a model that copies the draft's facts and wording; fidelity alone rewards copying the
draft outright (1.0); house style catches the copy (drafts break it). Drafts come from ``--drafts FILE``
(:func:`load_drafts`: text, one per line; JSONL with ``draft``, the hf/ chat ``prompt`` or a NeMo
``input``; CSV/XLSX raw pairs), else from the references or the predictions file when their rows carry
them (the NeMo test.jsonl, ``benchmarks.model_eval`` predictions). One system has no baseline: the
paired bootstrap of these rates is ``benchmarks.model_eval``'s.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from benchmarks import tracking
from recipes.fileio import iter_jsonl, write_json_atomic

DEFAULT_TOKENIZE = "ja-mecab"
PREDICTION_FIELDS = ("prediction", "output")
REFERENCE_FIELDS = ("output", "reference")


@dataclass(frozen=True)
class BleuResult:
    score: float  # corpus BLEU, 0-100 (sacrebleu's scale)
    score01: float  # the same on 0-1
    precisions: list[float]  # 1- to 4-gram precisions, 0-100
    bp: float  # brevity penalty
    sys_len: int  # hypothesis tokens (after tokenisation)
    ref_len: int
    chrf: float  # chrF2, 0-100
    signature: str  # sacrebleu BLEU signature, e.g. nrefs:1|case:mixed|eff:no|tok:ja-mecab-0.996-IPA|...
    n_segments: int
    per_section: dict[str, tuple[float, int]] = field(default_factory=dict)  # section -> (BLEU 0-100, segments)
    chrf_signature: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_section"] = {k: {"score": s, "score01": s / 100.0, "n": n} for k, (s, n) in self.per_section.items()}
        return d

    def format(self) -> str:
        p = "/".join(f"{x:.1f}" for x in self.precisions)
        lines = [
            f"BLEU = {self.score:.2f} (0-1 scale: {self.score01:.4f})  {p}  "
            f"BP = {self.bp:.3f}  ratio = {self.sys_len / self.ref_len if self.ref_len else 0.0:.3f}  "
            f"hyp_len = {self.sys_len}  ref_len = {self.ref_len}  segments = {self.n_segments}",
            f"chrF2 = {self.chrf:.2f}",
            f"signature: {self.signature}",
        ]
        if self.per_section:
            width = max(len(s) for s in self.per_section)
            lines.append("per section:")
            for s, (score, n) in self.per_section.items():
                lines.append(f"  {s:<{width}}  BLEU = {score:6.2f} ({score / 100:.4f})  n = {n}")
        return "\n".join(lines)


def corpus_score(hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str = DEFAULT_TOKENIZE,
                 sections: Sequence[str | None] | None = None) -> BleuResult:
    """Corpus BLEU and chrF of ``hypotheses`` against one parallel stream of ``references``.

    ``sections`` (parallel to the hypotheses, optional) adds the BLEU of each section's subset;
    segments whose section is None are counted only in the corpus score.
    """
    from sacrebleu.metrics import BLEU, CHRF

    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no segments to score")
    if sections is not None and len(sections) != len(hypotheses):
        raise ValueError(f"{len(sections)} section labels for {len(hypotheses)} segments")
    if tokenize not in BLEU.TOKENIZERS:
        raise ValueError(f"tokenize={tokenize!r}: unknown sacrebleu tokenizer (known: {', '.join(BLEU.TOKENIZERS)})")
    bleu = BLEU(tokenize=tokenize)
    b = bleu.corpus_score(hypotheses, [references])
    chrf_metric = CHRF()
    chrf = chrf_metric.corpus_score(hypotheses, [references])
    per_section: dict[str, tuple[float, int]] = {}
    if sections is not None:
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(sections):
            if s is not None:
                groups.setdefault(str(s), []).append(i)
        for s, idx in groups.items():  # first-seen order, as the sections appear in the file
            sb = bleu.corpus_score([hypotheses[i] for i in idx], [[references[i] for i in idx]])
            per_section[s] = (float(sb.score), len(idx))
    return BleuResult(score=float(b.score), score01=float(b.score) / 100.0, precisions=[float(x) for x in b.precisions],
                      bp=float(b.bp), sys_len=int(b.sys_len), ref_len=int(b.ref_len), chrf=float(chrf.score),
                      signature=str(bleu.get_signature()), n_segments=len(hypotheses), per_section=per_section,
                      chrf_signature=str(chrf_metric.get_signature()))


# ---------------------------------------------------------------------------------------------
# input files


@dataclass(frozen=True)
class Segments:
    texts: list[str]
    sections: list[str | None] | None  # None: the file has no section information
    ids: list[str | None] | None


def load_segments(path: str | Path, fields: Sequence[str] = PREDICTION_FIELDS) -> Segments:
    """Read one segment per line (text) or per JSON object (``.jsonl``), taking the text from the
    first of ``fields`` present. Errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if path.suffix.lower() == ".jsonl":
        return _load_jsonl(path, fields)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()  # the final newline ends the last segment; it does not start an empty one
    return Segments(texts=[line.rstrip("\r") for line in lines], sections=None, ids=None)


def _load_jsonl(path: Path, fields: Sequence[str]) -> Segments:
    texts: list[str] = []
    sections: list[str | None] = []
    ids: list[str | None] = []
    for lineno, row in iter_jsonl(path):
        name = next((k for k in fields if k in row), None)
        if name is None:
            raise ValueError(f"{path}:{lineno}: no {' or '.join(repr(k) for k in fields)} field "
                             f"(fields: {', '.join(sorted(row))})")
        if not isinstance(row[name], str):
            raise ValueError(f"{path}:{lineno}: field {name!r} must be a string, got {row[name]!r}")
        texts.append(row[name])
        sec = row.get("section")
        sections.append(None if sec is None else str(sec))
        ids.append(None if row.get("id") is None else str(row["id"]))
    has_sections = any(s is not None for s in sections)
    has_ids = any(i is not None for i in ids)
    return Segments(texts=texts, sections=sections if has_sections else None, ids=ids if has_ids else None)


def score_files(predictions: str | Path, references: str | Path, *, tokenize: str = DEFAULT_TOKENIZE) -> BleuResult:
    """Score a predictions file against a references file (see module docstring for formats).

    Sections come from the references when they have them, else from the predictions. When both
    files carry ids they must match row by row.
    """
    hyp = load_segments(predictions, PREDICTION_FIELDS)
    ref = load_segments(references, REFERENCE_FIELDS)
    if len(hyp.texts) != len(ref.texts):
        raise ValueError(f"line counts differ: {len(hyp.texts)} predictions in {predictions} but "
                         f"{len(ref.texts)} references in {references}")
    if hyp.ids is not None and ref.ids is not None:
        for i, (a, b) in enumerate(zip(hyp.ids, ref.ids), 1):
            if a != b:
                raise ValueError(f"segment {i}: id {a!r} in {predictions} but {b!r} in {references} "
                                 "(the files are not in the same order)")
    sections = ref.sections if ref.sections is not None else hyp.sections
    return corpus_score(hyp.texts, ref.texts, tokenize=tokenize, sections=sections)


# ---------------------------------------------------------------------------------------------
# drafts, fact fidelity and house style

RAW_SUFFIXES = (".csv", ".xlsx")
RATE_NAMES = {"fact_recall": "fact recall", "fact_precision": "fact precision", "faithful_share": "no finding",
              "style_compliance": "style compliance"}


def draft_of_row(row: dict) -> str | None:
    """The draft of one JSONL row: a ``draft`` field (raw pairs, model_eval predictions), the user turn of
    chat ``prompt``/``messages`` (hf/ rows; ``recipes.prompt.parse_user_message``) or a rendered ``input``
    (NeMo rows; ``recipes.prompt.draft_from_prompt``). None when the row has none of them."""
    from recipes.prompt import draft_from_prompt, parse_user_message

    if isinstance(row.get("draft"), str):
        return row["draft"]
    chat = row.get("prompt") if isinstance(row.get("prompt"), list) else row.get("messages")
    if isinstance(chat, list):
        user = next((m.get("content") for m in reversed(chat) if isinstance(m, dict) and m.get("role") == "user"), None)
        if not isinstance(user, str):
            return None
        try:
            return parse_user_message(user)["draft"]
        except ValueError:
            return None
    if isinstance(row.get("input"), str):
        return draft_from_prompt(row["input"])
    return None


def load_drafts(path: str | Path) -> Segments:
    """The drafts of a file, one per segment: text (one per line), JSONL (:func:`draft_of_row` of every
    row; a row without one is an error naming the line), or CSV/XLSX raw pairs (``recipes.data``,
    validated and normalised as for training and model_eval)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if path.suffix.lower() in RAW_SUFFIXES:
        from recipes.data import read_records

        records = read_records(path)
        return Segments(texts=[r.draft for r in records], sections=[r.section for r in records],
                        ids=[r.id for r in records])
    if path.suffix.lower() != ".jsonl":
        return load_segments(path)
    texts, ids = [], []
    for lineno, row in iter_jsonl(path):
        d = draft_of_row(row)
        if d is None:
            raise ValueError(f"{path}:{lineno}: no draft (expected a 'draft' field, chat 'prompt' messages with a "
                             f"user turn built by recipes.prompt, or a rendered 'input'; fields: {', '.join(sorted(row))})")
        texts.append(d)
        ids.append(None if row.get("id") is None else str(row["id"]))
    return Segments(texts=texts, sections=None, ids=ids if any(i is not None for i in ids) else None)


def _rule(violation: str) -> str:
    return violation.split(": ", 1)[0]


@dataclass
class CommentChecks:
    """Per-comment house style and (with drafts) fact fidelity of one set of predictions."""

    violations: list[list[str]]  # house_style_violations of each prediction
    comparisons: list | None = None  # benchmarks.fidelity.Comparison of each (draft, prediction); None: no drafts

    @property
    def n(self) -> int:
        return len(self.violations)

    @property
    def has_fidelity(self) -> bool:
        return self.comparisons is not None

    def style(self) -> dict:
        from recipes.synth_data import STYLE_CHECKS

        ok = sum(not v for v in self.violations)
        by_rule = {rule: 0 for rule, _ in STYLE_CHECKS}
        for vs in self.violations:
            for v in vs:
                by_rule[_rule(v)] = by_rule.get(_rule(v), 0) + 1
        return {"compliance": ok / self.n if self.n else None, "compliant": ok, "n": self.n,
                "violations": sum(len(v) for v in self.violations), "by_rule": by_rule}

    def fidelity(self) -> dict | None:
        """``benchmarks.fidelity.Summary.to_dict()`` over the comments (None without drafts)."""
        if self.comparisons is None:
            return None
        from benchmarks.fidelity import Summary

        s = Summary()
        for c in self.comparisons:
            s.add(c)
        return s.to_dict()

    def rates(self) -> dict[str, float | None]:
        """The four headline rates (fidelity ones None without drafts or facts)."""
        f = self.fidelity() or {}
        return {"fact_recall": f.get("fact_recall"), "fact_precision": f.get("fact_precision"),
                "faithful_share": f.get("faithful_share"), "style_compliance": self.style()["compliance"]}

    def ratios(self) -> dict[str, tuple[list[float], list[float]]]:
        """Per-comment numerator and denominator of each rate (rate = sum(num) / sum(den)): what a paired
        bootstrap resamples. Fidelity rates only with drafts."""
        out = {"style_compliance": ([float(not v) for v in self.violations], [1.0] * self.n)}
        if self.comparisons is not None:
            cs = self.comparisons
            out["fact_recall"] = ([float(c.kept) for c in cs], [float(len(c.draft_facts)) for c in cs])
            out["fact_precision"] = ([float(c.kept) for c in cs], [float(len(c.final_facts)) for c in cs])
            out["faithful_share"] = ([float(c.faithful) for c in cs], [1.0] * len(cs))
        return out

    def to_dict(self) -> dict:
        return {"fidelity": self.fidelity(), "style": self.style()}

    def format(self) -> str:
        lines = []
        f = self.fidelity()
        if f is None:
            lines.append("fact fidelity: not available (no drafts: pass --drafts FILE, or references/predictions "
                         "rows that carry the draft)")
        else:
            def r(x):
                return "n/a" if x is None else f"{x:.4f}"
            kinds = ", ".join(f"{k} {v}" for k, v in f["findings"].items() if v) or "none"
            lines.append(f"fact fidelity (benchmarks.fidelity, against the drafts): recall = {r(f['fact_recall'])} "
                         f"({f['kept']}/{f['draft_facts']} draft facts kept)  precision = {r(f['fact_precision'])} "
                         f"({f['kept']}/{f['final_facts']} prediction facts in the draft)  no finding = "
                         f"{r(f['faithful_share'])} ({round((f['faithful_share'] or 0) * f['pairs'])}/{f['pairs']} "
                         f"comments)  findings: {kinds}")
        st = self.style()
        rules = ", ".join(f"{k} {v}" for k, v in st["by_rule"].items() if v) or "none"
        lines.append(f"house style (recipes.synth_data.house_style_violations): compliance = "
                     f"{st['compliance'] or 0:.4f} ({st['compliant']}/{st['n']} predictions without a violation)  "
                     f"violations: {st['violations']} ({rules})")
        lines.append("paired bootstrap of these rates: does not apply (one system, no baseline; "
                     "benchmarks.model_eval tests models against a baseline)")
        return "\n".join(lines)


def check_comments(predictions: Sequence[str], drafts: Sequence[str] | None = None, *, extractor=None) -> CommentChecks:
    """House style of every prediction and, with ``drafts`` (parallel), ``benchmarks.fidelity.compare``
    of each draft with its prediction (``extractor``: a ``FactExtractor`` with an extra vocabulary)."""
    from benchmarks.fidelity import compare
    from recipes.synth_data import house_style_violations

    predictions = list(predictions)
    if drafts is not None and len(drafts) != len(predictions):
        raise ValueError(f"{len(drafts)} drafts for {len(predictions)} predictions")
    comparisons = None if drafts is None else [compare(d, p, extractor) for d, p in zip(drafts, predictions)]
    return CommentChecks(violations=[house_style_violations(p) for p in predictions], comparisons=comparisons)


def _drafts_from(path: str | Path) -> Segments | None:
    """The drafts a predictions/references file carries (None when any row has none, or not JSONL)."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        return None
    try:
        return load_drafts(path)
    except ValueError:
        return None


def resolve_drafts(n: int, predictions: str | Path, references: str | Path, drafts: str | Path | None = None,
                   pred_ids: Sequence[str | None] | None = None) -> tuple[list[str] | None, str | None]:
    """(drafts, where they came from): ``drafts`` when given (must match the predictions in count and, when
    both have ids, in order), else the references file's, else the predictions file's; (None, None) when
    none has them."""
    if drafts is not None:
        found, where = load_drafts(drafts), str(drafts)
    else:
        found, where = None, None
        for candidate in (references, predictions):
            found = _drafts_from(candidate)
            if found is not None and len(found.texts) == n:
                where = str(candidate)
                break
            found = None
        if found is None:
            return None, None
    if len(found.texts) != n:
        raise ValueError(f"{len(found.texts)} drafts in {where} but {n} predictions in {predictions}")
    if pred_ids is not None and found.ids is not None:
        for i, (a, b) in enumerate(zip(pred_ids, found.ids), 1):
            if a is not None and b is not None and a != b:
                raise ValueError(f"segment {i}: id {a!r} in {predictions} but {b!r} in {where} "
                                 "(the files are not in the same order)")
    return found.texts, where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bleu", description=__doc__.split("\n\n")[0],
                                     epilog="Text files: one segment per line. JSONL: see the module docstring.")
    parser.add_argument("--predictions", required=True, help="hypotheses: .txt (one per line) or .jsonl "
                        "(field prediction or output)")
    parser.add_argument("--references", required=True, help="references: .txt or .jsonl (field output or reference)")
    parser.add_argument("--tokenize", default=DEFAULT_TOKENIZE,
                        help=f"sacrebleu tokenizer (default {DEFAULT_TOKENIZE}; 'char' needs no MeCab)")
    parser.add_argument("--drafts", help="the drafts the predictions rewrote, for fact fidelity: .txt (one per "
                        "line), .jsonl (field draft, hf/ chat prompt or NeMo input) or .csv/.xlsx raw pairs "
                        "(default: from the references or predictions rows when they carry them)")
    parser.add_argument("--vocabulary", help="extra instruments for fact fidelity: JSON {canonical: [alias, ...]}")
    parser.add_argument("--json", dest="json_out", help="also write the result as JSON to this file")
    tracking.add_arguments(parser)  # the figures as eval/bleu/score, eval/rates/fact_recall, ...
    args = parser.parse_args(argv)
    inputs = [Path(p).resolve() for p in (args.predictions, args.references, args.drafts, args.vocabulary) if p]
    if args.json_out and Path(args.json_out).resolve() in inputs:
        parser.error(f"--json {args.json_out} would overwrite an input file")
    try:
        result = score_files(args.predictions, args.references, tokenize=args.tokenize)
        hyp = load_segments(args.predictions, PREDICTION_FIELDS)
        drafts, drafts_from = resolve_drafts(len(hyp.texts), args.predictions, args.references, args.drafts,
                                             pred_ids=hyp.ids)
        extractor = None
        if args.vocabulary:
            from benchmarks.fidelity import FactExtractor, load_vocabulary

            extractor = FactExtractor(load_vocabulary(args.vocabulary))
        checks = check_comments(hyp.texts, drafts, extractor=extractor)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.format())
    if drafts_from:
        print(f"drafts: {drafts_from}")
    print(checks.format())
    if args.json_out:
        write_json_atomic(Path(args.json_out), {"predictions": str(args.predictions),
                                                 "references": str(args.references), **result.to_dict(),
                                                 "drafts": drafts_from, **checks.to_dict(), "rates": checks.rates(),
                                                 "rates_bootstrap": {"applies": False, "reason": "one system, no baseline "
                                                                     "(benchmarks.model_eval tests models against a "
                                                                     "baseline)"}})
    return tracking.log_from_args(args, tracking.flat_numbers(
        {"bleu": result.to_dict(), **checks.to_dict(), "rates": checks.rates()}, "eval"))


if __name__ == "__main__":
    sys.exit(main())
