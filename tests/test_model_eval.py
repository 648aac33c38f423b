"""benchmarks.model_eval and the non-streaming side of benchmarks.openai_client.

Fast tests use tests/fault_server.py (a real HTTP server on 127.0.0.1 that answers with the draft
of each request, or misbehaves on cue); the slow ones use the real vLLM server of the
``openai_server`` fixture (SmolLM2-135M as ``base`` and with a LoRA as ``lora``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_server import FaultServer  # noqa: E402

from benchmarks.model_eval import (Example, ResultCache, diff_markup, evaluate,  # noqa: E402
                                   load_examples, main, parse_endpoint_spec, parse_local_spec,
                                   paired_bootstrap, request_key, score_models)
from benchmarks.openai_client import EndpointError, OpenAIClient, backoff_delay, normalize_base_url  # noqa: E402
from benchmarks.serve import free_port  # noqa: E402
from recipes.prompt import SYSTEM_PROMPT, build_messages  # noqa: E402
from recipes.textdiff import char_diff  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Short draft -> final pairs in the house style (です/ます, no headings), for files written per test.
PAIRS = [
    ("2024-05", "市場動向", "日本株式ファンド", "＜Market＞\n国内株式市場は上昇した。",
     "国内株式市場は上昇しました。"),
    ("2024-05", "運用状況", "日本株式ファンド", "2. 運用状況\n基準価額は前月末比で上昇した。",
     "基準価額は前月末比で上昇しました。"),
    ("2024-05", "今後の見通しと運用方針", "米国株式ファンド", "3. 今後の方針\n銘柄選択によって超過収益の獲得を目指す。",
     "銘柄選択によって超過収益の獲得を目指します。"),
    ("2024-06", "市場動向", "米国株式ファンド", "＜Market＞\n米国株式市場は下落した。",
     "米国株式市場は下落しました。"),
]


def write_hf(path: Path, pairs=PAIRS) -> Path:
    rows = []
    for i, (date, section, fund, draft, final) in enumerate(pairs):
        msgs = build_messages(draft, section, date, fund, final=final)
        rows.append({"prompt": msgs[:2], "completion": msgs[2:], "id": f"id{i}", "date": date, "section": section,
                     "fund": fund})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


MSGS = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "対象月: 2024-05\n\n下書き:\n上昇した。"}]


# ---------------------------------------------------------------------------------------------
# test data


def test_load_examples_reads_the_three_formats(tmp_path):
    hf = load_examples(write_hf(tmp_path / "hf.jsonl"))
    assert [e.id for e in hf] == ["id0", "id1", "id2", "id3"]
    assert hf[1].reference == "基準価額は前月末比で上昇しました。"
    assert hf[1].messages[0]["content"] == SYSTEM_PROMPT and hf[1].prompt is None
    assert hf[2].section == "今後の見通しと運用方針" and "銘柄選択" in hf[2].source

    nemo = tmp_path / "nemo.jsonl"
    nemo.write_text(json.dumps({"input": "<|im_start|>user\nX<|im_end|>\n<|im_start|>assistant\n", "output": "Y",
                                "id": "a", "section": "市場動向"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (n,) = load_examples(nemo)
    assert n.prompt.endswith("assistant\n") and n.messages is None and n.reference == "Y"

    raw = tmp_path / "raw.csv"
    raw.write_text("date,section,fund,draft,final\n" + "".join(f'{d},{s},{f},"{dr}",{fi}\n' for d, s, f, dr, fi in PAIRS),
                   encoding="utf-8")
    rows = load_examples(raw)
    assert len(rows) == 4
    # the same messages as the prepared hf/ rows: both come from recipes.prompt.build_messages
    assert [list(r.messages) for r in rows] == [list(h.messages) for h in hf]
    assert [r.reference for r in rows] == [h.reference for h in hf]


def test_load_examples_errors_name_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": MSGS, "completion": [{"role": "assistant", "content": "x"}], "id": "a"})
    bad.write_text(good + "\n" + json.dumps({"prompt": MSGS, "id": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'completion'"):
        load_examples(bad)
    bad.write_text(good + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="id 'a' appears twice"):
        load_examples(bad)
    bad.write_text(json.dumps({"text": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not a test item"):
        load_examples(bad)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl")


def test_parse_specs():
    s = parse_endpoint_spec("nim=http://h:8000/v1/,model=meta/llama,adapter=swallow-lora,api_key_env=NGC_KEY")
    assert (s.name, s.url, s.model, s.adapter, s.api_key_env) == ("nim", "http://h:8000/v1", "meta/llama",
                                                                   "swallow-lora", "NGC_KEY")
    assert parse_endpoint_spec("x=https://api.openai.com/v1/chat/completions").url == "https://api.openai.com/v1"
    for bad, msg in [("nim", "NAME=VALUE"), ("a b=http://h/v1", "name"), ("n=ftp://h", "http"),
                     ("n=http://h/v1,colour=red", "unknown key 'colour'"), ("n=http://h/v1,model", "key=value")]:
        with pytest.raises(ValueError, match=msg):
            parse_endpoint_spec(bad)
    with pytest.raises(ValueError, match="no config.json"):
        parse_local_spec("loc=/nonexistent")


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_survives_reopen_and_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    c = ResultCache(path)
    c.add({"key": "k1", "id": "a", "text": "一"})
    c.add({"key": "k2", "id": "b", "text": "二"})
    with path.open("ab") as fh:  # what a kill in the middle of a write leaves behind
        fh.write('{"key": "k3", "id": "c", "te'.encode())
    c2 = ResultCache(path)
    assert c2.torn and len(c2) == 2 and c2.get("k2")["text"] == "二" and "k3" not in c2
    c2.add({"key": "k3", "id": "c", "text": "三"})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["k1", "k2", "k3"]  # every line parses again
    assert not ResultCache(path).torn


def test_cache_concurrent_adds_write_whole_lines(tmp_path):
    c = ResultCache(tmp_path / "c.jsonl")
    threads = [threading.Thread(target=lambda i=i: [c.add({"key": f"{i}-{j}", "text": "あ" * 500}) for j in range(25)])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ResultCache(tmp_path / "c.jsonl")) == 100


def test_request_key_changes_with_anything_that_changes_the_answer():
    ex = Example(id="a", reference="r", messages=tuple(MSGS))
    t = {"url": "http://h/v1", "model": "m", "base": None}
    k = request_key(ex, t, 64)
    assert k == request_key(Example(id="a", reference="other ref", messages=tuple(MSGS)), t, 64)
    assert k != request_key(ex, t, 65)
    assert k != request_key(ex, {**t, "model": "m2"}, 64)
    assert k != request_key(ex, {**t, "url": "http://h2/v1"}, 64)
    assert k != request_key(Example(id="b", reference="r", messages=tuple(MSGS)), t, 64)


# ---------------------------------------------------------------------------------------------
# scoring and reports


def test_char_diff_rebuilds_both_texts_and_marks_japanese_edits():
    ref, hyp = "上昇しました。\n今後も注視します。", "上昇した。\n今後も注視します!"
    runs = char_diff(ref, hyp, merge_short=0, trim_ends=False)  # the diff examples.md shows (diff_markup)
    assert "".join(t for op, t in runs if op != "insert") == ref
    assert "".join(t for op, t in runs if op != "delete") == hyp
    assert ("delete", "しま") in runs and "上昇<del>しま</del>した。" in diff_markup(ref, hyp)
    m = diff_markup("a<b>", "a<c>")
    assert "<del>b</del><ins>c</ins>" in m and "&lt;" in m and "\n" not in diff_markup(ref, hyp)


def test_score_models_bleu_and_paired_bootstrap():
    refs = [f"{a}は前月末比で{b}しました。" for a in ("国内株式", "米国株式", "基準価額", "為替") for b in ("上昇", "下落", "横ばい")]
    exs = [Example(id=str(i), reference=r, section="市場動向" if i % 2 else "運用状況") for i, r in enumerate(refs)]
    good = list(refs)
    bad = [r.replace("しました", "した").replace("前月末比で", "") for r in refs]
    out = score_models({"bad": bad, "good": good}, exs, bootstrap=200)
    assert out["baseline"] == "bad" and out["ranking"] == ["good", "bad"]
    g, b = out["models"]["good"], out["models"]["bad"]
    assert g["score"] == pytest.approx(100.0) and b["score"] < 60
    assert set(g["per_section"]) == {"市場動向", "運用状況"}
    assert g["significance"]["BLEU"]["p_value"] < 0.05  # a 40+ point gap over 12 segments is real
    assert b["significance"]["BLEU"]["p_value"] is None  # the baseline has no p-value
    assert g["delta_vs_baseline"] == pytest.approx(g["score"] - b["score"])
    # two near-identical systems: no significant difference
    near = list(bad)
    near[0] = refs[0]
    sig = paired_bootstrap([("bad", bad), ("near", near)], refs, n_samples=200)
    assert sig["near"]["BLEU"]["p_value"] > 0.05
    assert sig["bad"]["BLEU"]["ci_low"] <= b["score"] <= sig["bad"]["BLEU"]["ci_high"]


# ---------------------------------------------------------------------------------------------
# client error paths (fault server)


def test_client_retries_5xx_then_succeeds():
    with FaultServer(script=["500", "503", "ok"]) as fs:
        c = OpenAIClient(fs.base_url, name="flaky", retries=3, backoff=0.01)
        r = c.chat(MSGS, "fake", max_tokens=50)
        assert r.text == "上昇した。" and r.attempts == 3
        assert c.stats.to_dict() == {"requests": 3, "retries": 2, "failures": 0}
        assert len(fs.posts) == 3 and fs.posts[0]["temperature"] == 0.0


def test_client_server_down_gives_a_clear_error_after_retries():
    port = free_port()  # nothing listens there
    c = OpenAIClient(f"http://127.0.0.1:{port}/v1", name="nim-down", retries=2, backoff=0.01)
    with pytest.raises(EndpointError, match=r"^nim-down: .*ConnectError.*gave up after 3 attempts") as e:
        c.chat(MSGS, "m", max_tokens=5)
    assert e.value.attempts == 3 and c.stats.retries == 2


def test_client_timeout_is_retried_then_reported():
    with FaultServer(default="hang", hang_s=5) as fs:
        c = OpenAIClient(fs.base_url, name="slow", retries=1, backoff=0.01, timeout=0.3)
        t0 = time.perf_counter()
        with pytest.raises(EndpointError, match=r"^slow: .*timed out after 0.3 s.*2 attempts"):
            c.chat(MSGS, "fake", max_tokens=5)
        assert time.perf_counter() - t0 < 3
        assert len(fs.posts) == 2


def test_client_total_deadline_catches_a_trickling_stream():
    # every chunk arrives well within the read timeout, the whole answer does not
    with FaultServer(chunk_delay=0.15, chunk_chars=1) as fs:
        c = OpenAIClient(fs.base_url, name="trickle", retries=0, timeout=0.5)
        with pytest.raises(EndpointError, match="timed out after 0.5 s mid-answer"):
            c.stream_chat([{"role": "user", "content": "下書き:\n" + "あ" * 20}], "fake", max_tokens=50)


def test_client_malformed_json_and_4xx_are_not_retried():
    with FaultServer(script=["badjson", "400", "close", "close"]) as fs:
        c = OpenAIClient(fs.base_url, name="broken", retries=3, backoff=0.01)
        with pytest.raises(EndpointError, match=r"^broken: POST /chat/completions .*not valid JSON"):
            c.chat(MSGS, "fake", max_tokens=5)
        with pytest.raises(EndpointError, match=r"^broken: .*HTTP 400: injected HTTP 400") as e:
            c.chat(MSGS, "fake", max_tokens=5)
        assert e.value.status == 400
        assert len(fs.posts) == 2  # one each: nothing retried
        # a dropped connection is retried
        assert c.chat(MSGS, "fake", max_tokens=5).attempts == 3


def test_client_api_key_from_env_is_sent_and_never_shown(monkeypatch):
    monkeypatch.setenv("FAKE_KEY_FOR_TEST", "sk-secret-123")
    seen = {}
    with FaultServer(script=["400"]) as fs:
        c = OpenAIClient(fs.base_url, name="keyed", api_key_env="FAKE_KEY_FOR_TEST", retries=0)
        orig = c._http.send

        def spy(request, **kw):
            seen["auth"] = request.headers.get("authorization")
            return orig(request, **kw)
        c._http.send = spy
        with pytest.raises(EndpointError) as e:
            c.chat(MSGS, "fake", max_tokens=5)
    assert seen["auth"] == "Bearer sk-secret-123"
    assert "sk-secret" not in str(e.value) and "sk-secret" not in repr(c)
    monkeypatch.delenv("FAKE_KEY_FOR_TEST")
    with pytest.raises(ValueError, match="FAKE_KEY_FOR_TEST"):
        OpenAIClient("http://127.0.0.1:1/v1", api_key_env="FAKE_KEY_FOR_TEST")


def test_backoff_grows_exponentially_and_is_capped():
    mid = lambda: 0.5  # noqa: E731 - no jitter
    assert [backoff_delay(a, 0.5, 30, rng=mid) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(10, 0.5, 30, rng=mid) == 30
    assert backoff_delay(0, 0.5, 30, retry_after=7, rng=mid) == 7
    assert 0.375 <= backoff_delay(0, 0.5, 30) <= 0.625
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"


# ---------------------------------------------------------------------------------------------
# model_eval end to end against the fault server


def test_evaluate_end_to_end_and_resume(tmp_path):
    data = write_hf(tmp_path / "test.jsonl")
    out = tmp_path / "eval"
    with FaultServer(models=("echo", "echo-lora")) as fs:
        eps = [parse_endpoint_spec(f"echo={fs.base_url},model=echo"),
               parse_endpoint_spec(f"lora={fs.base_url},model=echo,adapter=echo-lora")]
        r = evaluate(data, out, eps, max_tokens=200, concurrency=2, bootstrap=100, progress=False)
        assert len(fs.posts) == 8
        assert {p["model"] for p in fs.posts} == {"echo", "echo-lora"}
        # the fault server answers with the draft: the score is the draft's BLEU against the final
        assert 0 < r["models"]["echo"]["bleu"]["score"] < 100
        assert r["models"]["echo"]["run"]["generated"] == 4 and r["models"]["echo"]["run"]["cached"] == 0
        assert r["models"]["lora"]["bleu"]["significance"]["BLEU"]["p_value"] is not None
        for f in ("results.md", "results.json", "bleu.png", "examples.md", "predictions/echo.jsonl",
                  "cache/echo.jsonl", "cache/lora.jsonl"):
            assert (out / f).is_file(), f
        assert (out / "bleu.png").read_bytes()[:4] == b"\x89PNG"
        md = (out / "results.md").read_text(encoding="utf-8")
        assert "| echo |" in md and "p-value" in md and "tok:ja-mecab" in md
        assert "<del>" in (out / "examples.md").read_text(encoding="utf-8")
        # rerun: everything cached, no generation request sent
        r2 = evaluate(data, out, eps, max_tokens=200, concurrency=2, bootstrap=100, progress=False)
        assert len(fs.posts) == 8
        assert r2["models"]["echo"]["run"]["cached"] == 4 and r2["models"]["echo"]["run"]["generated"] == 0
        assert r2["models"]["echo"]["bleu"]["score"] == r["models"]["echo"]["bleu"]["score"]
        # another max_tokens is another request: regenerated, not mixed with the old answers
        evaluate(data, out, eps[:1], max_tokens=3, bootstrap=0, progress=False)
        assert len(fs.posts) == 12


def test_evaluate_refuses_foreign_output_dir_and_unknown_model(tmp_path):
    data = write_hf(tmp_path / "test.jsonl")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with FaultServer() as fs:
        with pytest.raises(FileExistsError, match="not a model_eval output"):
            evaluate(data, tmp_path / "other", [parse_endpoint_spec(f"a={fs.base_url}")], progress=False)
        with pytest.raises(EndpointError, match="adapter 'nope' is not served here"):
            evaluate(data, tmp_path / "o", [parse_endpoint_spec(f"a={fs.base_url},adapter=nope")], progress=False)


def test_evaluate_stops_an_endpoint_on_failure_keeps_finished_items(tmp_path, capsys):
    data = write_hf(tmp_path / "test.jsonl")
    out = tmp_path / "eval"
    # items 1-2 succeed, then the server fails for good (3 attempts each)
    with FaultServer(script=["ok", "ok", "500", "500", "500"], default="ok") as fs:
        argv = ["--data", str(data), "--endpoint", f"flaky={fs.base_url}", "--output", str(out), "--concurrency", "1",
                "--retries", "2", "--backoff", "0.01", "--no-progress"]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "flaky: POST /chat/completions" in err and "HTTP 500" in err and "rerun the same command" in err
        assert len(ResultCache(out / "cache" / "flaky.jsonl")) == 2
        assert not (out / "results.md").exists()
        assert main(argv) == 0  # the server recovered: resume
        assert "resuming: 2 of 4 items already generated" in capsys.readouterr().err
        assert len(fs.posts) == 5 + 2


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_killed_evaluation_resumes_without_repeating_items(tmp_path, sig):
    """kill -9 / Ctrl-C mid-run (fault server, 0.3 s per answer), then rerun: finished items are not
    re-requested, and nothing half-done is counted as finished."""
    data = write_hf(tmp_path / "test.jsonl", PAIRS * 1 + [(d, s, f, dr + "。", fi) for d, s, f, dr, fi in PAIRS])
    out = tmp_path / "eval"
    with FaultServer(delay=0.3) as fs:
        cmd = [sys.executable, "-m", "benchmarks.model_eval", "--data", str(data), "--endpoint",
               f"m={fs.base_url}", "--output", str(out), "--concurrency", "1", "--no-progress", "--bootstrap", "0"]
        before = _run_and_kill(cmd, out / "cache" / "m.jsonl", min_lines=2, sig=sig)
        assert 2 <= before < 8
        posts_before = len(fs.posts)
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"resuming: {before} of 8 items already generated" in done.stderr
        result = json.loads((out / "results.json").read_text(encoding="utf-8"))
        assert result["models"]["m"]["run"]["cached"] == before
        assert result["models"]["m"]["run"]["generated"] == 8 - before
        assert len(fs.posts) - posts_before == 8 - before  # only the unfinished ones were requested
        ids = [json.loads(x)["id"] for x in (out / "cache" / "m.jsonl").read_text(encoding="utf-8").splitlines()]
        assert sorted(ids) == sorted(set(ids)) and len(ids) == 8


def _run_and_kill(cmd: list[str], cache: Path, min_lines: int, timeout: float = 120,
                  sig: int = signal.SIGKILL) -> int:
    """Start ``cmd``, send it ``sig`` once ``cache`` has ``min_lines`` lines; return the lines after it exited."""
    # SIGINT back to its default first: a shell that starts a job in the background (CI runners do)
    # hands it down ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if cache.exists() and cache.read_bytes().count(b"\n") >= min_lines:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"finished or died before it could be killed: {proc.stderr.read()}"
        os.kill(proc.pid, sig)
        rc = proc.wait(30)
        if sig == signal.SIGINT:  # Ctrl-C: the request in flight finishes and is cached, then a clean exit
            assert rc == 130 and "rerun the same command to resume" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return cache.read_bytes().count(b"\n")


# ---------------------------------------------------------------------------------------------
# against the real server


@pytest.mark.slow
def test_real_server_base_vs_lora(openai_server, tmp_path):
    data = write_hf(tmp_path / "test.jsonl")
    out = tmp_path / "eval"
    base = parse_endpoint_spec(f"base={openai_server.base_url},model={openai_server.base_model}")
    lora = parse_endpoint_spec(f"lora={openai_server.base_url},model={openai_server.base_model},"
                               f"adapter={openai_server.lora_model}")
    r = evaluate(data, out, [base, lora], max_tokens=24, concurrency=2, bootstrap=200, progress=False)
    for name in ("base", "lora"):
        m = r["models"][name]
        assert m["run"]["generated"] == 4 and m["run"]["failures"] == 0
        assert m["bleu"]["n_segments"] == 4 and 0.0 <= m["bleu"]["score"] <= 100.0
        assert m["bleu"]["signature"].startswith("nrefs:1") and "ja-mecab" in m["bleu"]["signature"]
    preds = {n: [json.loads(x)["prediction"] for x in (out / "predictions" / f"{n}.jsonl").read_text().splitlines()]
             for n in ("base", "lora")}
    assert all(p.strip() for p in preds["base"])  # the model said something
    assert preds["base"] != preds["lora"]  # the adapter changes the answers: the server applied it
    assert r["models"]["lora"]["bleu"]["significance"]["BLEU"]["p_value"] is not None
    for f in ("results.md", "bleu.png", "examples.md"):
        assert (out / f).stat().st_size > 0
    # The NeMo-format file (prompt rendered here with recipes.prompt.render_prompt, sent to /completions)
    # must ask the model exactly what the chat route asks after the server applies the template:
    # same greedy answers.
    from transformers import AutoTokenizer

    from recipes.prompt import render_prompt

    tok = AutoTokenizer.from_pretrained(openai_server.model_dir)
    nemo = tmp_path / "nemo.jsonl"
    nemo.write_text("".join(json.dumps({"input": render_prompt(tok, list(e.messages)), "output": e.reference,
                                        "id": e.id, "section": e.section}, ensure_ascii=False) + "\n"
                            for e in load_examples(data)), encoding="utf-8")
    evaluate(nemo, tmp_path / "nemo_eval", [base], max_tokens=24, bootstrap=0, progress=False)
    rendered = [json.loads(x)["prediction"] for x in (tmp_path / "nemo_eval" / "predictions" / "base.jsonl")
                .read_text().splitlines()]
    assert rendered == preds["base"]


@pytest.mark.slow
def test_real_server_killed_evaluation_resumes(openai_server, tmp_path):
    data = write_hf(tmp_path / "test.jsonl")
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "benchmarks.model_eval", "--data", str(data), "--endpoint",
           f"lora={openai_server.base_url},adapter={openai_server.lora_model}", "--output", str(out),
           "--concurrency", "1", "--max-tokens", "32", "--no-progress", "--bootstrap", "0"]
    before = _run_and_kill(cmd, out / "cache" / "lora.jsonl", min_lines=1)
    assert 1 <= before < 4
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = json.loads((out / "results.json").read_text(encoding="utf-8"))["models"]["lora"]["run"]
    assert run["cached"] == before and run["generated"] == 4 - before
    assert run["requests_sent"] == 1 + (4 - before)  # GET /models + only the unfinished items
    lines = (out / "cache" / "lora.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and len({json.loads(x)["id"] for x in lines}) == 4


def test_local_generation_beside_an_endpoint(tiny_model_dir, tmp_path):
    """--local runs recipes.generate in-process, is cached like an endpoint, and is scored in the same table."""
    from recipes.generate import generate_texts, load_model
    from recipes.prompt import render_prompt

    data = write_hf(tmp_path / "test.jsonl")
    out = tmp_path / "eval"
    local = parse_local_spec(f"tiny={tiny_model_dir}")
    with FaultServer() as fs:
        r = evaluate(data, out, [parse_endpoint_spec(f"echo={fs.base_url}")], [local], max_tokens=6, bootstrap=50,
                     progress=False)
    assert r["models"]["tiny"]["run"]["generated"] == 4 and r["models"]["tiny"]["kind"] == "local"
    preds = [json.loads(x)["prediction"] for x in (out / "predictions" / "tiny.jsonl").read_text().splitlines()]
    model, tok = load_model(tiny_model_dir)
    exs = load_examples(data)
    assert preds == generate_texts(model, tok, [render_prompt(tok, list(e.messages)) for e in exs],
                                   max_new_tokens=6, progress=False)
    r2 = evaluate(data, out, [], [local], max_tokens=6, bootstrap=0, progress=False)
    assert r2["models"]["tiny"]["run"]["cached"] == 4 and r2["models"]["tiny"]["run"]["generated"] == 0


# ---------------------------------------------------------------------------------------------
# fact fidelity and house style beside BLEU


def _synth_examples(n: int = 30, seed: int = 11) -> list[Example]:
    from recipes.synth_data import generate_pairs

    return [Example(id=f"s{i}", reference=p["final"], section=p["section"], date=p["date"], fund=p["fund"],
                    messages=tuple(build_messages(p["draft"], p["section"], p["date"], p["fund"])), draft=p["draft"])
            for i, p in enumerate(generate_pairs(n, seed))]


def test_copying_the_draft_does_not_look_perfect():
    """A model that copies the draft keeps every fact (fidelity 1.0) but breaks the house style the drafts
    break; the reference finals are high on both. Reporting both is what keeps the copy from ranking first."""
    from benchmarks.model_eval import score_rates

    exs = _synth_examples()
    preds = {"copy": [ex.draft for ex in exs], "finals": [ex.reference for ex in exs],
             "tampered": [ex.reference.replace("%", "1%", 1) for ex in exs]}  # -2.1% -> -2.11%
    rates, checks = score_rates(preds, exs, baseline="copy", bootstrap=300)
    copy, finals, tampered = (rates["models"][n]["rates"] for n in ("copy", "finals", "tampered"))
    assert copy["fact_recall"] == copy["fact_precision"] == copy["faithful_share"] == 1.0
    assert copy["style_compliance"] < 0.2
    assert min(finals.values()) >= 0.9 and finals["style_compliance"] == 1.0
    assert rates["drafts_copied"]["rates"] == copy and rates["reference_finals"]["rates"] == finals
    assert rates["fidelity_available"] and "parse_user_message" in rates["drafts"] and rates["bootstrap"]["applies"]
    # paired bootstrap vs the copy: style is a real gain, fact recall no difference at all
    sig = rates["models"]["finals"]["significance"]
    assert sig["style_compliance"]["delta"] > 0.7 and sig["style_compliance"]["ci_low"] > 0.5
    assert sig["style_compliance"]["p_value"] < 0.05 and sig["style_compliance"]["samples"] == 300
    assert sig["fact_recall"]["delta"] == 0.0 and sig["fact_recall"]["p_value"] == 1.0
    assert rates["models"]["copy"]["significance"] is None  # the baseline
    # changing numbers costs fidelity, not style: findings name the changed values
    t = rates["models"]["tampered"]
    assert tampered["fact_recall"] < 0.8 and tampered["style_compliance"] == 1.0
    assert t["fidelity"]["findings"]["value_changed"] > 0
    assert t["significance"]["faithful_share"]["delta"] < 0 and t["significance"]["faithful_share"]["p_value"] < 0.05
    # same seed and resamples: the same answer again
    assert score_rates(preds, exs, baseline="copy", bootstrap=300)[0] == rates


def test_rates_without_drafts_or_a_baseline_say_what_does_not_apply():
    from benchmarks.model_eval import results_markdown, score_rates

    exs = [Example(id=str(i), reference="上昇しました。", prompt="rendered without a known marker") for i in range(3)]
    rates, checks = score_rates({"m": ["上昇した。", "上昇しました。", ""]}, exs, bootstrap=100)
    assert not rates["fidelity_available"] and "no recoverable draft" in rates["note"]
    assert rates["models"]["m"]["fidelity"] is None and rates["drafts_copied"] is None
    assert rates["models"]["m"]["rates"]["style_compliance"] == pytest.approx(2 / 3)
    assert rates["models"]["m"]["rates"]["fact_recall"] is None
    assert rates["bootstrap"] == {"applies": False, "reason": "one model: no baseline to test against"}
    scores = score_models({"m": ["上昇した。", "上昇しました。", "x"]}, exs, bootstrap=0)
    md = results_markdown(scores, {"m": {"url": "u", "kind": "endpoint"}},
                          {"m": {"cached": 0, "generated": 3, "elapsed_s": 0.0}},
                          {"data": "d", "n_examples": 3, "max_tokens": 8}, rates)
    assert "fact fidelity not available" in md and "does not apply (one model" in md
    two, _ = score_rates({"a": ["x"] * 3, "b": ["上昇しました。"] * 3}, exs, bootstrap=50)
    assert two["models"]["b"]["significance"]["fact_recall"] == {"note": "not available: no drafts to check the "
                                                                         "facts against"}
    assert two["models"]["b"]["significance"]["style_compliance"]["delta"] == 1.0


def test_load_examples_recovers_the_draft_of_each_format(tmp_path):
    hf = load_examples(write_hf(tmp_path / "hf.jsonl"))
    assert [e.draft for e in hf] == [p[3] for p in PAIRS]
    nemo = tmp_path / "nemo.jsonl"
    rendered = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    nemo.write_text("".join(json.dumps({"input": rendered.format(e.source), "output": e.reference, "id": e.id},
                                       ensure_ascii=False) + "\n" for e in hf), encoding="utf-8")
    assert [e.draft for e in load_examples(nemo)] == [e.draft for e in hf]


def test_evaluate_reports_fidelity_and_style_beside_bleu(tmp_path):
    exs = _synth_examples(12, seed=5)
    pairs = [(e.date, e.section, e.fund, e.draft, e.reference) for e in exs]
    data = write_hf(tmp_path / "test.jsonl", pairs)
    out = tmp_path / "eval"
    with FaultServer(models=("echo", "echo-lora")) as fs:  # answers with the draft: the copying model
        eps = [parse_endpoint_spec(f"echo={fs.base_url},model=echo"),
               parse_endpoint_spec(f"lora={fs.base_url},model=echo,adapter=echo-lora")]
        r = evaluate(data, out, eps, max_tokens=400, concurrency=2, bootstrap=100, progress=False)
    m = r["models"]["lora"]
    assert m["bleu"]["significance"]["BLEU"]["p_value"] is not None  # BLEU fields as before
    assert m["fidelity"]["fact_recall"] == 1.0 and m["fidelity"]["pairs"] == 12
    assert m["rates"]["style_compliance"] < 0.5 and m["style"]["n"] == 12 and sum(m["style"]["by_rule"].values()) > 0
    assert set(m["rates_significance"]) == {"fact_recall", "fact_precision", "faithful_share", "style_compliance"}
    assert m["rates_significance"]["style_compliance"]["p_value"] == 1.0  # the same answers as the baseline
    assert r["models"]["echo"]["rates_significance"] is None
    assert r["rates"]["reference_finals"]["rates"]["style_compliance"] == 1.0
    assert r["rates"]["bootstrap"]["n_samples"] == 100 and r["rates"]["bootstrap"]["seed"] == 12345
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| fact recall | fact precision | no finding | style compliance |" in md
    assert "## Fact fidelity and house style" in md and "*reference finals*" in md and "*drafts copied*" in md
    assert "Δ style compliance" in md and "(baseline)" in md
    ex_md = (out / "examples.md").read_text(encoding="utf-8")
    assert "- fact check: no finding" in ex_md and "- house style:" in ex_md
    row = json.loads((out / "predictions" / "lora.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert row["draft"] == exs[0].draft and row["fidelity"]["faithful"] and isinstance(row["style_violations"], list)
    # benchmarks.bleu reads the drafts back from the predictions file
    from benchmarks import bleu
    assert bleu.resolve_drafts(12, out / "predictions" / "lora.jsonl", out / "predictions" / "lora.jsonl")[0] == \
        [e.draft for e in exs]


def test_examples_md_lists_each_finding_with_its_spans(tmp_path):
    from benchmarks.bleu import check_comments
    from benchmarks.model_eval import write_examples_md

    ex = Example(id="a", reference="TOPIXは前月末比-2.1%となりました。", messages=tuple(MSGS),
                 draft="TOPIXは対前月で２．１％下落した。")
    pred = "TOPIXは前月末比-2.3%となりました。"
    write_examples_md(tmp_path / "ex.md", [ex], {"m": [pred]}, -1,
                      checks={"m": check_comments([pred], [ex.draft])})
    md = (tmp_path / "ex.md").read_text(encoding="utf-8")
    assert "- fact check: 1 finding(s), 1 of 2 draft facts kept" in md
    start = ex.draft.index("２．１％")
    assert "<code>value_changed</code> value changed: -2.1% (mom) in the draft, -2.3% (mom) in the rewrite" in md
    assert f"draft [{start}, " in md and f"prediction [{pred.index('-2.3%')}, " in md
    assert "- house style: no violation" in md
