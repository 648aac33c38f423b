"""Raw draft->final comments (CSV / XLSX / JSONL) -> the prepared dataset both backends train on.

``prepare(input_path, output_dir, tokenizer_dir, ...)`` reads the file, validates every row
(all problems are collected and raised together as one :class:`DataError`, each line
``FILE:ROW: field 'X': message``), normalises the text (``recipes.schema.normalize_text``; the
sections, their synonyms and the month forms are recipes.schema's too), drops exact
duplicates, splits by month (latest months -> test, the months before -> validation, the rest ->
training, so no fund+month appears in two splits), renders each prompt with the target model's
chat template (recipes.prompt) and writes, into a temp dir that replaces the output at the end
(``recipes.fileio.atomic_dir``):

    training.jsonl validation.jsonl test.jsonl   NeMo FineTuningDataModule records
        {"input": PROMPT, "output": FINAL, "id", "date", "section", "fund"}
    hf/training.jsonl ...                        HF/TRL conversational prompt-completion records
        {"prompt": [system, user], "completion": [assistant], "id", "date", "section", "fund"}
    stats.json                                   rows, months, tokens, length percentiles, truncation

:func:`prepare_rows` does the same for rows that do not come from a file: the reviews the review
app saved (``recipes.prepare_data.prepare_from_db`` reads them with review_app.store and hands them
over; this module imports nothing of the review app); problems name the table, record id and
column. The file formats and the normalisation rules are documented in datasets/README.md; the
command line is recipes/prepare_data.py. This module owns the prepared format: :func:`read_prepared`
reads it back.
"""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from recipes.fileio import atomic_dir, write_text_atomic
from recipes.prompt import PROMPT_VERSION, build_messages, prompt_renderer
from recipes.schema import DATE_HELP, SECTIONS, canonical_section, normalize_text, parse_month
from recipes.tokens import pair_from_ids, tokenize_pairs

REQUIRED = ("date", "section", "draft", "final")
OPTIONAL = ("fund", "manager")
SPLITS = ("training", "validation", "test")


class DataError(ValueError):
    """The input file has problems; ``errors`` holds one ``FILE:ROW: ...`` line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__(f"{len(self.errors)} data error(s):\n" + "\n".join(self.errors))


# ---------------------------------------------------------------------------------------------
# Reading: every reader yields (row number as a person sees it, {column: value}).


def _read_csv(path: Path, errors: list[str], required: tuple[str, ...] = REQUIRED) -> list[tuple[int, dict]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        try:
            data.decode("cp932")
            guess = "it looks like Shift-JIS/cp932 (Excel's plain 'CSV' on Japanese Windows)"
        except UnicodeDecodeError:
            guess = "unknown encoding"
        errors.append(f"{path}:{line}: wrong encoding: the file is not UTF-8 ({guess}); "
                      "save it as UTF-8 ('CSV UTF-8' in Excel)")
        return []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as e:  # e.g. a quoted cell that never closes
        errors.append(f"{path}:{reader.line_num}: malformed CSV ({e})")
        return []
    # Row numbers count records as Excel shows them (a quoted multi-line cell is one row).
    return _table_rows(path, rows, errors, required)


def _read_xlsx(path: Path, errors: list[str], required: tuple[str, ...] = REQUIRED) -> list[tuple[int, dict]]:
    from openpyxl import load_workbook
    try:
        wb = load_workbook(path, data_only=True)  # data_only: values of formulas, not formulas
    except Exception as e:  # openpyxl raises zipfile/KeyError/InvalidFileException for bad files
        errors.append(f"{path}: cannot read as XLSX ({type(e).__name__}: {e})")
        return []
    ws = wb.worksheets[0]
    rows = [["" if v is None else v for v in r] for r in ws.iter_rows(values_only=True)]
    return _table_rows(path, rows, errors, required)


def _table_rows(path: Path, rows: list[list], errors: list[str],
                required: tuple[str, ...] = REQUIRED) -> list[tuple[int, dict]]:
    if not rows or not any(str(c).strip() for c in rows[0]):
        errors.append(f"{path}:1: empty file: no header row (expected columns {', '.join(required)})")
        return []
    header = [str(c).strip().lower() for c in rows[0]]
    missing = [c for c in required if c not in header]
    for c in missing:
        errors.append(f"{path}:1: field '{c}': missing column (header is: {', '.join(header)})")
    dup = sorted({c for c in header if c and header.count(c) > 1})
    for c in dup:
        errors.append(f"{path}:1: field '{c}': column appears more than once")
    if missing or dup:
        return []
    out = []
    for i, r in enumerate(rows[1:], start=2):
        if not any(str(c).strip() for c in r):
            continue  # blank row (Excel leaves them); it still counts in row numbers
        if len(r) > len(header) and any(str(c).strip() for c in r[len(header):]):
            errors.append(f"{path}:{i}: field '{header[-1]}': row has {len(r)} cells but the header has "
                          f"{len(header)} (an unquoted comma?)")
            continue
        out.append((i, {h: (r[j] if j < len(r) else None) for j, h in enumerate(header) if h}))
    return out


def _read_jsonl(path: Path, errors: list[str], required: tuple[str, ...] = REQUIRED) -> list[tuple[int, dict]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        errors.append(f"{path}: wrong encoding: the file is not UTF-8 ({e.reason} at byte {e.start}); "
                      "save it as UTF-8")
        return []
    out = []
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{i}: malformed JSON line ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{path}:{i}: malformed JSON line (expected an object, got {type(obj).__name__})")
            continue
        out.append((i, {str(k).strip().lower(): v for k, v in obj.items()}))
    if not out and not errors:
        errors.append(f"{path}:1: empty file: no rows")
    return out


READERS = {".csv": _read_csv, ".xlsx": _read_xlsx, ".jsonl": _read_jsonl}


@dataclass(frozen=True)
class Record:
    """One validated, normalised row."""
    row: int
    date: str
    section: str
    draft: str
    final: str
    fund: str | None = None
    manager: str | None = None

    @property
    def key(self) -> tuple:
        """Exact-duplicate key (manager is who sent it, not what it says)."""
        return (self.date, self.section, self.fund or "", self.draft, self.final)

    @property
    def id(self) -> str:
        """Stable id from the content, so CSV, XLSX and JSONL copies of a row get the same id."""
        return f"{self.date}-" + hashlib.sha1("\x1f".join(self.key).encode()).hexdigest()[:10]


def _text(value) -> str | None:
    """Cell value as text; None for a missing cell. Numbers from XLSX become their text."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, str) else str(value)


