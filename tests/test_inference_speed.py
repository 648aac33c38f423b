"""benchmarks.inference_speed and the streaming side of benchmarks.openai_client.

Fast tests: percentile maths, level summaries, token counting, and streams from
tests/fault_server.py (well-formed, malformed, truncated). Slow: the real vLLM server of the
``openai_server`` fixture at concurrency 1 and 2 with the server's usage token counts.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_server import FaultServer  # noqa: E402

from benchmarks.inference_speed import (RequestRecord, count_tokens, distribution, main, make_targets,  # noqa: E402
                                        parse_levels, ratios, run_benchmark, summarize_level)
from benchmarks.openai_client import EndpointError, OpenAIClient, StreamResult  # noqa: E402
from benchmarks.serve import free_port  # noqa: E402
from recipes.prompt import build_messages  # noqa: E402

DRAFT = "国内株式市場は、金融政策をめぐる不透明感から、当面は値動きの大きい展開が続くと予想する。"


def write_prompts(path: Path, n: int = 3) -> Path:
    rows = []
    for i in range(n):
        msgs = build_messages(DRAFT[: 20 + 5 * i], "今後の見通しと運用方針", "2024-05", "日本株式ファンド", final="x")
        rows.append({"prompt": msgs[:2], "completion": msgs[2:], "id": f"p{i}", "section": "今後の見通しと運用方針"})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# maths


def test_distribution_percentiles_are_numpy_linear():
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101):
        xs = [rng.uniform(0, 5) for _ in range(n)]
        d = distribution(xs)
        assert [d[f"p{q}"] for q in (50, 90, 99)] == pytest.approx([float(np.percentile(xs, q)) for q in (50, 90, 99)],
                                                                    rel=1e-12, abs=1e-12)
        assert all(type(d[f"p{q}"]) is float for q in (50, 90, 99))  # plain floats for results.json
    assert distribution([]) == {"mean": None, "n": 0, "p50": None, "p90": None, "p99": None}
    assert distribution([3.0, 1.0, 2.0, 4.0])["p50"] == 2.5  # interpolated, and the input need not be sorted
    d = distribution([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (d["mean"], d["p50"], d["p90"], d["n"]) == (3.0, 3.0, pytest.approx(4.6), 5)


def _rec(i, tokens, e2e, ttft, itl, ok=True, conc=2):
    return RequestRecord(endpoint="e", concurrency=conc, index=i, ok=ok, start_s=0.0, e2e_s=e2e, ttft_s=ttft,
                         itl_s=itl, output_tokens=tokens if ok else None, token_source="usage" if ok else None,
                         token_chunks=len(itl) + 1 if ok else None, error=None if ok else "boom")


def test_summarize_level_by_hand():
    recs = [_rec(0, 11, 2.0, 0.5, [0.1] * 10), _rec(1, 21, 3.0, 1.0, [0.1] * 10 + [0.2] * 10),
            _rec(2, None, 0.1, None, [], ok=False)]
    s = summarize_level(recs, wall_s=4.0)
    assert (s["requests"], s["ok"], s["errors"], s["output_tokens"]) == (3, 2, 1, 32)
    assert s["aggregate_tok_per_s"] == 8.0  # 32 tokens / 4 s wall
    assert s["request_tok_per_s"]["mean"] == pytest.approx((11 / 2.0 + 21 / 3.0) / 2)
    assert s["decode_tok_per_s"]["mean"] == pytest.approx((10 / 1.5 + 20 / 2.0) / 2)
    assert s["ttft_s"]["p50"] == pytest.approx(0.75)
    assert s["itl_s"]["n"] == 30 and s["itl_s"]["p50"] == pytest.approx(0.1) and s["itl_s"]["p99"] == pytest.approx(0.2)
    assert s["e2e_s"]["p90"] == pytest.approx(2.9)
    assert s["tokens_per_chunk"] == pytest.approx(32 / 32)
    assert s["token_source"] == "usage" and s["errors_sample"] == ["boom"]


def test_ratios_against_the_first_endpoint():
    a = summarize_level([_rec(0, 10, 1.0, 0.1, [0.1] * 9)], 1.0)
    b = summarize_level([_rec(0, 10, 2.0, 0.2, [0.2] * 9)], 2.0)
    r = ratios({"nim": {1: a}, "vllm": {1: b}}, "nim")
    assert list(r) == ["vllm"]
    assert r["vllm"][1]["request_tok_per_s_mean"] == pytest.approx(0.5)
    assert r["vllm"][1]["aggregate_tok_per_s"] == pytest.approx(0.5)
    assert r["vllm"][1]["e2e_s_p50"] == pytest.approx(2.0) and r["vllm"][1]["itl_s_p50"] == pytest.approx(2.0)


def test_count_tokens_sources(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    res = StreamResult(text="上昇しました", ttft_s=0.1, chunk_times=[0.1, 0.2, 0.3], e2e_s=0.3,
                       usage={"completion_tokens": 7}, finish_reason="stop", attempts=1)
    assert count_tokens(res) == (7, "usage")
    n, src = count_tokens(res, tok, prefer="tokenizer")
    assert src == "tokenizer" and n == len(tok("上昇しました", add_special_tokens=False)["input_ids"]) and n > 0
    res.usage = None
    assert count_tokens(res, tok)[1] == "tokenizer"
    assert count_tokens(res) == (3, "chunks")
    with pytest.raises(ValueError, match="not available"):
        count_tokens(res, prefer="usage")


def test_parse_levels_and_targets():
    assert parse_levels("1,4,16") == [1, 4, 16]
    for bad in ("", "1,x", "0,2", "2,2"):
        with pytest.raises(ValueError, match="--concurrency"):
            parse_levels(bad)
    t = make_targets(["http://a:1/v1", "http://b:2/v1/"], ["m"])
    assert [x.label for x in t] == ["m@a:1", "m@b:2"] and t[1].url == "http://b:2/v1"
    with pytest.raises(ValueError, match="one --model per --endpoint"):
        make_targets(["http://a:1/v1", "http://b:2/v1", "http://c:3/v1"], ["m", "n"])
    with pytest.raises(ValueError, match="unique"):
        make_targets(["http://a:1/v1", "http://a:1/v1"], ["m"])


# ---------------------------------------------------------------------------------------------
# streams from the fault server


def test_stream_timings_and_usage():
    msgs = [{"role": "user", "content": "下書き:\nあいうえおかきくけこ"}]
    with FaultServer(chunk_delay=0.02, chunk_chars=3) as fs:
        c = OpenAIClient(fs.base_url, name="fs", retries=0)
        r = c.stream_chat(msgs, "fake", max_tokens=50)
        assert r.text == "あいうえおかきくけこ" and r.finish_reason == "stop"
        assert len(r.chunk_times) == 4  # 10 chars in 3-char chunks; the role-only opening chunk is not a token
        assert r.usage["completion_tokens"] == 10
        assert 0 < r.ttft_s == r.chunk_times[0] <= r.e2e_s
        assert all(g >= 0.015 for g in r.inter_chunk_s) and len(r.inter_chunk_s) == 3
        assert fs.posts[0]["stream_options"] == {"include_usage": True} and fs.posts[0]["temperature"] == 0.0
        p = c.stream_complete("プロンプト", "fake", max_tokens=4)
        assert p.text == "プロンプ" and fs.posts[1]["prompt"] == "プロンプト"


@pytest.mark.parametrize("fault, message", [
    ("badsse", r"^fs: POST /chat/completions stream .*malformed event in the stream \(not JSON\)"),
    ("garbage", r"^fs: .*malformed event stream: not a server-sent event line"),
    ("truncated", r"^fs: .*stream ended without \[DONE\] or a finish_reason"),
    ("notsse", r"^fs: .*expected a text/event-stream answer"),
    ("400", r"^fs: .*HTTP 400"),
])
def test_malformed_streams_name_the_endpoint(fault, message):
    with FaultServer(script=[fault]) as fs:
        c = OpenAIClient(fs.base_url, name="fs", retries=2, backoff=0.01)
        with pytest.raises(EndpointError, match=message):
            c.stream_chat([{"role": "user", "content": "x"}], "fake", max_tokens=5)
        assert len(fs.posts) == 1  # protocol errors are not retried


def test_stream_retries_5xx_before_the_first_chunk():
    with FaultServer(script=["503", "ok"]) as fs:
        c = OpenAIClient(fs.base_url, name="fs", retries=1, backoff=0.01)
        r = c.stream_chat([{"role": "user", "content": "下書き:\nabc"}], "fake", max_tokens=5)
        assert r.text == "abc" and r.attempts == 2


# ---------------------------------------------------------------------------------------------
# the benchmark end to end against the fault server


def test_run_benchmark_two_endpoints_with_errors_counted(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    with FaultServer(chunk_delay=0.002) as fast, FaultServer(chunk_delay=0.006, script=["ok", "500"]) as slow:
        targets = make_targets([fast.base_url, slow.base_url], ["fake"], ["fast", "slow"])
        r = run_benchmark(targets, prompts, tmp_path / "out", levels=[1, 2], max_tokens=64, requests=4, warmup=1,
                          progress=False)
        assert len(fast.posts) == 1 + 4 + 4  # warm-up + two levels
    s = r["summaries"]
    assert s["fast"][1]["errors"] == 0 and s["fast"][2]["ok"] == 4
    assert s["slow"][1]["errors"] == 1 and "HTTP 500" in s["slow"][1]["errors_sample"][0]  # counted, run goes on
    assert s["fast"][1]["token_source"] == "usage"
    # the fault server makes one token per character and answers with the prompt's draft
    lens = [len(DRAFT[: 20 + 5 * i]) for i in range(3)]
    assert s["fast"][1]["output_tokens"] == sum(lens[i % 3] for i in range(1, 5))
    assert r["ratios"]["slow"][2]["request_tok_per_s_mean"] < 1.0  # slower chunks -> fewer tok/s
    out = tmp_path / "out"
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "server usage field" in md and "Ratio to fast" in md and "HTTP 500" in md
    recs = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(recs) == 16 and sum(not x["ok"] for x in recs) == 1
    with pytest.raises(FileExistsError):  # never overwrites without --overwrite
        run_benchmark(targets, prompts, out, levels=[1], requests=1, progress=False)


def test_token_count_falls_back_to_chunks_and_says_so(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    with FaultServer(usage=False, chunk_chars=2) as fs:
        code = main(["--endpoint", fs.base_url, "--model", "fake", "--prompts", str(prompts), "--concurrency", "1",
                     "--requests", "2", "--warmup", "0", "--max-tokens", "10", "--output", str(tmp_path / "o"),
                     "--no-progress"])
    assert code == 0
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert r["summaries"]["fake@" + fs.base_url.split("//")[1].split("/")[0]]["1"]["token_source"] == "chunks"
    assert "token chunks (approximate" in capsys.readouterr().out


def test_server_down_is_a_clear_error(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    port = free_port()  # nothing listens there
    code = main(["--endpoint", f"http://127.0.0.1:{port}/v1", "--model", "m", "--label", "nim", "--prompts", str(prompts),
                 "--concurrency", "1", "--output", str(tmp_path / "o"), "--no-progress"])
    assert code == 1
    assert "nim: POST /chat/completions stream (model 'm'): ConnectError" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# against the real server


@pytest.mark.slow
def test_real_server_concurrency_1_2(openai_server, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    targets = make_targets([openai_server.base_url] * 2, [openai_server.base_model, openai_server.lora_model],
                           ["base", "lora"])
    r = run_benchmark(targets, prompts, tmp_path / "out", levels=[1, 2], max_tokens=16, requests=2, warmup=1,
                      progress=False)
    for name in ("base", "lora"):
        for c in (1, 2):
            lv = r["summaries"][name][c]
            assert lv["errors"] == 0 and lv["ok"] == 2
            assert lv["token_source"] == "usage"  # vLLM sends usage with stream_options.include_usage
            assert 0 < lv["mean_output_tokens"] <= 16
            assert lv["tokens_per_chunk"] == pytest.approx(1.0, abs=0.2)  # vLLM: one chunk per token
            assert 0 < lv["ttft_s"]["p50"] <= lv["e2e_s"]["p50"]
            assert lv["request_tok_per_s"]["mean"] > 0 and lv["aggregate_tok_per_s"] > 0
    assert r["ratios"]["lora"][1]["request_tok_per_s_mean"] > 0
    recs = [json.loads(x) for x in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and all(x["ok"] and 1 <= x["output_tokens"] <= 16 and x["ttft_s"] <= x["e2e_s"] for x in recs)
    assert (tmp_path / "out" / "throughput.png").stat().st_size > 0
