"""Command line for recipes.data.prepare: raw draft->final file -> prepared train/validation/test.

    python -m recipes.prepare_data --input datasets/demo_pairs.jsonl --output data/demo \\
        --tokenizer models/tiny [--seq-length 512] [--test-months 1] [--val-months 1] [--overwrite]
    python -m recipes.prepare_data --from-db sqlite:///runs/review.db --output data/reviewed \\
        --tokenizer models/tiny [same options]

``--from-db`` reads the reviews saved by the review app (python -m review_app) from a SQLAlchemy
URL (SQLite file, snowflake://...) instead of a file; each saved draft with its edited final is one
row, checked, normalised and split exactly like a file row (errors name the table, id and column):
:func:`prepare_from_db` reads them with review_app.store and hands them to ``recipes.data.prepare_rows``.

Pairs whose final breaks fact fidelity against its draft (a number, sign, unit, period or instrument
changed: benchmarks.fidelity) are reported, not dropped: such pairs teach the model to change facts. The
report is printed and written to ``OUTPUT/fidelity.json`` (one object per pair with findings).
Exit status 0 on success, 2 when the input has errors (every bad row is printed as
``FILE:ROW: field 'X': message``) or the output directory is unsafe to write; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import sys

from benchmarks.fidelity import compare
from recipes.data import DataError, prepare, prepare_rows, read_text_pairs
from recipes.fileio import write_json_atomic


def prepare_from_db(db_url: str, output_dir, tokenizer_dir, seq_length: int = 512, test_months: int = 1,
                    val_months: int = 1, overwrite: bool = False) -> dict:
    """``recipes.data.prepare`` for the reviews saved in a database (``sqlite:///runs/review.db``,
    ``snowflake://...``): the saved drafts and edited finals become the next training set, through
    the same validation, normalisation, dedupe, time split and output format. Each problem reads
    ``URL table T id N: field 'X': message`` (X is the table's column); a database that cannot be
    read is a DataError too. No row is written; a version-1 review database gets its schema migrated
    (review_app.store: the findings column is added)."""
    from review_app.store import FIELD_COLUMNS, TABLE, StoreError, export_rows, safe_url, sqlite_path
    try:
        return prepare_rows(export_rows(db_url), output_dir, tokenizer_dir, seq_length, test_months, val_months,
                            overwrite, where=f"{safe_url(db_url)} table {TABLE}", source=safe_url(db_url),
                            columns=FIELD_COLUMNS, input_path=sqlite_path(db_url))
    except StoreError as e:  # raised while the rows are read
        raise DataError([str(e)]) from None


def fidelity_report(pairs, where: str) -> dict:
    """``{"pairs", "with_findings", "rows": [{"row", "findings"}]}`` for ``(row, {draft, final})`` pairs."""
    rows, n = [], 0
    for line, row in pairs:
        n += 1
        c = compare(str(row["draft"]), str(row["final"]))
        if c.findings:
            rows.append({"row": f"{where}:{line}", "findings": [f.to_dict() for f in c.findings]})
    return {"pairs": n, "with_findings": len(rows), "rows": rows}


def _file_fidelity(input_path) -> dict:
    return fidelity_report(read_text_pairs(input_path), str(input_path))


def _start_file_fidelity(input_path):
    """The fidelity report of a raw file, computed in a forked worker process while this one prepares
    the data; a future (and the pool to shut down). On two cores it still competes with the
    tokenizer's batch threads: measured on 100,000 pairs, the command took 25-29 s with the report,
    23-24 s without. In this process, before prepare, where fork is not available or on one core."""
    import concurrent.futures
    import multiprocessing
    import os

    if "fork" not in multiprocessing.get_all_start_methods() or (os.cpu_count() or 1) < 2:
        f = concurrent.futures.Future()
        try:
            f.set_result(_file_fidelity(input_path))
        except Exception as e:  # raised on result(), after prepare's own errors, as from the worker
            f.set_exception(e)
        return f, None
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))
    return pool.submit(_file_fidelity, input_path), pool


def report_fidelity(report: dict, output_dir, show: int = 5) -> None:
    """Print the pairs with findings (a warning: they are kept) and write ``fidelity.json`` beside the data."""
    from pathlib import Path
    write_json_atomic(Path(output_dir) / "fidelity.json", report)
    if not report["with_findings"]:
        print(f"fact fidelity: every final keeps the numbers and names of its draft ({report['pairs']} pairs)")
        return
    print(f"warning: {report['with_findings']} of {report['pairs']} pair(s) have a final that changes a fact of its "
          "draft (kept; such pairs teach the model to change facts):", file=sys.stderr)
    for r in report["rows"][:show]:
        print(f"  {r['row']}: " + "; ".join(f["message"] for f in r["findings"]), file=sys.stderr)
    if report["with_findings"] > show:
        print(f"  ... all of them: {Path(output_dir) / 'fidelity.json'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.prepare_data", description=__doc__.split("\n\n")[0],
                                 epilog="File formats, columns and normalisation: datasets/README.md")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="raw pairs: .csv (UTF-8), .xlsx (first sheet) or .jsonl")
    src.add_argument("--from-db", metavar="URL", help="reviews saved by the review app: a SQLAlchemy URL, "
                     "e.g. sqlite:///runs/review.db or snowflake://user:pass@account/db/schema?warehouse=WH")
    ap.add_argument("--output", required=True, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--tokenizer", required=True,
                    help="local HF model/tokenizer directory whose chat template renders the prompts")
    ap.add_argument("--seq-length", type=int, default=512, help="training sequence length, for the "
                    "truncation count in stats.json (default 512)")
    ap.add_argument("--test-months", type=int, default=1, help="latest months held out as test (default 1)")
    ap.add_argument("--val-months", type=int, default=1, help="months before them used for validation (default 1)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing prepared output directory")
    args = ap.parse_args(argv)
    options = dict(seq_length=args.seq_length, test_months=args.test_months, val_months=args.val_months,
                   overwrite=args.overwrite)
    source = args.input
    try:
        if args.from_db:
            from review_app.store import safe_url  # SQLAlchemy only when a database is read
            source = safe_url(args.from_db)
            stats = prepare_from_db(args.from_db, args.output, args.tokenizer, **options)
            from review_app.store import TABLE, export_rows
            fidelity = fidelity_report(export_rows(args.from_db), f"{source} table {TABLE} id")
        else:
            pending, pool = _start_file_fidelity(args.input)  # before the tokenizer loads: a light fork
            try:
                stats = prepare(args.input, args.output, args.tokenizer, **options)
                fidelity = pending.result()
            finally:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
    except DataError as e:
        print(f"error: {source}: {len(e.errors)} problem(s), nothing written:", file=sys.stderr)
        for line in e.errors:
            print("  " + line, file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: stats[k] for k in ("rows", "duplicates_dropped", "months", "truncated")}
    print(f"wrote {args.output}:")
    print(json.dumps(summary, ensure_ascii=False, indent=1))
    report_fidelity(fidelity, args.output)
    n_trunc = sum(stats["truncated"].values())
    if n_trunc:  # NeMo and the HF backend cut such prompts from the end: the draft loses its tail
        print(f"warning: {n_trunc} row(s) are longer than --seq-length {args.seq_length} tokens "
              f"(max {max(v['tokens']['max'] or 0 for v in stats['lengths'].values())}); "
              "see lengths in stats.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