def read_rows(input_path: str | os.PathLike, required: tuple[str, ...] = REQUIRED) -> list[tuple[int, dict]]:
    """``(row number, {column: value})`` of a raw CSV/XLSX/JSONL file; DataError for a file-level problem
    (a table's header must have the ``required`` columns)."""
    path = Path(input_path)
    errors: list[str] = []
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError([f"{path}: unsupported file type {path.suffix!r} (use .csv, .xlsx or .jsonl)"])
    if not path.is_file():
        raise DataError([f"{path}: cannot read: no such file"])
    try:
        rows = reader(path, errors, required)
    except OSError as e:
        raise DataError([f"{path}: cannot read ({e.strerror or e})"]) from None
    if errors:
        raise DataError(errors)
    return rows


def read_records(input_path: str | os.PathLike) -> list[Record]:
    """Read and validate a raw file; raise DataError listing every problem."""
    path = Path(input_path)
    errors: list[str] = []
    records = []
    for i, raw in read_rows(path):
        rec, errs = _validate(path, i, raw)
        errors.extend(errs)
        if rec:
            records.append(rec)
    if not errors and not records:
        errors.append(f"{path}: no data rows")
    if errors:
        raise DataError(errors)
    return records


def read_text_pairs(input_path: str | os.PathLike, fields: tuple[str, ...] = ("draft", "final")) -> list[tuple[int, dict]]:
    """``(row number, {field: text})`` for the given text fields of every row of a raw file, as written
    (not normalised); other columns are ignored. DataError naming file, row and field for a missing,
    non-text or empty field."""
    path = Path(input_path)
    errors, out = [], []
    for i, raw in read_rows(path, fields):
        row = {}
        for f in fields:
            v = raw.get(f)
            if v is not None and not isinstance(v, (str, int, float)):
                errors.append(f"{path}:{i}: field '{f}': expected text, got {type(v).__name__}")
            elif _text(v) is None:
                errors.append(f"{path}:{i}: field '{f}': missing")
            elif not _text(v).strip():
                errors.append(f"{path}:{i}: field '{f}': empty text")
            else:
                row[f] = _text(v)
        if len(row) == len(fields):
            out.append((i, row))
    if not errors and not out:
        errors.append(f"{path}: no data rows")
    if errors:
        raise DataError(errors)
    return out


