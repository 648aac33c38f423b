"""A tiny OpenAI-compatible HTTP server that misbehaves on cue, for the clients' error-path tests.

:class:`FaultServer` runs ``http.server`` on 127.0.0.1 (a free port) in a thread. ``GET /v1/models``
lists ``models``; ``POST /v1/chat/completions`` and ``/v1/completions`` (streamed or not) answer with
the next behaviour of ``script``, then ``default`` once the script is used up:

    ok            a normal answer: the draft of the last user message (text after "下書き:\\n"), or the
                  prompt itself, so an evaluation against it has real, deterministic scores
    500 / 503 / 400 / 429
                  that HTTP status with an OpenAI-style error body (429 and 503 add Retry-After: 0)
    hang          sleeps ``hang_s`` before answering (longer than the client's timeout)
    close         closes the connection without any answer
    badjson       200 with a body that is not JSON
    badsse        a stream whose second event is not JSON
    notsse        a stream request answered with plain JSON
    truncated     a stream that stops after two chunks, without finish_reason or [DONE]
    garbage       a stream with a line that is not server-sent-event syntax

``delay`` seconds are spent before every ok answer (``chunk_delay`` between stream chunks);
``usage=False`` leaves the usage out. ``posts`` records every generation request body (thread-safe).
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BEHAVIOURS = ("ok", "500", "503", "400", "429", "hang", "close", "badjson", "badsse", "notsse", "truncated",
              "garbage")


def answer_text(body: dict) -> str:
    """What an ok answer says for a request body."""
    if "messages" in body:
        user = [m.get("content", "") for m in body["messages"] if m.get("role") == "user"]
        text = user[-1] if user else ""
    else:
        text = body.get("prompt", "")
    return text.split("下書き:\n", 1)[-1]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # the client gave up: expected here
            super().handle_error(request, client_address)


class FaultServer:
    def __init__(self, script=(), default: str = "ok", models=("fake",), delay: float = 0.0,
                 chunk_delay: float = 0.0, hang_s: float = 5.0, usage: bool = True, chunk_chars: int = 3):
        for b in list(script) + [default]:
            if b not in BEHAVIOURS:
                raise ValueError(f"unknown behaviour {b!r} (known: {', '.join(BEHAVIOURS)})")
        self.script, self.default, self.models = list(script), default, list(models)
        self.delay, self.chunk_delay, self.hang_s, self.usage, self.chunk_chars = \
            delay, chunk_delay, hang_s, usage, chunk_chars
        self.posts: list[dict] = []
        self.gets = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "FaultServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # wakes 'hang' handlers
        self._httpd.shutdown()
        self._httpd.server_close()

    def next_behaviour(self, body: dict) -> str:
        with self._lock:
            self.posts.append(body)
            return self.script.pop(0) if self.script else self.default

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: simple and enough here

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                with server._lock:
                    server.gets += 1
                if self.path.rstrip("/") == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]})
                else:
                    self._json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                route = self.path.rstrip("/")
                if route not in ("/v1/chat/completions", "/v1/completions"):
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                b = server.next_behaviour(body)
                chat = route.endswith("chat/completions")
                if b in ("500", "503", "400", "429"):
                    extra = {"Retry-After": "0"} if b in ("429", "503") else {}
                    self._json(int(b), {"error": {"message": f"injected HTTP {b}", "type": "fault"}}, extra)
                elif b == "hang":
                    server._stop.wait(server.hang_s)
                    self._ok(body, chat)
                elif b == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif b == "badjson":
                    self._raw(200, "application/json", b'{"choices": [ this is not json')
                elif b == "notsse" and body.get("stream"):
                    self._json(200, _full_answer(body, chat, "not a stream"))
                elif b in ("badsse", "truncated", "garbage") and body.get("stream"):
                    self._faulty_stream(body, chat, b)
                else:
                    self._ok(body, chat)

            def _ok(self, body: dict, chat: bool) -> None:
                time.sleep(server.delay)
                text = answer_text(body)
                text = text[: max(0, int(body.get("max_tokens") or 10 ** 9))]  # one "token" per character
                if not body.get("stream"):
                    self._json(200, _full_answer(body, chat, text, server.usage))
                    return
                self._start_stream()
                if chat:
                    self._event(_chunk(body, chat, "", role=True))
                n = server.chunk_chars
                pieces = [text[i:i + n] for i in range(0, len(text), n)] or [""]
                for i, piece in enumerate(pieces):  # the last piece carries finish_reason
                    time.sleep(server.chunk_delay)
                    self._event(_chunk(body, chat, piece, finish="stop" if i == len(pieces) - 1 else None))
                if server.usage and (body.get("stream_options") or {}).get("include_usage"):
                    self._event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": len(text),
                                                          "total_tokens": 7 + len(text)}})
                self.wfile.write(b"data: [DONE]\n\n")

            def _faulty_stream(self, body: dict, chat: bool, kind: str) -> None:
                self._start_stream()
                self._event(_chunk(body, chat, "ab"))
                if kind == "badsse":
                    self.wfile.write(b"data: {not json at all\n\n")
                elif kind == "garbage":
                    self.wfile.write(b"<html>proxy error</html>\n\n")
                else:
                    self._event(_chunk(body, chat, "cd"))
                self.wfile.flush()

            def _start_stream(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()

            def _event(self, obj: dict) -> None:
                self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
                self.wfile.flush()

            def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
                self._raw(status, "application/json", json.dumps(obj, ensure_ascii=False).encode(), headers)

            def _raw(self, status: int, ctype: str, data: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _full_answer(body: dict, chat: bool, text: str, usage: bool = True) -> dict:
    choice = {"index": 0, "finish_reason": "stop"}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    out = {"id": "fault-1", "object": "chat.completion" if chat else "text_completion", "model": body.get("model"),
           "choices": [choice]}
    if usage:
        out["usage"] = {"prompt_tokens": 7, "completion_tokens": len(text), "total_tokens": 7 + len(text)}
    return out


def _chunk(body: dict, chat: bool, text: str, role: bool = False, finish: str | None = None) -> dict:
    if chat:
        delta = {"role": "assistant", "content": text} if role else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
    return {"id": "fault-1", "object": "chat.completion.chunk" if chat else "text_completion",
            "model": body.get("model"), "choices": [choice]}
