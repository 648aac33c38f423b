"""Raw draft->final comments (CSV / XLSX / JSONL) -> the prepared dataset both backends train on.

``prepare(input_path, output_dir, tokenizer_dir, ...)`` reads the file, validates every row
(all problems are collected and raised together as one :class:`DataError`, each line
``FILE:ROW: field 'X': message``), normalises the text (:func:`normalize_text`), drops exact
duplicates, splits by month (latest months -> test, the months before -> validation, the rest ->
training, so no fund+month appears in two splits), renders each prompt with the target model's
chat template (recipes.prompt) and writes, into a temp dir that is renamed at the end:

    training.jsonl validation.jsonl test.jsonl   NeMo FineTuningDataModule records
        {"input": PROMPT, "output": FINAL, "id", "date", "section", "fund"}
    hf/training.jsonl ...                        HF/TRL conversational prompt-completion records
        {"prompt": [system, user], "completion": [assistant], "id", "date", "section", "fund"}
    stats.json                                   rows, months, tokens, length percentiles, truncation

:func:`prepare_from_db` does the same for the reviews saved by the review app (review_app.store,
a SQLAlchemy URL): saved edits become the next training set; problems name the table, record id
and column. The file formats and the normalisation rules are documented in datasets/README.md; the
command line is recipes/prepare_data.py. This module owns the prepared format: :func:`read_prepared`
reads it back.
"""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from recipes.fileio import write_text_atomic
from recipes.prompt import PROMPT_VERSION, build_messages, render_prompt
from recipes.tokens import tokenize_pair

REQUIRED = ("date", "section", "draft", "final")
OPTIONAL = ("fund", "manager")
SECTIONS = ("市場動向", "運用状況", "今後の見通しと運用方針")
SPLITS = ("training", "validation", "test")

# Headings external managers use for the same section (compared after _section_key).
SECTION_SYNONYMS = {
    "市場動向": ["市場概況", "市場環境", "市況", "マーケット動向", "マーケットレビュー", "market review", "market"],
    "運用状況": ["運用経過", "ファンドの運用状況", "運用実績", "ポートフォリオの状況", "performance review",
             "performance"],
    "今後の見通しと運用方針": ["今後の見通し", "今後の運用方針", "運用方針", "見通し", "今後の方針",
                      "今後の見通しおよび運用方針", "今後の見通し及び運用方針", "outlook", "outlook & strategy"],
}


