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
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bleu", description=__doc__.split("\n\n")[0],
                                     epilog="Text files: one segment per line. JSONL: see the module docstring.")
    parser.add_argument("--predictions", required=True, help="hypotheses: .txt (one per line) or .jsonl "
                        "(field prediction or output)")
    parser.add_argument("--references", required=True, help="references: .txt or .jsonl (field output or reference)")
    parser.add_argument("--tokenize", default=DEFAULT_TOKENIZE,
                        help=f"sacrebleu tokenizer (default {DEFAULT_TOKENIZE}; 'char' needs no MeCab)")
    parser.add_argument("--json", dest="json_out", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    if args.json_out and Path(args.json_out).resolve() in (Path(args.predictions).resolve(),
                                                           Path(args.references).resolve()):
        parser.error(f"--json {args.json_out} would overwrite an input file")
    try:
        result = score_files(args.predictions, args.references, tokenize=args.tokenize)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.format())
    if args.json_out:
        write_json_atomic(Path(args.json_out), {"predictions": str(args.predictions),
                                                 "references": str(args.references), **result.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
