"""recipes.data / recipes.prepare_data: input formats, validation errors, time split, output
formats and stats.json."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from recipes import prepare_data
from recipes.data import DataError, prepare, read_prepared, read_records
from recipes.prompt import build_messages, render_prompt
from recipes.schema import canonical_section, normalize_text, parse_month
from recipes.synth_data import generate_pairs, write_rows
from recipes.tokens import tokenize_pair

SPLITS = ("training", "validation", "test")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _build_chatml_tokenizer(out: Path) -> Path:
    """A small byte-level BPE trained on generated comments, with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = [r[k] for r in generate_pairs(60, 0) for k in ("draft", "final")]
    tk.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tok_dir(request, tmp_path_factory) -> Path:
    """The shared tiny model's tokenizer when tests/conftest.py provides it, else a local one."""
    try:
        return Path(request.getfixturevalue("tiny_model_dir"))
    except pytest.FixtureLookupError:
        return _build_chatml_tokenizer(tmp_path_factory.mktemp("chatml_tok"))


@pytest.fixture(scope="session")
def tokenizer(tok_dir):
    from recipes.data import load_tokenizer
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def rows():
    return generate_pairs(60, 5)  # 18 months, 3-4 rows a month


@pytest.fixture(scope="session")
def prepared(rows, tok_dir, tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("prep")
    write_rows(rows, d / "pairs.jsonl")
    stats = prepare(d / "pairs.jsonl", d / "out", tok_dir)
    return d / "out", stats


def _lines(path: Path) -> list[dict]:
    return read_prepared(path)


# ---------------------------------------------------------------------------------------------
# Output format, split and stats


def test_nemo_records(prepared, rows, tokenizer):
    out, _ = prepared
    header = render_prompt(tokenizer, [{"role": "user", "content": "x"}])
    header = header[header.index("x") + 1:]  # what the template adds after the last user turn
    assert header.strip(), header
    by_key = {(r["date"], r["section"], r["fund"]): r for r in rows}
    n = 0
    for split in SPLITS:
        for rec in _lines(out / f"{split}.jsonl"):
            n += 1
            assert set(rec) == {"input", "output", "id", "date", "section", "fund"}
            src = by_key[rec["date"], rec["section"], rec["fund"]]
            assert rec["input"].endswith(header)
            assert rec["input"] == render_prompt(tokenizer, build_messages(
                normalize_text(src["draft"]), src["section"], src["date"], src["fund"]))
            assert rec["output"] == src["final"]
    assert n == len(rows)
    raw = (out / "training.jsonl").read_text(encoding="utf-8")
    assert "市場動向" in raw and "\\u" not in raw  # ensure_ascii=False


def test_hf_records_match_nemo_records(prepared):
    out, _ = prepared
    for split in SPLITS:
        nemo, hf = _lines(out / f"{split}.jsonl"), _lines(out / "hf" / f"{split}.jsonl")
        assert [r["id"] for r in nemo] == [r["id"] for r in hf]
        for a, b in zip(nemo, hf):
            assert [m["role"] for m in b["prompt"]] == ["system", "user"]
            assert b["completion"] == [{"role": "assistant", "content": a["output"]}]
            assert (b["date"], b["section"], b["fund"]) == (a["date"], a["section"], a["fund"])


def test_split_by_time_has_no_leakage(prepared, rows):
    out, _ = prepared
    months = sorted({r["date"] for r in rows})
    cells = {s: {(r["fund"], r["date"]) for r in _lines(out / f"{s}.jsonl")} for s in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not cells[a] & cells[b], (a, b)
    assert {d for _, d in cells["test"]} == {months[-1]}
    assert {d for _, d in cells["validation"]} == {months[-2]}
    assert max(d for _, d in cells["training"]) < months[-2]


def test_more_test_and_validation_months(rows, tok_dir, tmp_path):
    write_rows(rows, tmp_path / "p.jsonl")
    stats = prepare(tmp_path / "p.jsonl", tmp_path / "out", tok_dir, test_months=2, val_months=3)
    months = sorted({r["date"] for r in rows})
    assert stats["months"]["test"] == months[-2:]
    assert stats["months"]["validation"] == months[-5:-2]
    assert stats["months"]["training"] == months[:-5]


def test_stats_agree_with_files(prepared, tokenizer, rows):
    out, stats = prepared
    assert json.loads((out / "stats.json").read_text(encoding="utf-8")) == json.loads(json.dumps(stats))
    assert stats["rows_read"] == len(rows) and stats["duplicates_dropped"] == 0
    assert stats["seq_length"] == 512 and stats["prompt_version"]
    for split in SPLITS:
        recs = _lines(out / f"{split}.jsonl")
        assert stats["rows"][split] == len(recs)
        assert stats["months"][split] == sorted({r["date"] for r in recs})
        pairs = [tokenize_pair(tokenizer, r["input"], r["output"], 512) for r in recs]
        assert stats["tokens"][split] == {"prompt": sum(p.prompt_tokens for p in pairs),
                                          "completion": sum(p.completion_tokens for p in pairs)}
        assert stats["truncated"][split] == sum(p.truncated for p in pairs)
        full = [tokenize_pair(tokenizer, r["input"], r["output"], 10**9) for r in recs]
        totals = sorted(p.prompt_tokens + p.completion_tokens for p in full)
        assert stats["lengths"][split]["tokens"]["max"] == totals[-1]
        assert stats["lengths"][split]["final_chars"]["max"] == max(len(r["output"]) for r in recs)
        assert totals[0] <= stats["lengths"][split]["tokens"]["p50"] <= totals[-1]
    assert sum(stats["rows"].values()) == len(rows)


def test_truncation_is_counted(rows, tok_dir, tokenizer, tmp_path):
    write_rows(rows, tmp_path / "p.jsonl")
    stats = prepare(tmp_path / "p.jsonl", tmp_path / "out", tok_dir, seq_length=64)
    recs = _lines(tmp_path / "out" / "training.jsonl")
    expected = sum(tokenize_pair(tokenizer, r["input"], r["output"], 64).truncated for r in recs)
    assert stats["truncated"]["training"] == expected == len(recs)  # every prompt is > 64 tokens
    assert stats["lengths"]["training"]["tokens"]["max"] > 64  # percentiles are untruncated


def test_csv_xlsx_jsonl_give_identical_outputs(rows, tok_dir, tmp_path):
    outs = {}
    for suffix in (".jsonl", ".csv", ".xlsx"):
        src = tmp_path / f"pairs{suffix}"
        write_rows(rows, src)
        outs[suffix] = tmp_path / f"out{suffix.replace('.', '_')}"
        prepare(src, outs[suffix], tok_dir)
    names = [f"{s}.jsonl" for s in SPLITS] + [f"hf/{s}.jsonl" for s in SPLITS]
    for name in names:
        ref = (outs[".jsonl"] / name).read_bytes()
        assert ref
        assert (outs[".csv"] / name).read_bytes() == ref, name
        assert (outs[".xlsx"] / name).read_bytes() == ref, name
    stats = {k: json.loads((v / "stats.json").read_text(encoding="utf-8")) for k, v in outs.items()}
    for s in stats.values():
        s.pop("input")
    assert stats[".csv"] == stats[".jsonl"] == stats[".xlsx"]


def test_csv_with_bom_other_columns_and_accepted_variants(tok_dir, tmp_path):
    rows = generate_pairs(30, 1)
    path = tmp_path / "excel.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:  # Excel's "CSV UTF-8" has a BOM
        w = csv.writer(fh)
        w.writerow(["Date", "Section", "fund", "draft", "final", "memo"])  # extra column, other case
        for r in rows:
            y, m = r["date"].split("-")
            section = {"市場動向": "【市場概況】", "運用状況": "運用経過", "今後の見通しと運用方針": "Outlook"}[r["section"]]
            w.writerow([f"{y}/{int(m)}/28", section, r["fund"], r["draft"], r["final"], "ignored"])
    recs = read_records(path)
    assert [(x.date, x.section, x.fund, x.final) for x in recs] == \
        [(r["date"], r["section"], r["fund"], r["final"]) for r in rows]


def test_duplicates_dropped(rows, tok_dir, tmp_path):
    # three rows again, each spelled differently but equal after normalisation
    with_digits = next(r for r in rows if any(c.isdigit() for c in r["final"]))
    with_newline = next(r for r in rows if "\n" in r["draft"])
    dup = [{**rows[0], "draft": "  " + rows[0]["draft"] + "\u200b "},
           {**with_digits, "final": with_digits["final"].translate({c: c + 0xFEE0 for c in range(48, 58)})},
           {**with_newline, "draft": with_newline["draft"].replace("\n", "\r\n"), "manager": "someone else"}]
    for d, r in zip(dup, (rows[0], with_digits, with_newline)):
        assert d != r
    write_rows(rows + dup, tmp_path / "p.jsonl")
    stats = prepare(tmp_path / "p.jsonl", tmp_path / "out", tok_dir)
    assert stats["duplicates_dropped"] == 3
    assert stats["rows_read"] == len(rows) + 3
    assert sum(len(_lines(tmp_path / "out" / f"{s}.jsonl")) for s in SPLITS) == len(rows)
    ids = [r["id"] for s in SPLITS for r in _lines(tmp_path / "out" / f"{s}.jsonl")]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------
# Validation errors: every problem named with file, row and field; nothing written


def _csv(path: Path, header: list[str], body: list[list[str]], encoding="utf-8") -> Path:
    with open(path, "w", encoding=encoding, newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(body)
    return path


GOOD = ["2024-01", "市場動向", "日本株式ファンド", "下書きです。", "最終稿です。"]
HDR = ["date", "section", "fund", "draft", "final"]


def _bad_inputs(tmp: Path):
    """(name, path, expected substrings) for each error class."""
    yield "missing column", _csv(tmp / "nocol.csv", HDR[:-1], [GOOD[:-1]]), ["nocol.csv:1:", "field 'final'", "missing column"]
    yield "empty text", _csv(tmp / "empty.csv", HDR, [GOOD, GOOD[:4] + ["  \u200b "]]), ["empty.csv:3:", "field 'final'", "empty text"]
    yield "bad date", _csv(tmp / "date.csv", HDR, [GOOD, ["2024-13"] + GOOD[1:]]), ["date.csv:3:", "field 'date'", "2024-13"]
    yield "unknown section", _csv(tmp / "sec.csv", HDR, [[GOOD[0], "雑感"] + GOOD[2:]]), ["sec.csv:2:", "field 'section'", "雑感"]
    yield "extra cells", _csv(tmp / "cells.csv", HDR, [GOOD + ["x"]]), ["cells.csv:2:", "6 cells"]
    yield "wrong encoding", _csv(tmp / "sjis.csv", HDR, [GOOD], encoding="cp932"), ["sjis.csv:2:", "wrong encoding", "UTF-8", "Shift-JIS"]
    (tmp / "empty_file.csv").write_bytes(b"")
    yield "empty file", tmp / "empty_file.csv", ["empty_file.csv:1:", "empty file"]
    (tmp / "empty_file.jsonl").write_text("\n\n", encoding="utf-8")
    yield "empty jsonl", tmp / "empty_file.jsonl", ["empty_file.jsonl:1:", "empty file"]
    good = json.dumps(dict(zip(HDR, GOOD)), ensure_ascii=False)
    (tmp / "bad.jsonl").write_text(good + "\n{\"date\": \"2024-01\",\n" + good + "\n", encoding="utf-8")
    yield "malformed json", tmp / "bad.jsonl", ["bad.jsonl:2:", "malformed JSON"]
    missing = {k: v for k, v in zip(HDR, GOOD) if k != "draft"}
    (tmp / "miss.jsonl").write_text(good + "\n" + good + "\n" + json.dumps(missing, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    yield "missing field", tmp / "miss.jsonl", ["miss.jsonl:3:", "field 'draft'", "missing"]
    (tmp / "list.jsonl").write_text(json.dumps({**dict(zip(HDR, GOOD)), "final": ["a"]}) + "\n", encoding="utf-8")
    yield "not text", tmp / "list.jsonl", ["list.jsonl:1:", "field 'final'", "expected text"]
    (tmp / "garbage.xlsx").write_bytes(b"not a zip file")
    yield "unreadable xlsx", tmp / "garbage.xlsx", ["garbage.xlsx", "cannot read as XLSX"]
    yield "no such file", tmp / "nothere.csv", ["nothere.csv", "no such file"]
    yield "unsupported type", tmp / "pairs.txt", ["pairs.txt", "unsupported file type"]
    yield "too few months", _csv(tmp / "months.csv", HDR, [GOOD, ["2024-02"] + GOOD[1:]]), ["months.csv", "2 distinct month", "need at least 3"]


CASES = ["missing column", "empty text", "bad date", "unknown section", "extra cells", "wrong encoding",
         "empty file", "empty jsonl", "malformed json", "missing field", "not text", "unreadable xlsx",
         "no such file", "unsupported type", "too few months"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_data_error_and_writes_nothing(case, tok_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    cases = {name: (path, expect) for name, path, expect in _bad_inputs(src)}
    assert sorted(cases) == sorted(CASES)
    path, expect = cases[case]
    out = tmp_path / "prepared"
    with pytest.raises(DataError) as ei:
        prepare(path, out, tok_dir)
    msg = str(ei.value)
    for part in expect:
        assert part in msg, (part, msg)
    assert isinstance(ei.value, ValueError)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no temp dir left behind


def test_all_errors_are_collected(tmp_path, tok_dir):
    bad = _csv(tmp_path / "many.csv", HDR, [GOOD, ["2024/13"] + GOOD[1:], GOOD[:1] + ["?"] + GOOD[2:],
                                             GOOD[:3] + [""] + GOOD[4:], GOOD])
    with pytest.raises(DataError) as ei:
        prepare(bad, tmp_path / "out", tok_dir)
    assert len(ei.value.errors) == 3
    assert [e.split(": field")[0] for e in ei.value.errors] == [f"{bad}:3", f"{bad}:4", f"{bad}:5"]


def test_xlsx_errors_use_sheet_row_numbers(tmp_path, tok_dir):
    rows = generate_pairs(30, 0)
    rows[4] = {**rows[4], "section": "その他"}
    write_rows(rows, tmp_path / "p.xlsx")
    with pytest.raises(DataError) as ei:
        prepare(tmp_path / "p.xlsx", tmp_path / "out", tok_dir)
    assert ei.value.errors == [f"{tmp_path / 'p.xlsx'}:6: field 'section': unknown section 'その他' "
                               "(expected 市場動向 / 運用状況 / 今後の見通しと運用方針 or a synonym listed in datasets/README.md)"]


def test_cli_exit_codes(rows, tok_dir, tmp_path, capsys):
    bad = _csv(tmp_path / "bad.csv", HDR, [["2024-13"] + GOOD[1:]])
    assert prepare_data.main(["--input", str(bad), "--output", str(tmp_path / "o1"), "--tokenizer", str(tok_dir)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv:2: field 'date'" in err and not (tmp_path / "o1").exists()
    write_rows(rows, tmp_path / "p.csv")
    args = ["--input", str(tmp_path / "p.csv"), "--output", str(tmp_path / "o2"), "--tokenizer", str(tok_dir)]
    assert prepare_data.main(args) == 0
    assert (tmp_path / "o2" / "training.jsonl").is_file()
    assert prepare_data.main(args) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert prepare_data.main(args + ["--overwrite"]) == 0


def test_output_directory_safety(rows, tok_dir, tmp_path):
    write_rows(rows, tmp_path / "p.jsonl")
    prepare(tmp_path / "p.jsonl", tmp_path / "out", tok_dir)
    before = (tmp_path / "out" / "training.jsonl").read_bytes()
    with pytest.raises(FileExistsError):
        prepare(tmp_path / "p.jsonl", tmp_path / "out", tok_dir)
    assert (tmp_path / "out" / "training.jsonl").read_bytes() == before
    # overwrite replaces a prepared dir in full (a stray file in it goes too)
    (tmp_path / "out" / "stray.txt").write_text("x")
    prepare(tmp_path / "p.jsonl", tmp_path / "out", tok_dir, overwrite=True)
    assert not (tmp_path / "out" / "stray.txt").exists()
    assert (tmp_path / "out" / "training.jsonl").read_bytes() == before
    # never into the input's own location, not even with overwrite
    with pytest.raises(ValueError, match="input"):
        prepare(tmp_path / "p.jsonl", tmp_path, tok_dir, overwrite=True)
    # a directory that is not a prepared dataset is not replaced
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        prepare(tmp_path / "p.jsonl", other, tok_dir, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    # an existing empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare(tmp_path / "p.jsonl", empty, tok_dir)
    assert (empty / "stats.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("value,month", [
    ("2024-06", "2024-06"), ("2024/6", "2024-06"), ("2024-06-28", "2024-06"), ("2024/06/30", "2024-06"),
    ("2024年6月", "2024-06"), ("２０２４－０６", "2024-06"), (" 2024-06 ", "2024-06"),
    ("202406", None), ("2024-13", None), ("2024-02-30", None), ("Jun 2024", None), ("", None), ("24-06", None),
])
def test_parse_month(value, month):
    assert parse_month(value) == month


def test_parse_month_xlsx_date_cell():
    import datetime as dt
    assert parse_month(dt.datetime(2024, 6, 28)) == "2024-06"


@pytest.mark.parametrize("heading,canonical", [
    ("市場動向", "市場動向"), ("【市場概況】", "市場動向"), ("■マーケットレビュー", "市場動向"), ("Market Review", "市場動向"),
    ("運用経過", "運用状況"), ("＜ポートフォリオの状況＞", "運用状況"), ("2. 運用状況", "運用状況"),
    ("Outlook & Strategy", "今後の見通しと運用方針"), ("今後の見通し", "今後の見通しと運用方針"),
    ("雑感", None), ("", None),
])
def test_section_synonyms(heading, canonical):
    assert canonical_section(heading) == canonical


def test_generated_headings_are_all_accepted_synonyms():
    from recipes.synth_data import HEADINGS
    for section, heads in HEADINGS.items():
        for h in heads:
            assert canonical_section(h) == section, h


def test_failure_while_writing_leaves_nothing_and_keeps_old_output(rows, tok_dir, tmp_path, monkeypatch):
    import recipes.data as data
    write_rows(rows, tmp_path / "p.jsonl")
    prepare(tmp_path / "p.jsonl", tmp_path / "out", tok_dir)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}

    calls = []
    real = data.tokenize_pairs

    def boom(*a, **k):  # the second split fails, after the first split's files were written
        calls.append(1)
        if len(calls) % 2 == 0:
            raise RuntimeError("disk full")
        return real(*a, **k)
    monkeypatch.setattr(data, "tokenize_pairs", boom)
    with pytest.raises(RuntimeError):
        prepare(tmp_path / "p.jsonl", tmp_path / "new", tok_dir)
    with pytest.raises(RuntimeError):
        prepare(tmp_path / "p.jsonl", tmp_path / "out", tok_dir, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.jsonl"]
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before


def test_missing_tokenizer_dir_writes_nothing(rows, tmp_path):
    write_rows(rows, tmp_path / "p.jsonl")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        prepare(tmp_path / "p.jsonl", tmp_path / "out", tmp_path / "no-model")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_set_fits_smollm2_at_seq_length_512(small_model_dir, tmp_path):
    """The demo comments are kept short enough for the CPU training runs (SmolLM2, seq 512):
    Japanese costs ~1.7 tokens a character with its English-centric tokenizer."""
    root = Path(__file__).resolve().parents[1]
    stats = prepare(root / "datasets" / "demo_pairs.jsonl", tmp_path / "out", small_model_dir, seq_length=512)
    assert sum(stats["truncated"].values()) == 0
    assert max(v["tokens"]["max"] for v in stats["lengths"].values()) <= 512


def _ensure_inputs_after(barrier, cfg, results):
    from recipes.inputs import ensure_inputs
    barrier.wait()
    try:
        ensure_inputs(cfg)
        results.put("ok")
    except Exception as e:  # reported to the test
        results.put(f"{type(e).__name__}: {e}")


def test_ranks_that_start_together_all_get_the_inputs(tmp_path):
    """torchrun starts every rank of ``recipes.finetune`` at once, each making sure the model and prepared data
    are there: when none is yet, one rank's output lands and the others use it instead of failing with
    FileExistsError (or ENOTEMPTY from the rename)."""
    import multiprocessing as mp
    from recipes.config import load_config
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "nemo_configs/tiny_lora.yaml",
                      [f"model.hf_path={tmp_path / 'model'}", "model.preset=tiny", f"data.dataset_dir={tmp_path / 'prepared'}",
                       f"data.source={root / 'datasets/demo_pairs.jsonl'}"])
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_ensure_inputs_after, args=(barrier, cfg, results)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    assert got == ["ok"] * 3
    assert read_prepared(tmp_path / "prepared" / "training.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "prepared"]  # no temp dirs left
