"""Saved reviews: one table, written and read through SQLAlchemy 2.0 Core.

The same schema works on a local SQLite file (the default, ``sqlite:///runs/review.db``) and on
Snowflake (``snowflake://user:pass@account/db/schema?warehouse=...``, snowflake-sqlalchemy): the
tables are created from :data:`metadata` (``create_all``), and a one-row version table records
which schema a database holds. Opening a database of an older version migrates it in place
(:data:`MIGRATIONS`: version 1 -> 2 adds the ``findings`` column, NULL in the rows already saved, and
updates the version row); a newer or unknown version, or a migration the database refuses, is a
StoreError naming the database and both versions.

Each saved review keeps what the model was asked and by whom: fund, section, month, the draft, the
model output, the edited final text, the model name and adapter that produced the output, the
prompt version (recipes.prompt.PROMPT_VERSION), the user and the UTC time of saving, and the
fact-fidelity findings of the final against the draft as the app showed them (a JSON list of finding
dicts, ``[]`` when every number and instrument matched; NULL for a review saved before schema
version 2). This module stores the findings it is given; it does not compute them (review_app.app
does, with benchmarks.fidelity).

This module owns the table, so it also reads it back for training: :func:`export_rows` yields the
saved reviews in the raw-row form recipes/data.py validates (``python -m recipes.prepare_data
--from-db URL``: recipes.prepare_data.prepare_from_db hands them to recipes.data). A review's
section and month are checked by recipes.schema's rules, the ones training rows are checked by.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import (Column, DateTime, Integer, MetaData, Sequence, String, Table, Text, TypeDecorator,
                        create_engine, func, inspect, insert, select, text, update)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from recipes.prompt import PROMPT_VERSION
from recipes.schema import SECTIONS, parse_month

SCHEMA_VERSION = 2
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


class JSONText(TypeDecorator):
    """A JSON value kept as plain TEXT (the same on SQLite and Snowflake): ``json.dumps`` on the way
    in (non-ASCII kept as is), ``json.loads`` on the way out; None stays NULL."""
    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else json.dumps(value, ensure_ascii=False)

    def process_result_value(self, value, dialect):
        return None if value is None else json.loads(value)


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
    # schema version 2
    Column("findings", JSONText(), nullable=True,
           comment="fact-fidelity findings, draft -> final (JSON list; [] none; NULL saved before version 2)"),
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
    # benchmarks.fidelity Finding.to_dict() of each finding, final against draft; [] none; None not checked
    findings: list[dict] | None = None
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
        if self.findings is not None:
            if not isinstance(self.findings, list) or not all(isinstance(f, dict) for f in self.findings):
                out.append("field 'findings': expected a list of finding dicts or None, got "
                           f"{type(self.findings).__name__}")
            else:
                try:
                    json.dumps(self.findings, ensure_ascii=False)
                except (TypeError, ValueError) as e:
                    out.append(f"field 'findings': not JSON ({e})")
        return out


def safe_url(url: str) -> str:
    """The URL as it may be shown or logged: any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a database URL>"  # the text may hold a password: never echo it


def sqlite_path(url: str) -> Path | None:
    """The file of a file-backed SQLite URL; None for other databases, in-memory SQLite and
    URLs that do not parse (opening those reports the problem). SQLite URI filenames
    (``sqlite:///file:runs/review.db?mode=ro&uri=true``) name the file in the URI's path."""
    from urllib.parse import parse_qs, unquote, urlsplit

    try:
        u = make_url(url)
    except ArgumentError:
        return None
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    if str(u.query.get("uri", "")).lower() in ("true", "1") and u.database.startswith("file:"):
        parts = urlsplit(u.database)
        path = unquote(parts.path)
        mode = u.query.get("mode") or (parse_qs(parts.query).get("mode") or [None])[0]
        if path in ("", ":memory:") or mode == "memory":  # the URL's query goes into the URI (pysqlite)
            return None
        return Path(path)
    return Path(u.database)


