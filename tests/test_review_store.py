"""review_app.store: saved reviews on a real SQLite file (round trip, transactions, schema version,
the fact-fidelity findings and the migration of a version-1 database) and the Snowflake dialect's SQL
for the same tables and statements."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, insert, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateSequence, CreateTable

from recipes.prompt import PROMPT_VERSION
from review_app.store import (SCHEMA_VERSION, TABLE, Review, ReviewStore, StoreError, add_column_ddl, export_rows,
                              insert_statement, recent_query, reviews, safe_url, schema_version, sqlite_path)


def _review(i: int = 0, **kw) -> Review:
    base = dict(fund=f"ファンド{i}", section="市場動向", month="2024-06", draft=f"下書き{i}：米国株は上昇。",
                model_output=f"出力{i}：米国株式は上昇しました。", final=f"最終{i}：米国株式市場は上昇しました。",
                model="lora", adapter="/adapters/small-lora", user_name="tanaka")
    return Review(**{**base, **kw})


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'sub' / 'review.db'}"


def test_save_and_read_back_every_field(url):
    store = ReviewStore(url)
    t0 = dt.datetime.now(dt.timezone.utc)
    rid = store.save(_review(1))
    got = store.get(rid)
    assert got == Review(**{**_review(1).__dict__, "id": rid})  # created_at is not compared
    assert got.prompt_version == PROMPT_VERSION
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == dt.timedelta(0)
    assert t0 - dt.timedelta(seconds=1) <= got.created_at <= dt.datetime.now(dt.timezone.utc)
    assert sqlite_path(url).is_file()  # the directory was made


def test_reviews_persist_and_list_newest_first(url):
    store = ReviewStore(url)
    ids = [store.save(_review(i)) for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    store.close()
    again = ReviewStore(url)  # a new process would see the same rows
    assert [r.id for r in again.recent()] == ids[::-1]
    assert [r.id for r in again.recent(limit=2)] == ids[:0:-1]
    assert again.count() == 3


def test_created_at_is_stored_as_utc(url):
    store = ReviewStore(url)
    jst = dt.timezone(dt.timedelta(hours=9))
    when = dt.datetime(2024, 7, 1, 9, 30, tzinfo=jst)
    rid = store.save(_review(created_at=when))
    got = store.get(rid).created_at
    assert got == when and got.tzinfo == dt.timezone.utc and got.hour == 0
    with store.engine.connect() as conn:  # the column itself holds the naive UTC time
        raw = conn.execute(text(f"SELECT created_at FROM {TABLE}")).scalar_one()
    assert str(raw).startswith("2024-07-01 00:30:00")


def test_invalid_review_names_the_field_and_saves_nothing(url):
    store = ReviewStore(url)
    with pytest.raises(StoreError, match=r"review 2 of 3: field 'final': empty"):
        store.save_many([_review(1), _review(2, final="  \n"), _review(3)])
    assert store.count() == 0  # review 1 was inserted inside the transaction, then rolled back
    for bad, match in [(dict(section="市況"), "field 'section': unknown section"),
                       (dict(month="2024-13"), "field 'month': bad month"),
                       (dict(month="2024/06"), "field 'month'"),
                       (dict(model=""), "field 'model': empty")]:
        with pytest.raises(StoreError, match=match):
            store.save(_review(**bad))
    assert store.count() == 0


def test_database_error_mid_transaction_rolls_back(url):
    """A failure raised by the database itself (here a trigger) after earlier rows of the same
    save were written: none of them may stay."""
    store = ReviewStore(url)
    with store.engine.begin() as conn:
        conn.execute(text(f"CREATE TRIGGER refuse BEFORE INSERT ON {TABLE} WHEN NEW.fund = 'boom' "
                          "BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"))
    with pytest.raises(IntegrityError, match="refused by trigger"):
        store.save_many([_review(1), _review(2), _review(3, fund="boom")])
    assert store.count() == 0
    assert store.save_many([_review(4)]) and store.count() == 1


def test_schema_version_is_recorded_and_checked(url):
    store = ReviewStore(url)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM review_schema_version")).scalars().all() == [SCHEMA_VERSION]
    ReviewStore(url)  # opening again adds no second version row
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM review_schema_version")).scalar_one() == 1
    with store.engine.begin() as conn:
        conn.execute(update(schema_version).values(version=SCHEMA_VERSION + 1))
    with pytest.raises(StoreError, match=rf"schema version {SCHEMA_VERSION + 1}.*upgrade review_app"):
        ReviewStore(url)


def test_open_without_create_never_makes_a_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'missing.db'}"
    with pytest.raises(StoreError, match="no such database file"):
        ReviewStore(url, create=False)
    assert not (tmp_path / "missing.db").exists()
    other = tmp_path / "other.db"  # an SQLite file that is not a review database
    create_engine(f"sqlite:///{other}").connect().close()
    with pytest.raises(StoreError, match=f"no table {TABLE}"):
        ReviewStore(f"sqlite:///{other}", create=False)
    with pytest.raises(StoreError, match="no such database file"):
        list(export_rows(url))


def test_export_rows_gives_the_data_row_form_in_saved_order(url):
    store = ReviewStore(url)
    ids = store.save_many([_review(1), _review(2, fund=None, month="2024-07")])
    rows = list(export_rows(url))
    assert [i for i, _ in rows] == ids
    assert rows[1][1] == {"date": "2024-07", "section": "市場動向", "draft": "下書き2：米国株は上昇。",
                          "final": "最終2：米国株式市場は上昇しました。", "fund": None}


def test_safe_url_hides_passwords():
    u = "snowflake://reviewer:s3cr%40t@myorg-acct/FUNDS/REVIEWS?warehouse=WH&role=APP"
    shown = safe_url(u)
    assert "s3cr" not in shown and "***" in shown and "myorg-acct/FUNDS/REVIEWS" in shown
    assert safe_url("not a url with password hunter2") == "<not a database URL>"
    assert sqlite_path(u) is None and sqlite_path("sqlite://") is None


def test_sqlite_uri_filenames_name_their_file(tmp_path):
    db = tmp_path / "my reviews.db"
    ReviewStore(f"sqlite:///{db}").engine.dispose()  # a store with its tables
    uri = f"sqlite:///file:{str(db).replace(' ', '%20')}?mode=ro&uri=true"
    assert sqlite_path(uri) == db
    assert sqlite_path(f"sqlite:///file:{db}") == Path(f"file:{db}")  # without uri=true: a plain file name
    assert sqlite_path("sqlite:///file::memory:?cache=shared&uri=true") is None
    assert sqlite_path("sqlite:///file:mem1?mode=memory&cache=shared&uri=true") is None
    store = ReviewStore(uri, create=False)  # opens the existing file read-only instead of refusing it
    assert store.check_version() == SCHEMA_VERSION and list(export_rows(uri)) == []
    store.engine.dispose()
    with pytest.raises(StoreError, match="no such database file"):
        ReviewStore(f"sqlite:///file:{tmp_path / 'missing.db'}?mode=ro&uri=true", create=False)


# ---------------------------------------------------------------------------------------------
# Fact-fidelity findings (schema version 2) and the migration of a version-1 database

FINDING = {"kind": "value_changed", "message": "value changed: 2.1% (mom) in the draft, 2.3% (mom) in the rewrite",
           "draft_span": [8, 12], "final_span": [9, 13], "draft_text": "2.1%", "final_text": "2.3%"}

# exactly what schema version 1 (SQLAlchemy's create_all on SQLite) made, and its version row
V1_DDL = ("""CREATE TABLE review_comments (
	id INTEGER NOT NULL, fund VARCHAR(200), section VARCHAR(40) NOT NULL, month VARCHAR(7) NOT NULL,
	draft TEXT NOT NULL, model_output TEXT NOT NULL, final TEXT NOT NULL, model VARCHAR(200) NOT NULL,
	adapter VARCHAR(500), prompt_version VARCHAR(20) NOT NULL, user_name VARCHAR(100),
	created_at DATETIME NOT NULL, PRIMARY KEY (id))""",
          """CREATE TABLE review_schema_version (version INTEGER NOT NULL, applied_at DATETIME NOT NULL,
	PRIMARY KEY (version))""",
          "INSERT INTO review_schema_version (version, applied_at) VALUES (1, '2024-06-01 00:00:00.000000')")
V1_COLUMNS = ("id", "fund", "section", "month", "draft", "model_output", "final", "model", "adapter",
              "prompt_version", "user_name", "created_at")


def _v1_database(path, n: int = 2) -> str:
    """A review database file as schema version 1 wrote it, with ``n`` saved reviews."""
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    with engine.begin() as conn:
        for stmt in V1_DDL:
            conn.execute(text(stmt))
        for i in range(1, n + 1):
            r = _review(i)
            conn.execute(text(f"INSERT INTO {TABLE} ({', '.join(V1_COLUMNS)}) VALUES "
                              f"({', '.join(':' + c for c in V1_COLUMNS)})"),
                         {**{c: getattr(r, c) for c in V1_COLUMNS if c != "created_at"}, "id": i,
                          "created_at": f"2024-06-0{i} 09:00:00.000000"})
    engine.dispose()
    return url


def _columns(url) -> list[str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        cols = [row[1] for row in conn.execute(text(f"PRAGMA table_info({TABLE})"))]
    engine.dispose()
    return cols


def _versions(url) -> list[int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        v = conn.execute(text("SELECT version FROM review_schema_version")).scalars().all()
    engine.dispose()
    return v


def test_findings_are_saved_as_json_and_read_back(url):
    store = ReviewStore(url)
    with_finding = store.save(_review(1, findings=[FINDING]))
    faithful = store.save(_review(2, findings=[]))
    unchecked = store.save(_review(3))  # a review saved without a check (e.g. by a script): NULL
    assert store.get(with_finding).findings == [FINDING]
    assert store.get(faithful).findings == [] and store.get(unchecked).findings is None
    assert store.get(with_finding) == _review(1, findings=[FINDING], id=with_finding)
    with store.engine.connect() as conn:  # the column holds plain JSON text, non-ASCII as is
        raw = dict(conn.execute(text(f"SELECT id, findings FROM {TABLE}")).all())
    assert json.loads(raw[with_finding]) == [FINDING] and "2.1%" in raw[with_finding]
    assert raw[faithful] == "[]" and raw[unchecked] is None
    # the training export does not change: findings are not a training field
    assert all(set(row) == {"date", "section", "draft", "final", "fund"} for _, row in export_rows(url))


def test_findings_that_are_not_a_list_of_dicts_are_refused(url):
    store = ReviewStore(url)
    for bad, match in [("[]", "expected a list of finding dicts or None, got str"),
                       ([{"kind": "missing"}, "x"], "expected a list of finding dicts"),
                       ([{"span": {1, 2}}], "field 'findings': not JSON")]:
        with pytest.raises(StoreError, match=match):
            store.save(_review(findings=bad))
    assert store.count() == 0


def test_a_version_1_database_is_migrated_in_place(tmp_path):
    url = _v1_database(tmp_path / "old.db")
    assert "findings" not in _columns(url) and _versions(url) == [1]
    store = ReviewStore(url)  # the app opens it
    assert store.check_version() == SCHEMA_VERSION == 2
    assert _columns(url) == [*V1_COLUMNS, "findings"] and _versions(url) == [SCHEMA_VERSION]  # updated, not added
    old = store.recent(limit=None)
    assert [r.id for r in old] == [2, 1]  # the rows are kept, every field as saved
    for r in old:
        assert r == _review(r.id, id=r.id) and r.findings is None  # saved before the check: NULL, not []
        assert r.created_at == dt.datetime(2024, 6, r.id, 9, 0, tzinfo=dt.timezone.utc)
    new = store.save(_review(3, findings=[FINDING]))
    assert store.get(new).findings == [FINDING] and store.count() == 3
    store.close()
    ReviewStore(url)  # opening the migrated database again changes nothing
    assert _versions(url) == [SCHEMA_VERSION] and _columns(url).count("findings") == 1
    # the training export reads the migrated rows as before
    assert [i for i, _ in export_rows(url)] == [1, 2, 3]
    assert dict(export_rows(url))[1] == {"date": "2024-06", "section": "市場動向", "draft": "下書き1：米国株は上昇。",
                                          "final": "最終1：米国株式市場は上昇しました。", "fund": "ファンド1"}


def test_reading_a_version_1_database_for_training_migrates_it_too(tmp_path):
    url = _v1_database(tmp_path / "old.db", n=3)
    rows = list(export_rows(url))  # create=False: opens, migrates, creates nothing else
    assert [i for i, _ in rows] == [1, 2, 3] and rows[0][1]["final"] == "最終1：米国株式市場は上昇しました。"
    assert _versions(url) == [SCHEMA_VERSION] and "findings" in _columns(url)


def test_a_migration_cut_off_after_adding_the_column_is_finished(tmp_path):
    """SQLite commits ALTER TABLE by itself: a process killed before the version row's update leaves the
    column with version 1. The next open only updates the version."""
    url = _v1_database(tmp_path / "half.db")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(add_column_ddl(reviews.c.findings, conn.dialect)))
    engine.dispose()
    store = ReviewStore(url)
    assert _versions(url) == [SCHEMA_VERSION] and store.count() == 2


def test_a_migration_the_database_refuses_names_the_database_and_versions(tmp_path):
    path = tmp_path / "readonly.db"
    url = _v1_database(path)
    readonly = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    with pytest.raises(StoreError) as e:
        ReviewStore(url, create=False, engine=readonly)
    msg = str(e.value)
    assert msg.startswith(f"sqlite:///{path}: schema version 1, this code reads version {SCHEMA_VERSION}; "
                          f"migrating from version 1 to 2 failed (OperationalError:") and "readonly" in msg
    readonly.dispose()
    assert _versions(url) == [1] and "findings" not in _columns(url)  # nothing half done
    assert ReviewStore(url).count() == 2  # with write access it migrates


def test_an_unknown_older_version_is_refused(tmp_path):
    url = _v1_database(tmp_path / "v0.db")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE review_schema_version SET version = 0"))
    engine.dispose()
    with pytest.raises(StoreError, match=rf"v0.db: schema version 0, this code reads version {SCHEMA_VERSION}; "
                                         "no migration from it is known"):
        ReviewStore(url)
    assert _versions(url) == [0] and "findings" not in _columns(url)


def test_a_current_version_without_the_column_is_refused(tmp_path):
    url = _v1_database(tmp_path / "odd.db")
    engine = create_engine(url)
    with engine.begin() as conn:  # stamped version 2 by hand, never migrated
        conn.execute(text(f"UPDATE review_schema_version SET version = {SCHEMA_VERSION}"))
    engine.dispose()
    with pytest.raises(StoreError, match=rf"schema version {SCHEMA_VERSION} but table {TABLE} has no column findings"):
        ReviewStore(url)


# ---------------------------------------------------------------------------------------------
# Snowflake: the same metadata and statements, compiled by snowflake-sqlalchemy's dialect


@pytest.fixture(scope="module")
def snow():
    from snowflake.sqlalchemy import snowdialect
    return snowdialect.dialect()


def _sql(stmt, dialect) -> str:
    return " ".join(str(stmt.compile(dialect=dialect)).split())


def test_snowflake_create_table(snow):
    ddl = _sql(CreateTable(reviews), snow)
    assert ddl.startswith(f"CREATE TABLE {TABLE} (")
    assert f"id INTEGER NOT NULL DEFAULT {TABLE}_id_seq.nextval" in ddl  # Snowflake ids come from the sequence
    for col in ("section VARCHAR(40) NOT NULL", "month VARCHAR(7) NOT NULL", "draft TEXT NOT NULL",
                "model_output TEXT NOT NULL", "final TEXT NOT NULL", "model VARCHAR(200) NOT NULL",
                "adapter VARCHAR(500)", "prompt_version VARCHAR(20) NOT NULL", "user_name VARCHAR(100)",
                "created_at datetime NOT NULL", "findings TEXT", "PRIMARY KEY (id)"):
        assert col in ddl, col
    assert _sql(CreateSequence(reviews.c.id.default), snow) == f"CREATE SEQUENCE {TABLE}_id_seq"
    assert _sql(CreateTable(schema_version), snow) == (
        "CREATE TABLE review_schema_version ( version INTEGER NOT NULL, applied_at datetime NOT NULL, "
        "PRIMARY KEY (version) )")


def test_snowflake_insert_and_selects(snow):
    ins = insert_statement(_review(1)).compile(dialect=snow)
    assert " ".join(str(ins).split()) == (
        f"INSERT INTO {TABLE} (id, fund, section, month, draft, model_output, final, model, adapter, "
        "prompt_version, user_name, created_at, findings) VALUES (%(id)s, %(fund)s, %(section)s, %(month)s, "
        "%(draft)s, %(model_output)s, %(final)s, %(model)s, %(adapter)s, %(prompt_version)s, %(user_name)s, "
        "%(created_at)s, %(findings)s)")
    # values are bound parameters, never pasted into the SQL text
    assert ins.params["final"] == "最終1：米国株式市場は上昇しました。" and "最終1" not in str(ins)
    # the UTC conversion happens on bind, for Snowflake as for SQLite
    jst = dt.datetime(2024, 7, 1, 9, 0, tzinfo=dt.timezone(dt.timedelta(hours=9)))
    bound = reviews.c.created_at.type.process_bind_param(jst, snow)
    assert bound == dt.datetime(2024, 7, 1, 0, 0) and bound.tzinfo is None
    sel = _sql(recent_query(25), snow)
    assert sel.startswith(f"SELECT {TABLE}.id, {TABLE}.fund, {TABLE}.section")
    assert sel.endswith(f"FROM {TABLE} ORDER BY {TABLE}.created_at DESC, {TABLE}.id DESC LIMIT %(param_1)s")
    assert _sql(insert(schema_version).values(version=1, applied_at=jst), snow) == (
        "INSERT INTO review_schema_version (version, applied_at) VALUES (%(version)s, %(applied_at)s)")


def test_snowflake_store_runs_the_same_statements(snow, url):
    """The statements sent to SQLite and to Snowflake come from the same builders: record what a
    real SQLite save/list executes and compile those statement objects for Snowflake."""
    store = ReviewStore(url)
    seen = []
    event.listen(store.engine, "before_execute", lambda conn, stmt, *a: seen.append(stmt))
    store.save(_review(1))
    store.recent(5)
    kinds = [_sql(s, snow).split()[0] for s in seen]
    assert kinds == ["INSERT", "SELECT"]
    assert all(TABLE in _sql(s, snow) for s in seen)


def test_snowflake_migration_adds_the_column(snow):
    from sqlalchemy.dialects import sqlite
    assert add_column_ddl(reviews.c.findings, snow) == f"ALTER TABLE {TABLE} ADD COLUMN findings TEXT"
    assert add_column_ddl(reviews.c.findings, sqlite.dialect()) == f"ALTER TABLE {TABLE} ADD COLUMN findings TEXT"
    with pytest.raises(ValueError, match="must be nullable"):
        add_column_ddl(reviews.c.final, snow)