def _validate(path: Path | str, i: int, raw: dict, loc: str | None = None) -> tuple[Record | None, list[str]]:
    """``loc`` replaces ``FILE:ROW`` at the start of each message (e.g. a database table and record id)."""
    loc = loc or f"{path}:{i}"
    errs, val = [], {}
    for f in REQUIRED + OPTIONAL:
        v = raw.get(f)
        if f == "date" and isinstance(v, (dt.date, dt.datetime)):
            val[f] = v
            continue
        if v is not None and not isinstance(v, (str, int, float)):
            errs.append(f"{loc}: field '{f}': expected text, got {type(v).__name__}")
            continue
        t = _text(v)
        if t is None and f in REQUIRED:
            errs.append(f"{loc}: field '{f}': missing")
            continue
        t = normalize_text(t or "")
        if not t and f in REQUIRED:
            errs.append(f"{loc}: field '{f}': empty text")
            continue
        val[f] = t or None
    if "date" in val:
        month = parse_month(val["date"])
        if month is None:
            errs.append(f"{loc}: field 'date': bad date {str(val['date'])!r} ({DATE_HELP})")
        val["date"] = month
    if "section" in val:
        sec = canonical_section(val["section"])
        if sec is None:
            errs.append(f"{loc}: field 'section': unknown section {val['section']!r} "
                        f"(expected {' / '.join(SECTIONS)} or a synonym listed in datasets/README.md)")
        val["section"] = sec
    if errs:
        return None, errs
    return Record(row=i, **val), []


# ---------------------------------------------------------------------------------------------
# Splitting


def dedupe(records: list[Record]) -> tuple[list[Record], int]:
    """Keep the first of each exact duplicate; return (kept, number dropped)."""
    seen, kept = set(), []
    for r in records:
        if r.key not in seen:
            seen.add(r.key)
            kept.append(r)
    return kept, len(records) - len(kept)


def split_by_month(records: list[Record], test_months: int = 1, val_months: int = 1,
                   source: str = "input") -> dict[str, list[Record]]:
    """Latest ``test_months`` months -> test, the ``val_months`` before -> validation, the rest ->
    training. A whole month goes to one split, so no fund+month can appear in two."""
    if test_months < 0 or val_months < 1:
        raise ValueError("test_months must be >= 0 and val_months >= 1")
    months = sorted({r.date for r in records})
    need = test_months + val_months + 1
    if len(months) < need:
        raise DataError([f"{source}: only {len(months)} distinct month(s) ({', '.join(months)}); "
                         f"need at least {need} for {test_months} test + {val_months} validation "
                         "month(s) and one training month"])
    test = set(months[len(months) - test_months:]) if test_months else set()
    val = set(months[len(months) - test_months - val_months: len(months) - test_months])
    out = {s: [] for s in SPLITS}
    for r in sorted(records, key=lambda r: r.date):  # stable: file order within a month
        out["test" if r.date in test else "validation" if r.date in val else "training"].append(r)
    return out


# ---------------------------------------------------------------------------------------------
# Writing


def _jsonl(objs: list[dict]) -> str:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)


