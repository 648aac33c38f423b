"""The feedback loop: reviews saved by the review app -> ``prepare_data --from-db`` -> the next
training set, through the same validation, normalisation, time split and chat template as files."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import insert

from recipes import prepare_data
from recipes.data import DataError, read_prepared
from recipes.prepare_data import prepare_from_db
from recipes.prompt import build_messages, render_prompt
from review_app.store import Review, ReviewStore, export_rows, reviews

MONTHS = ("2024-03", "2024-04", "2024-05", "2024-06")
SPLITS = ("training", "validation", "test")


def _saved(i: int, month: str) -> Review:
    # half-width katakana and a full-width digit in the draft: normalised exactly like a file row
    return Review(fund=f"グローバル株式ファンド{i % 2}", section=("市場動向", "運用状況", "今後の見通しと運用方針")[i % 3],
                  month=month, draft=f"ﾌｧﾝﾄﾞの基準価額は前月末比で{i}％上昇しました。米国株は堅調。",
                  model_output=f"当ファンドの基準価額は前月末比{i}％上昇しました。",
                  final=f"当ファンドの基準価額は、前月末比で{i}％上昇しました。米国株式市場は堅調に推移しました。",
                  model="lora", adapter="/adapters/v1", user_name="sato")


@pytest.fixture
def db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'review.db'}"
    store = ReviewStore(url)
    store.save_many([_saved(i, m) for i, m in enumerate(MONTHS * 3)])
    store.close()
    return url


def _tokenizer(tiny_model_dir):
    from recipes.data import load_tokenizer
    return load_tokenizer(tiny_model_dir)


def test_saved_edits_become_the_next_training_set(db, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "prepared"
    rc = prepare_data.main(["--from-db", db, "--output", str(out), "--tokenizer", str(tiny_model_dir)])
    assert rc == 0, capsys.readouterr().err
    tok = _tokenizer(tiny_model_dir)
    saved = {r.id: r for r in ReviewStore(db, create=False).recent(limit=None)}
    rows = {s: read_prepared(out / f"{s}.jsonl") for s in SPLITS}
    assert {s: sorted({r["date"] for r in rs}) for s, rs in rows.items()} == {
        "training": ["2024-03", "2024-04"], "validation": ["2024-05"], "test": ["2024-06"]}
    assert sum(len(rs) for rs in rows.values()) == len(saved) == 12
    by_final = {r.final: r for r in saved.values()}
    for split, rs in rows.items():
        for row in rs:
            r = by_final[row["output"]]  # the EDITED text is the target, not the model's output
            assert row["output"] != r.model_output
            draft = "ファンドの基準価額は前月末比で" + r.draft.split("比で")[1]  # ﾌｧﾝﾄﾞ -> ファンド
            assert row["input"] == render_prompt(tok, build_messages(draft, r.section, r.month, r.fund))
            assert (row["date"], row["section"], row["fund"]) == (r.month, r.section, r.fund)
    hf = read_prepared(out / "hf" / "test.jsonl")
    assert [h["completion"][0]["content"] for h in hf] == [r["output"] for r in rows["test"]]
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["input"] == db and stats["rows_read"] == 12


def test_database_and_file_inputs_give_identical_datasets(db, tmp_path, tiny_model_dir):
    """The loop adds no path of its own: the same rows written to a JSONL file and prepared with
    --input produce byte-identical split files."""
    src = tmp_path / "same.jsonl"
    src.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for _, row in export_rows(db)),
                   encoding="utf-8")
    from recipes.data import prepare
    a = prepare_from_db(db, tmp_path / "from_db", tiny_model_dir)
    b = prepare(src, tmp_path / "from_file", tiny_model_dir)
    for name in [f"{s}.jsonl" for s in SPLITS] + [f"hf/{s}.jsonl" for s in SPLITS]:
        assert (tmp_path / "from_db" / name).read_bytes() == (tmp_path / "from_file" / name).read_bytes(), name
    assert {k: v for k, v in a.items() if k != "input"} == {k: v for k, v in b.items() if k != "input"}


def test_bad_saved_records_are_named_by_table_id_and_column(db, tmp_path, tiny_model_dir, capsys):
    store = ReviewStore(db, create=False)
    # the store accepts a zero-width space as text; normalisation leaves the final empty
    zw = store.save(Review(section="市場動向", month="2024-06", draft="下書き", model_output="出力", final="\u200b",
                           model="base"))
    with store.engine.begin() as conn:  # rows written by another tool, past the store's checks
        bad_month = conn.execute(insert(reviews).values(
            section="運用状況", month="2024-13", draft="d", model_output="o", final="f", model="m",
            prompt_version="v1", created_at=dt.datetime(2024, 7, 1))).inserted_primary_key[0]
        bad_section = conn.execute(insert(reviews).values(
            section="雑感", month="2024-06", draft="d", model_output="o", final="f", model="m",
            prompt_version="v1", created_at=dt.datetime(2024, 7, 1))).inserted_primary_key[0]
    out = tmp_path / "prepared"
    rc = prepare_data.main(["--from-db", db, "--output", str(out), "--tokenizer", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    where = f"{db} table review_comments"
    assert f"error: {db}: 3 problem(s), nothing written:" in err
    assert f"{where} id {zw}: field 'final': empty text" in err
    assert f"{where} id {bad_month}: field 'month': bad date '2024-13'" in err
    assert f"{where} id {bad_section}: field 'section': unknown section '雑感'" in err


def test_missing_or_empty_database(tmp_path, tiny_model_dir, capsys):
    missing = tmp_path / "nothing.db"
    rc = prepare_data.main(["--from-db", f"sqlite:///{missing}", "--output", str(tmp_path / "o"),
                            "--tokenizer", str(tiny_model_dir)])
    assert rc == 2 and "no such database file" in capsys.readouterr().err
    assert not missing.exists()  # reading never creates a database
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    ReviewStore(empty).close()
    with pytest.raises(DataError, match="no saved reviews"):
        prepare_from_db(empty, tmp_path / "o", tiny_model_dir)


def test_output_may_not_hold_the_database(db, tiny_model_dir):
    db_file = Path(db[len("sqlite:///"):])
    with pytest.raises(ValueError, match="would contain or replace the input"):
        prepare_from_db(db, db_file.parent, tiny_model_dir, overwrite=True)


def test_input_and_from_db_are_exclusive(db, tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare_data.main(["--input", "x.jsonl", "--from-db", db, "--output", str(tmp_path / "o"),
                           "--tokenizer", "t"])
    assert "not allowed with argument" in capsys.readouterr().err
