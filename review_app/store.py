"""Saved reviews: one table, written and read through SQLAlchemy 2.0 Core.

The same schema works on a local SQLite file (the default, ``sqlite:///runs/review.db``) and on
Snowflake (``snowflake://user:pass@account/db/schema?warehouse=...``, snowflake-sqlalchemy): the
tables are created from :data:`metadata` (``create_all``), and a one-row version table records
which schema a database holds, so a later app can refuse (or migrate) an older or newer one.

Each saved review keeps what the model was asked and by whom: fund, section, month, the draft, the
model output, the edited final text, the model name and adapter that produced the output, the
prompt version (recipes.prompt.PROMPT_VERSION), the user and the UTC time of saving.

This module owns the table, so it also reads it back for training: :func:`export_rows` yields the
saved reviews in the raw-row form recipes/data.py validates (``python -m recipes.prepare_data
--from-db URL``: recipes.prepare_data.prepare_from_db hands them to recipes.data). A review's
section and month are checked by recipes.schema's rules, the ones training rows are checked by.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sqlalchemy import (Column, DateTime, Integer, MetaData, Sequence, String, Table, Text, TypeDecorator,
                        create_engine, func, inspect, insert, select)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from recipes.prompt import PROMPT_VERSION
from recipes.schema import SECTIONS, parse_month

SCHEMA_VERSION = 1
TABLE = "review_comments"
VERSION_TABLE = "review_schema_version"
DEFAULT_DB_URL = "sqlite:///runs/review.db"


class StoreError(RuntimeError):
    """The database cannot be used (missing, wrong schema version) or a review is invalid."""


class UTCDateTime(TypeDecorator):
    """A naive TIMESTAMP column that always holds UTC: aware datetimes are converted on the way in
    and come back as aware UTC. SQLite has no time zones and Snowflake's TIMESTAMP_NTZ none either,
    so storing one convention is what keeps both databases the same."""
    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


metadata = MetaData()

# Sequence: Snowflake has no autoincrement without one (snowflake-sqlalchemy); SQLite ignores it and
# uses its rowid. optional=False on purpose, so Snowflake always draws ids from the sequence.
reviews = Table(
    TABLE, metadata,
    Column("id", Integer, Sequence(f"{TABLE}_id_seq"), primary_key=True),
    Column("fund", String(200), nullable=True),
    Column("section", String(40), nullable=False),
    Column("month", String(7), nullable=False, comment="YYYY-MM, the report month"),
    Column("draft", Text, nullable=False),
    Column("model_output", Text, nullable=False),
    Column("final", Text, nullable=False, comment="the output as the reviewer edited and saved it"),
    Column("model", String(200), nullable=False, comment="served model name the output came from"),
    Column("adapter", String(500), nullable=True, comment="LoRA adapter behind that name, if any"),
    Column("prompt_version", String(20), nullable=False),
    Column("user_name", String(100), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False, comment="UTC"),
    comment="draft -> model output -> reviewed final (review_app); training data via --from-db",
)

schema_version = Table(
    VERSION_TABLE, metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", UTCDateTime(), nullable=False),
)


@dataclass(frozen=True)
class Review:
    """One review as the app saves it (``id`` and ``created_at`` are set by :meth:`ReviewStore.save`)."""
    section: str
    month: str
    draft: str
    model_output: str
    final: str
    model: str
    fund: str | None = None
    adapter: str | None = None
    prompt_version: str = PROMPT_VERSION
    user_name: str | None = None
    id: int | None = None
    created_at: dt.datetime | None = field(default=None, compare=False)

    def problems(self) -> list[str]:
        """What makes this review unsavable ('field X: message' each); empty when it is fine."""
        out = []
        for name in ("draft", "model_output", "final", "model"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                out.append(f"field '{name}': empty")
        if self.section not in SECTIONS:
            out.append(f"field 'section': unknown section {self.section!r} (expected {' / '.join(SECTIONS)})")
        if not isinstance(self.month, str) or parse_month(self.month) != self.month:
            out.append(f"field 'month': bad month {self.month!r} (expected YYYY-MM)")
        return out


def safe_url(url: str) -> str:
    """The URL as it may be shown or logged: any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a database URL>"  # the text may hold a password: never echo it


def sqlite_path(url: str) -> Path | None:
    """The file of a file-backed SQLite URL; None for other databases, in-memory SQLite and
    URLs that do not parse (opening those reports the problem)."""
    try:
        u = make_url(url)
    except ArgumentError:
        return None
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    return Path(u.database)


def _row_to_review(row) -> Review:
    m = row._mapping
    return Review(**{c.name: m[c.name] for c in reviews.columns})


