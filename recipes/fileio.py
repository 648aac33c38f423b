"""Atomic file writes: a temp file in the target's directory, then ``os.replace``.

A reader (or a killed run) never sees a half-written file: it sees the old file or the new one.
Used for every small text/JSON output of the project (prepared data, configs, reports, predictions),
and, with :func:`atomic_dir`, for whole output directories (model presets, merged models, NIM layouts).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically; creates the parent dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; these are ordinary data files
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj, indent: int = 1) -> Path:
    return write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=indent, default=str) + "\n")


def iter_jsonl(path: str | Path):
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file; a line that is not a
    JSON object raises ValueError naming the file and line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


@contextmanager
def atomic_dir(output_dir: str | Path, overwrite: bool = False, inputs: tuple[str | Path, ...] = (),
               allow_empty: bool = True) -> Iterator[Path]:
    """Yield a temp dir beside ``output_dir``; on success it replaces ``output_dir``.

    Refuses an existing non-empty ``output_dir`` unless ``overwrite`` (an empty one too unless
    ``allow_empty``), an
    output that is not a directory, and an output that is, contains or lies inside one of
    ``inputs`` (never overwrite an input). On failure the temp dir is removed and any old output
    is left untouched, so a killed run never leaves an output that looks complete.
    """
    out = Path(output_dir).absolute()
    for src in inputs:
        s, o = Path(src).resolve(), out.resolve()
        if o == s or s in o.parents or o in s.parents:
            raise FileExistsError(f"{out}: output overlaps the input {s}; choose another --output")
    _check_target(out, overwrite, allow_empty)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like any mkdir
    try:
        yield tmp
        _check_target(out, overwrite, allow_empty)  # it may have appeared while we were building
        old = None
        if out.exists():
            # rename() cannot replace a non-empty dir: move the old one aside, then drop it.
            old = out.parent / f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_target(out: Path, overwrite: bool, allow_empty: bool = True) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and (any(out.iterdir()) or not allow_empty) and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