class DataError(ValueError):
    """The input file has problems; ``errors`` holds one ``FILE:ROW: ...`` line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__(f"{len(self.errors)} data error(s):\n" + "\n".join(self.errors))


# ---------------------------------------------------------------------------------------------
# Normalisation

_ZERO_WIDTH = {"\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"}
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
    s = "".join(c for c in s if c == "\n" or not (
        c in _ZERO_WIDTH or unicodedata.category(c) in ("Cc", "Cf")))
    s = _HALF_KANA.sub(lambda m: unicodedata.normalize("NFKC", m.group()), s)
    s = _FULL_ALNUM.sub(lambda m: chr(ord(m.group()) - 0xFEE0), s)
    s = _NUM_SEP.sub(lambda m: chr(ord(m.group()) - 0xFEE0), s)
    s = re.sub(r" {2,}", " ", s)
    s = "\n".join(line.rstrip(" ") for line in s.split("\n"))
    return s.strip()


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


# ---------------------------------------------------------------------------------------------
# Reading: every reader yields (row number as a person sees it, {column: value}).


def _read_csv(path: Path, errors: list[str]) -> list[tuple[int, dict]]:
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
    return _table_rows(path, rows, errors)


def _read_xlsx(path: Path, errors: list[str]) -> list[tuple[int, dict]]:
    from openpyxl import load_workbook
    try:
        wb = load_workbook(path, data_only=True)  # data_only: values of formulas, not formulas
    except Exception as e:  # openpyxl raises zipfile/KeyError/InvalidFileException for bad files
        errors.append(f"{path}: cannot read as XLSX ({type(e).__name__}: {e})")
        return []
    ws = wb.worksheets[0]
    rows = [["" if v is None else v for v in r] for r in ws.iter_rows(values_only=True)]
    return _table_rows(path, rows, errors)


def _table_rows(path: Path, rows: list[list], errors: list[str]) -> list[tuple[int, dict]]:
    if not rows or not any(str(c).strip() for c in rows[0]):
        errors.append(f"{path}:1: empty file: no header row (expected columns {', '.join(REQUIRED)})")
        return []
    header = [str(c).strip().lower() for c in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
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


def _read_jsonl(path: Path, errors: list[str]) -> list[tuple[int, dict]]:
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


def read_records(input_path: str | os.PathLike) -> list[Record]:
    """Read and validate a raw file; raise DataError listing every problem."""
    path = Path(input_path)
    errors: list[str] = []
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError([f"{path}: unsupported file type {path.suffix!r} (use .csv, .xlsx or .jsonl)"])
    if not path.is_file():
        raise DataError([f"{path}: cannot read: no such file"])
    try:
        rows = reader(path, errors)
    except OSError as e:
        raise DataError([f"{path}: cannot read ({e.strerror or e})"]) from None
    records = []
    for i, raw in rows:
        rec, errs = _validate(path, i, raw)
        errors.extend(errs)
        if rec:
            records.append(rec)
    if not errors and not records:
        errors.append(f"{path}: no data rows")
    if errors:
        raise DataError(errors)
    return records


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
    """Nearest-rank p50/p90/p99/max (None when empty)."""
    v = sorted(values)
    if not v:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    at = lambda p: v[max(math.ceil(p / 100 * len(v)) - 1, 0)]  # noqa: E731
    return {"p50": at(50), "p90": at(90), "p99": at(99), "max": v[-1]}


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
    return _prepare_records(records, str(input_path), out, tokenizer_dir, seq_length, test_months, val_months)


def read_db_records(db_url: str) -> list[Record]:
    """Reviews saved by the review app (review_app.store) as validated Records: the same checks and
    normalisation as a row of a file; each problem reads ``URL table T id N: field 'X': message``
    (X is the table's column). Raises DataError listing every problem; nothing is created."""
    from review_app.store import FIELD_COLUMNS, TABLE, StoreError, export_rows, safe_url
    where = f"{safe_url(db_url)} table {TABLE}"
    errors: list[str] = []
    records = []
    try:
        for rid, raw in export_rows(db_url):
            rec, errs = _validate(where, rid, raw, loc=f"{where} id {rid}")
            for field, column in FIELD_COLUMNS.items():  # name the table's column, not the file column
                errs = [e.replace(f"field '{field}'", f"field '{column}'") for e in errs]
            errors.extend(errs)
            if rec:
                records.append(rec)
    except StoreError as e:
        raise DataError([str(e)]) from None
    if not errors and not records:
        errors.append(f"{where}: no saved reviews")
    if errors:
        raise DataError(errors)
    return records


def prepare_from_db(db_url: str, output_dir, tokenizer_dir, seq_length: int = 512, test_months: int = 1,
                    val_months: int = 1, overwrite: bool = False) -> dict:
    """:func:`prepare` for the reviews saved in a database (``sqlite:///runs/review.db``,
    ``snowflake://...``): the saved drafts and edited finals become the next training set, through
    the same validation, normalisation, dedupe, time split and output format."""
    from review_app.store import safe_url, sqlite_path
    out = Path(output_dir)
    _check_output(sqlite_path(db_url), out, overwrite)
    records = read_db_records(db_url)
    return _prepare_records(records, safe_url(db_url), out, tokenizer_dir, seq_length, test_months, val_months)


def _prepare_records(records: list[Record], source: str, out: Path, tokenizer_dir, seq_length: int,
                     test_months: int, val_months: int) -> dict:
    """Dedupe, split, render and write validated records (``source`` names the input in stats/errors)."""
    kept, dropped = dedupe(records)
    splits = split_by_month(kept, test_months, val_months, source=source)
    tok = load_tokenizer(tokenizer_dir)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # it becomes the output directory
    try:
        stats = {"prompt_version": PROMPT_VERSION, "input": source, "tokenizer": str(tokenizer_dir),
                 "seq_length": seq_length, "rows_read": len(records), "duplicates_dropped": dropped,
                 "test_months": test_months, "val_months": val_months,
                 "rows": {}, "months": {}, "tokens": {}, "truncated": {}, "lengths": {}}
        for split, recs in splits.items():
            nemo, hf, tot_tokens, chars = [], [], [], []
            p_tok = c_tok = trunc = 0
            for r in recs:
                msgs = build_messages(r.draft, r.section, r.date, r.fund)
                prompt = render_prompt(tok, msgs)
                meta = {"id": r.id, "date": r.date, "section": r.section, "fund": r.fund}
                nemo.append({"input": prompt, "output": r.final, **meta})
                hf.append({"prompt": msgs, "completion": [{"role": "assistant", "content": r.final}], **meta})
                pair = tokenize_pair(tok, prompt, r.final, seq_length)
                p_tok, c_tok, trunc = p_tok + pair.prompt_tokens, c_tok + pair.completion_tokens, trunc + pair.truncated
                full = tokenize_pair(tok, prompt, r.final, 10**9)  # untruncated length for percentiles
                tot_tokens.append(full.prompt_tokens + full.completion_tokens)
                chars.append(len(prompt) + len(r.final))
            write_text_atomic(tmp / f"{split}.jsonl", _jsonl(nemo))
            write_text_atomic(tmp / "hf" / f"{split}.jsonl", _jsonl(hf))
            stats["rows"][split] = len(recs)
            stats["months"][split] = sorted({r.date for r in recs})
            stats["tokens"][split] = {"prompt": p_tok, "completion": c_tok}
            stats["truncated"][split] = trunc
            stats["lengths"][split] = {"tokens": percentiles(tot_tokens), "chars": percentiles(chars),
                                       "final_chars": percentiles([len(r.final) for r in recs])}
        write_text_atomic(tmp / "stats.json", json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
        if out.exists():  # checked above: empty, or a previous prepared dataset with overwrite
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def read_prepared(path: str | os.PathLike) -> list[dict]:
    """Records of one prepared split file (NeMo or hf/ form)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