def insert_statement(r: Review):
    """The INSERT for one review (bound parameters; the id comes from the database)."""
    values = {c.name: getattr(r, c.name) for c in reviews.columns if c.name not in ("id", "created_at")}
    values["created_at"] = r.created_at or _now()
    return insert(reviews).values(**values)


def recent_query(limit: int | None = 50):
    """SELECT of the newest reviews first."""
    q = select(reviews).order_by(reviews.c.created_at.desc(), reviews.c.id.desc())
    return q if limit is None else q.limit(limit)


def export_query():
    """SELECT of every review in the order it was saved (the training export)."""
    return select(reviews).order_by(reviews.c.id)


class ReviewStore:
    """Saved reviews in one database. ``create=True`` makes the tables when they are missing
    (and the SQLite file's directory); ``create=False`` only opens an existing store."""

    def __init__(self, url: str = DEFAULT_DB_URL, create: bool = True, engine: Engine | None = None):
        self.url = url
        path = sqlite_path(url)
        if path is not None:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            elif not path.is_file():  # sqlite would silently create an empty file
                raise StoreError(f"{safe_url(url)}: no such database file")
        self.engine = engine or create_engine(url)
        if create:
            self.create()
        self.check_version()

    def create(self) -> None:
        """Create missing tables and record the schema version (one transaction)."""
        with self.engine.begin() as conn:
            metadata.create_all(conn)
            if conn.execute(select(func.count()).select_from(schema_version)).scalar_one() == 0:
                conn.execute(insert(schema_version).values(version=SCHEMA_VERSION, applied_at=_now()))

    def check_version(self) -> int:
        """The database's schema version; StoreError when the tables are missing or it is not ours."""
        names = set(inspect(self.engine).get_table_names())
        missing = [t for t in (TABLE, VERSION_TABLE) if t not in names]
        if missing:
            raise StoreError(f"{safe_url(self.url)}: no table {', '.join(missing)} "
                             "(nothing saved yet, or not a review_app database)")
        with self.engine.connect() as conn:
            found = conn.execute(select(func.max(schema_version.c.version))).scalar_one()
        if found != SCHEMA_VERSION:
            fix = "upgrade review_app" if (found or 0) > SCHEMA_VERSION else "migrate the database"
            raise StoreError(f"{safe_url(self.url)}: schema version {found}, this code reads version "
                             f"{SCHEMA_VERSION}; {fix}")
        return found

    def save(self, review: Review) -> int:
        """Insert one review in a transaction; return its id."""
        return self.save_many([review])[0]

    def save_many(self, items: list[Review]) -> list[int]:
        """Insert reviews in ONE transaction: all are saved or, on any error, none is.
        Invalid reviews raise StoreError naming the item and field."""
        ids = []
        with self.engine.begin() as conn:
            for n, r in enumerate(items):
                probs = r.problems()
                if probs:  # raising inside begin() rolls back the rows already inserted
                    raise StoreError(f"review {n + 1} of {len(items)}: " + "; ".join(probs))
                ids.append(self._insert(conn, r))
        return ids

    @staticmethod
    def _insert(conn: Connection, r: Review) -> int:
        result = conn.execute(insert_statement(r))
        return int(result.inserted_primary_key[0])

    def recent(self, limit: int | None = 50) -> list[Review]:
        """Saved reviews, newest first."""
        with self.engine.connect() as conn:
            return [_row_to_review(row) for row in conn.execute(recent_query(limit))]

    def get(self, review_id: int) -> Review | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(reviews).where(reviews.c.id == review_id)).first()
        return _row_to_review(row) if row else None

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(reviews)).scalar_one()

    def close(self) -> None:
        self.engine.dispose()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# recipes/data.py raw-row field -> the column of this table it comes from
FIELD_COLUMNS = {"date": "month", "section": "section", "draft": "draft", "final": "final", "fund": "fund"}


def to_raw_row(r: Review) -> dict:
    """A saved review in recipes/data.py's raw-row form (date, section, draft, final, fund)."""
    return {field: getattr(r, column) for field, column in FIELD_COLUMNS.items()}


def export_rows(url: str) -> Iterator[tuple[int, dict]]:
    """``(id, raw row)`` for every saved review, oldest first, for recipes.data to validate exactly
    like a row of a file. StoreError when the database or table is missing (nothing is created)."""
    store = None
    try:
        store = ReviewStore(url, create=False)
        with store.engine.connect() as conn:
            for row in conn.execute(export_query()):
                r = _row_to_review(row)
                yield r.id, to_raw_row(r)
    except (SQLAlchemyError, ImportError) as e:  # bad URL, driver missing, server down, not a database
        raise StoreError(f"{safe_url(url)}: cannot read ({type(e).__name__}: {e})") from None
    finally:
        if store is not None:
            store.close()