def add_column_ddl(column: Column, dialect) -> str:
    """``ALTER TABLE <table> ADD COLUMN <column> <type>`` for one column of :data:`reviews`, in the
    dialect's quoting and type names (SQLAlchemy Core has no ADD COLUMN construct; SQLite and
    Snowflake both accept this form). The column must be nullable: the rows already there get NULL."""
    if not column.nullable:
        raise ValueError(f"column {column.name}: a column added to a table with rows must be nullable")
    prep = dialect.identifier_preparer
    return (f"ALTER TABLE {prep.format_table(column.table)} ADD COLUMN {prep.format_column(column)} "
            f"{column.type.compile(dialect=dialect)}")


def _column_names(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns(TABLE)}


def _migrate_1_to_2(conn: Connection) -> None:
    """Version 2 adds ``findings``. Idempotent: SQLite runs ALTER TABLE outside the transaction that
    updates the version row, so a migration cut off between the two finds the column already there."""
    if "findings" not in _column_names(conn):
        conn.execute(text(add_column_ddl(reviews.c.findings, conn.dialect)))


# from-version -> the step to from-version + 1 (run in one transaction with the version row's update)
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _migrate_1_to_2}


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
        """The database's schema version, after migrating an older one in place (:meth:`migrate`);
        StoreError when the tables are missing, the version is newer or unknown, a migration fails,
        or a column of :data:`reviews` is missing."""
        names = set(inspect(self.engine).get_table_names())
        missing = [t for t in (TABLE, VERSION_TABLE) if t not in names]
        if missing:
            raise StoreError(f"{safe_url(self.url)}: no table {', '.join(missing)} "
                             "(nothing saved yet, or not a review_app database)")
        found = self._version()
        if found != SCHEMA_VERSION:
            if found is None or found > SCHEMA_VERSION or any(v not in MIGRATIONS
                                                              for v in range(found, SCHEMA_VERSION)):
                fix = "upgrade review_app" if (found or 0) > SCHEMA_VERSION else "no migration from it is known"
                raise StoreError(f"{safe_url(self.url)}: schema version {found}, this code reads version "
                                 f"{SCHEMA_VERSION}; {fix}")
            found = self.migrate(found)
        with self.engine.connect() as conn:
            missing = [c.name for c in reviews.columns if c.name not in _column_names(conn)]
        if missing:
            raise StoreError(f"{safe_url(self.url)}: schema version {found} but table {TABLE} has no column "
                             f"{', '.join(missing)}; not a database this code wrote")
        return found

    def _version(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(schema_version.c.version))).scalar_one()

    def migrate(self, found: int) -> int:
        """Bring a database of schema version ``found`` to :data:`SCHEMA_VERSION`, one step per
        transaction (each step and its version-row update together). StoreError naming the database
        and the versions when the database refuses (e.g. a role that may not ALTER TABLE); the steps
        already done stay done. Two apps opening the same old database at once: the one that loses
        the race re-reads the version and finds it migrated."""
        version = found
        while version < SCHEMA_VERSION:
            for attempt in (1, 2):
                try:
                    with self.engine.begin() as conn:
                        now_at = conn.execute(select(func.max(schema_version.c.version))).scalar_one()
                        if now_at != version:  # another process migrated it meanwhile
                            break
                        MIGRATIONS[version](conn)
                        conn.execute(update(schema_version).where(schema_version.c.version == version)
                                     .values(version=version + 1, applied_at=_now()))
                    break
                except SQLAlchemyError as e:
                    if attempt == 2:
                        raise StoreError(f"{safe_url(self.url)}: schema version {found}, this code reads version "
                                         f"{SCHEMA_VERSION}; migrating from version {version} to {version + 1} "
                                         f"failed ({type(e).__name__}: {e}); migrate it by hand or with a role "
                                         "that may ALTER TABLE") from None
            before, version = version, self._version()
            if version is None or version <= before or version > SCHEMA_VERSION:
                raise StoreError(f"{safe_url(self.url)}: schema version {before} became {version} while "
                                 f"migrating to version {SCHEMA_VERSION}")
        return version

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
