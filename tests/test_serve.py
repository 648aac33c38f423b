"""benchmarks.serve: the vLLM launcher used by the evaluation, the serving benchmark and the app tests."""
from __future__ import annotations

import json
import sys
import urllib.request

import pytest

from benchmarks.serve import ServerError, VLLMServer, vllm_command


def test_command_names_every_lora_and_uses_the_module_entry_point(tmp_path):
    cmd = vllm_command("/py", tmp_path, port=1234, served_name="base", loras={"a": tmp_path / "x", "b": "y"},
                       max_lora_rank=32)
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--port") + 1] == "1234" and cmd[cmd.index("--max-lora-rank") + 1] == "32"
    mods = cmd[cmd.index("--lora-modules") + 1:]
    assert [m.split("=")[0] for m in mods] == ["a", "b"] and all("=/" in m for m in mods)
    assert "--enable-lora" not in vllm_command("/py", tmp_path, port=1)


def test_bad_model_and_adapter_dirs_are_refused_before_starting(tmp_path):
    with pytest.raises(ServerError, match="no config.json"):
        VLLMServer(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ServerError, match="'tuned'.*adapter_config.json"):
        VLLMServer(tmp_path, loras={"tuned": tmp_path / "missing"})


def test_a_server_that_dies_is_reported_with_its_log(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('boom: no such model')\nsys.exit(3)\n")
    fake.chmod(0o755)
    monkeypatch.setenv("FUNDCOMMENT_VLLM_PYTHON", str(fake))
    (tmp_path / "config.json").write_text("{}")
    server = VLLMServer(tmp_path, log_path=tmp_path / "log.txt").start()
    with pytest.raises(ServerError, match=r"exited with 3(.|\n)*boom: no such model"):
        server.wait_ready(timeout=30)
    server.stop()


@pytest.mark.slow
def test_real_server_serves_base_and_lora_with_usage(openai_server):
    def chat(model):
        body = {"model": model, "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "user", "content": "市場動向を一文で。"}]}
        req = urllib.request.Request(f"{openai_server.base_url}/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)

    base, lora = chat("base"), chat("lora")
    assert base["usage"]["completion_tokens"] > 0 and lora["model"] == "lora"
    # the adapter is loaded and applied: greedy answers differ from the base model's
    assert base["choices"][0]["message"]["content"] != lora["choices"][0]["message"]["content"]