def percentiles(values: list[int | float]) -> dict:
    """Nearest-rank p50/p90/p99/max (None when empty): ``numpy.percentile`` with
    ``method="inverted_cdf"``, so each figure is one of the values (a length, not an interpolation)."""
    import numpy as np
    if not len(values):
        return {"p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99, top = np.percentile(values, [50, 90, 99, 100], method="inverted_cdf").tolist()
    return {"p50": p50, "p90": p90, "p99": p99, "max": top}


def _check_output(input_path: Path | None, out: Path, overwrite: bool) -> None:
    """``input_path`` None: the input is not a local file (a database server)."""
    if input_path is not None:
        src, dst = input_path.resolve(), out.resolve()
        if dst == src or dst in src.parents:
            raise ValueError(f"output {out} would contain or replace the input {input_path}; "
                             "choose another output directory")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output {out} exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"output {out} exists; pass --overwrite (overwrite=True) to replace it")
            if not (out / "stats.json").is_file():
                raise FileExistsError(f"output {out} is not a prepared dataset (no stats.json); "
                                      "refusing to replace it even with --overwrite")


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """A local HF tokenizer (never downloads); it must have a chat template."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer directory {tokenizer_dir} does not exist")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def prepare(input_path, output_dir, tokenizer_dir, seq_length: int = 512, test_months: int = 1,
            val_months: int = 1, overwrite: bool = False) -> dict:
    """Validate, normalise, dedupe, split and write the prepared dataset; return the stats.

    Raises DataError (bad input rows, too few months), FileExistsError (output exists without
    ``overwrite``), ValueError (output would touch the input). Nothing is left behind on error.
    """
    input_path, out = Path(input_path), Path(output_dir)
    _check_output(input_path, out, overwrite)
    records = read_records(input_path)
    return _prepare_records(records, str(input_path), out, tokenizer_dir, seq_length, test_months, val_months,
                            overwrite)


def validate_rows(rows: Iterable[tuple[int, dict]], where: str,
                  columns: dict[str, str] | None = None) -> list[Record]:
    """Records of a database table (the reviews saved by the review app, as
    ``review_app.store.export_rows`` yields them: ``(record id, raw row)``) as validated Records: the
    same checks and normalisation as a row of a file. Each problem reads ``WHERE id N: field 'X':
    message``, X renamed by ``columns`` (raw-row field -> the table's column). Raises DataError
    listing every problem, or ``WHERE: no saved reviews`` when there are no rows."""
    errors: list[str] = []
    records = []
    for rid, raw in rows:
        rec, errs = _validate(where, rid, raw, loc=f"{where} id {rid}")
        for field, column in (columns or {}).items():  # name the source's column, not the file column
            errs = [e.replace(f"field '{field}'", f"field '{column}'") for e in errs]
        errors.extend(errs)
        if rec:
            records.append(rec)
    if not errors and not records:
        errors.append(f"{where}: no saved reviews")
    if errors:
        raise DataError(errors)
    return records


def prepare_rows(rows: Iterable[tuple[int, dict]], output_dir, tokenizer_dir, seq_length: int = 512,
                 test_months: int = 1, val_months: int = 1, overwrite: bool = False, *, where: str, source: str,
                 columns: dict[str, str] | None = None, input_path: str | os.PathLike | None = None) -> dict:
    """:func:`prepare` for rows that do not come from a file: ``rows``, ``where`` and ``columns`` as
    for :func:`validate_rows`; ``source`` names the input in stats.json and in the split errors;
    ``input_path`` is the file the rows live in, if any (a SQLite database), which the output may
    not contain or replace. The output directory is checked before the first row is read.
    ``recipes.prepare_data.prepare_from_db`` feeds it the review app's saved reviews."""
    out = Path(output_dir)
    _check_output(None if input_path is None else Path(input_path), out, overwrite)
    records = validate_rows(rows, where, columns)
    return _prepare_records(records, source, out, tokenizer_dir, seq_length, test_months, val_months, overwrite)


def _prepare_records(records: list[Record], source: str, out: Path, tokenizer_dir, seq_length: int,
                     test_months: int, val_months: int, overwrite: bool) -> dict:
    """Dedupe, split, render and write validated records (``source`` names the input in stats/errors)
    into a temp dir beside ``out`` that replaces it at the end (recipes.fileio.atomic_dir)."""
    kept, dropped = dedupe(records)
    splits = split_by_month(kept, test_months, val_months, source=source)
    tok = load_tokenizer(tokenizer_dir)

    # checked by _check_output before: empty, missing, or a previous prepared dataset with overwrite
    with atomic_dir(out, overwrite=overwrite) as tmp:
        stats = {"prompt_version": PROMPT_VERSION, "input": source, "tokenizer": str(tokenizer_dir),
                 "seq_length": seq_length, "rows_read": len(records), "duplicates_dropped": dropped,
                 "test_months": test_months, "val_months": val_months,
                 "rows": {}, "months": {}, "tokens": {}, "truncated": {}, "lengths": {}}
        render = prompt_renderer(tok)  # the chat template rendered once, the user content slotted in
        for split, recs in splits.items():
            nemo, hf = [], []
            prompts = []
            for r in recs:
                msgs = build_messages(r.draft, r.section, r.date, r.fund)
                prompt = render(msgs[1]["content"])
                prompts.append(prompt)
                meta = {"id": r.id, "date": r.date, "section": r.section, "fund": r.fund}
                nemo.append({"input": prompt, "output": r.final, **meta})
                hf.append({"prompt": msgs, "completion": [{"role": "assistant", "content": r.final}], **meta})
            # two batch tokenizer calls per split; the untruncated lengths give the percentiles
            full = tokenize_pairs(tok, prompts, [r.final for r in recs], 10**9)
            eos = tok.eos_token_id
            cut = [pair_from_ids(f.input_ids[:f.prompt_tokens], f.input_ids[f.prompt_tokens:-1], eos, seq_length)
                   for f in full]
            p_tok, c_tok = sum(c.prompt_tokens for c in cut), sum(c.completion_tokens for c in cut)
            trunc = sum(c.truncated for c in cut)
            tot_tokens = [f.prompt_tokens + f.completion_tokens for f in full]
            chars = [len(p) + len(r.final) for p, r in zip(prompts, recs)]
            write_text_atomic(tmp / f"{split}.jsonl", _jsonl(nemo))
            write_text_atomic(tmp / "hf" / f"{split}.jsonl", _jsonl(hf))
            stats["rows"][split] = len(recs)
            stats["months"][split] = sorted({r.date for r in recs})
            stats["tokens"][split] = {"prompt": p_tok, "completion": c_tok}
            stats["truncated"][split] = trunc
            stats["lengths"][split] = {"tokens": percentiles(tot_tokens), "chars": percentiles(chars),
                                       "final_chars": percentiles([len(r.final) for r in recs])}
        write_text_atomic(tmp / "stats.json", json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
    return stats


def read_prepared(path: str | os.PathLike) -> list[dict]:
    """Records of one prepared split file (NeMo or hf/ form)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def count_prepared(path: str | os.PathLike) -> int:
    """Records (non-empty lines) of one prepared split file; 0 when it does not exist."""
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except FileNotFoundError:
        return 0
