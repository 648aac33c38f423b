"""A small HTTP client for OpenAI-compatible servers (NIM, vLLM, OpenAI), shared by
``benchmarks.model_eval`` (BLEU across endpoints) and ``benchmarks.inference_speed`` (serving speed).

Why not the ``openai`` package: the benchmarks need the arrival time of every streamed chunk, a total
per-request deadline (httpx's own timeouts are per read, so a server that trickles bytes never times
out), and errors that always name the endpoint. This module gives exactly that, on ``httpx``:

* :class:`OpenAIClient` -- ``list_models()``, ``chat()`` / ``complete()`` (non-streaming) and
  ``stream_chat()`` / ``stream_complete()`` (server-sent events, with per-chunk timestamps and the
  server's ``usage`` from ``stream_options.include_usage``).
* Retries with exponential backoff and jitter (:func:`backoff_delay`) on connection errors, timeouts,
  HTTP 408/429/5xx; ``Retry-After`` is honoured up to the backoff cap. Other 4xx, a malformed JSON
  body and a malformed event stream are not retried: they raise :class:`EndpointError` at once.
  A stream is only retried before its first chunk arrived (a partial answer cannot be resumed).
* The API key comes from an environment variable (``api_key_env``); it is sent as a Bearer token
  and never printed: ``repr()`` and every error message leave it out.
* ``stats`` counts requests sent, retries and failures (thread-safe; one client may serve many threads).
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from recipes.cli import run_command

DEFAULT_TIMEOUT = 120.0  # seconds per request, whole answer included
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5  # first retry waits about this long, then 2x per attempt
MAX_BACKOFF = 30.0
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_BODY_EXCERPT = 300


class EndpointError(RuntimeError):
    """A request to one endpoint failed for good; the message starts with the endpoint's name."""

    def __init__(self, endpoint: str, message: str, *, status: int | None = None, attempts: int = 1):
        self.endpoint, self.status, self.attempts = endpoint, status, attempts
        suffix = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{endpoint}: {message}{suffix}")


class _MalformedStream(Exception):
    """A line of the event stream that is not server-sent-event syntax."""


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


def backoff_delay(attempt: int, base: float = DEFAULT_BACKOFF, cap: float = MAX_BACKOFF,
                  retry_after: float | None = None, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number ``attempt`` (0 = first retry): ``base * 2**attempt``
    with +-25% jitter (so many clients do not retry in lock-step), at least ``retry_after``,
    never more than ``cap``."""
    delay = base * (2 ** attempt) * (0.75 + 0.5 * rng())
    if retry_after is not None:
        delay = max(delay, retry_after)
    return max(0.0, min(cap, delay))


def normalize_base_url(url: str) -> str:
    """``http(s)://host:port/v1`` without a trailing slash; anything else is a ValueError."""
    u = url.strip().rstrip("/")
    if not (u.startswith("http://") or u.startswith("https://")) or len(u.split("://", 1)[1]) == 0:
        raise ValueError(f"{url!r}: endpoint URL must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
    for suffix in ("/chat/completions", "/completions"):
        if u.endswith(suffix):  # people paste the full route; the client adds it itself
            u = u[: -len(suffix)]
    return u


@dataclass
class Completion:
    """One non-streamed answer."""
    text: str
    finish_reason: str | None
    usage: dict | None
    latency_s: float
    attempts: int


@dataclass
class StreamResult:
    """One streamed answer with timings in seconds from the moment the request was sent.

    ``chunk_times``: arrival of each chunk that carries a generated token (vLLM streams one chunk
    per token, sometimes with empty text while a multi-byte character is incomplete; NIM may put
    several tokens in one chunk). The role-only opening chunk and the usage-only closing chunk are
    not token chunks. ``ttft_s`` is the first token chunk.
    """
    text: str
    ttft_s: float | None
    chunk_times: list[float]
    e2e_s: float
    usage: dict | None
    finish_reason: str | None
    attempts: int
    chunks: int = 0

    @property
    def inter_chunk_s(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class ClientStats:
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    failures: int = 0  # calls that raised EndpointError
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict:
        return {"requests": self.requests, "retries": self.retries, "failures": self.failures}


class OpenAIClient:
    """Client for one OpenAI-compatible server (``base_url`` ends in ``/v1``).

    ``name`` labels every error (defaults to the URL). The key is taken from ``api_key`` or the
    environment variable ``api_key_env`` (an unset variable is an error: a silent anonymous request
    would fail later with a confusing 401).
    """

    def __init__(self, base_url: str, *, name: str | None = None, api_key: str | None = None,
                 api_key_env: str | None = None, timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF, max_backoff: float = MAX_BACKOFF, max_connections: int = 64):
        if timeout <= 0:
            raise ValueError(f"timeout={timeout}: must be > 0")
        if retries < 0:
            raise ValueError(f"retries={retries}: must be >= 0")
        self.base_url = normalize_base_url(base_url)
        self.name = name or self.base_url
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"{self.name}: environment variable {api_key_env} (API key) is not set")
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.stats = ClientStats()
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                  limits=httpx.Limits(max_connections=max_connections,
                                                      max_keepalive_connections=max_connections),
                                  trust_env=False)  # a proxy from the environment must not see local servers

    def __repr__(self) -> str:  # never the key
        return f"OpenAIClient(name={self.name!r}, base_url={self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "OpenAIClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public calls --------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        """Ids the server serves (``GET /models``); for vLLM and NIM, LoRA adapters are listed too."""
        def once(deadline: float) -> list[str]:
            with self._http.stream("GET", f"{self.base_url}/models") as r:
                data = self._json_body(r, deadline, "GET /models")
            items = data.get("data") if isinstance(data, dict) else None
            if not isinstance(items, list) or not all(isinstance(m, dict) and "id" in m for m in items):
                raise EndpointError(self.name, f"GET /models: unexpected answer {_excerpt(json.dumps(data))}")
            return [str(m["id"]) for m in items]
        return self._with_retries(once, "GET /models")[0]

    def chat(self, messages: list[dict], model: str, *, max_tokens: int, temperature: float = 0.0,
             **extra: Any) -> Completion:
        """``POST /chat/completions`` (not streamed); greedy by default."""
        payload = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature, **extra}
        return self._complete("/chat/completions", payload, chat=True)

    def complete(self, prompt: str, model: str, *, max_tokens: int, temperature: float = 0.0,
                 **extra: Any) -> Completion:
        """``POST /completions`` with an already rendered prompt (NeMo-format test files)."""
        payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **extra}
        return self._complete("/completions", payload, chat=False)

    def stream_chat(self, messages: list[dict], model: str, *, max_tokens: int, temperature: float = 0.0,
                    include_usage: bool = True, **extra: Any) -> StreamResult:
        payload = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                   **extra}
        return self._stream("/chat/completions", payload, chat=True, include_usage=include_usage)

    def stream_complete(self, prompt: str, model: str, *, max_tokens: int, temperature: float = 0.0,
                        include_usage: bool = True, **extra: Any) -> StreamResult:
        payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **extra}
        return self._stream("/completions", payload, chat=False, include_usage=include_usage)

    # -- machinery ------------------------------------------------------------------------------

    def _with_retries(self, once: Callable[[float], Any], what: str) -> tuple[Any, int]:
        """``(once(deadline), attempts)``: run until it succeeds, retrying _Transient failures with backoff."""
        last: _Transient | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.add(retries=1)
                time.sleep(backoff_delay(attempt - 1, self.backoff, self.max_backoff, last.retry_after))
            self.stats.add(requests=1)
            try:
                return once(time.perf_counter() + self.timeout), attempt + 1
            except _Transient as e:
                last = e
            except httpx.TimeoutException:  # connecting, sending, or waiting for the headers
                last = _Transient(f"{what}: timed out after {self.timeout:g} s")
            except httpx.TransportError as e:
                last = _Transient(f"{what}: {type(e).__name__}: {e}")
            except EndpointError:
                self.stats.add(failures=1)
                raise
        self.stats.add(failures=1)
        raise EndpointError(self.name, str(last), status=last.status, attempts=self.retries + 1)

    def _complete(self, route: str, payload: dict, chat: bool) -> Completion:
        what = f"POST {route} (model {payload['model']!r})"

        def once(deadline: float) -> Completion:
            t0 = time.perf_counter()
            with self._http.stream("POST", f"{self.base_url}{route}", json=payload) as r:
                data = self._json_body(r, deadline, what)
            text, finish = _choice_text(data, chat, self.name, what)
            return Completion(text=text, finish_reason=finish, usage=_usage(data), latency_s=time.perf_counter() - t0,
                              attempts=0)

        result, attempts = self._with_retries(once, what)
        result.attempts = attempts
        return result

    def _stream(self, route: str, payload: dict, chat: bool, include_usage: bool) -> StreamResult:
        payload = {**payload, "stream": True}
        if include_usage:
            payload["stream_options"] = {"include_usage": True}
        what = f"POST {route} stream (model {payload['model']!r})"

        def once(deadline: float) -> StreamResult:
            t0 = time.perf_counter()
            with self._http.stream("POST", f"{self.base_url}{route}", json=payload) as r:
                self._check_status(r, what)
                ctype = r.headers.get("content-type", "")
                if "text/event-stream" not in ctype:
                    body = _read_limited(r, deadline, self.timeout, what)
                    raise EndpointError(self.name, f"{what}: expected a text/event-stream answer, got {ctype!r}: "
                                                   f"{_excerpt(body)}", status=r.status_code)
                return self._read_events(r, t0, deadline, chat, what)

        result, attempts = self._with_retries(once, what)
        result.attempts = attempts
        return result

    def _read_events(self, r: httpx.Response, t0: float, deadline: float, chat: bool, what: str) -> StreamResult:
        parts: list[str] = []
        times: list[float] = []
        usage = finish = None
        done = False
        n_chunks = 0
        try:
            for data in _sse_data(r.iter_lines()):
                now = time.perf_counter()
                if now > deadline:
                    raise self._timeout_error(what, partial=bool(times))
                if data.strip() == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    raise EndpointError(self.name, f"{what}: malformed event in the stream (not JSON): "
                                                   f"{_excerpt(data)}") from None
                if not isinstance(event, dict):
                    raise EndpointError(self.name, f"{what}: malformed event in the stream: {_excerpt(data)}")
                if "error" in event:
                    raise EndpointError(self.name, f"{what}: error in the stream: {_error_message(event)}")
                n_chunks += 1
                usage = _usage(event) or usage
                choices = event.get("choices")
                if choices is None or not isinstance(choices, list):
                    raise EndpointError(self.name, f"{what}: stream event without a 'choices' list: {_excerpt(data)}")
                if not choices:
                    continue  # the usage-only closing chunk
                c = choices[0]
                if not isinstance(c, dict):
                    raise EndpointError(self.name, f"{what}: malformed choice in the stream: {_excerpt(data)}")
                finish = c.get("finish_reason") or finish
                if chat:
                    delta = c.get("delta") or {}
                    if not isinstance(delta, dict):
                        raise EndpointError(self.name, f"{what}: malformed delta in the stream: {_excerpt(data)}")
                    text = delta.get("content")
                    role_only = "role" in delta and not text
                    has_token = "content" in delta and not role_only
                else:
                    text = c.get("text")
                    has_token = "text" in c
                if text is not None and not isinstance(text, str):
                    raise EndpointError(self.name, f"{what}: non-string text in the stream: {_excerpt(data)}")
                if has_token:
                    times.append(now - t0)
                if text:
                    parts.append(text)
        except _MalformedStream as e:
            raise EndpointError(self.name, f"{what}: malformed event stream: {e}") from None
        except httpx.TimeoutException:
            if times:  # mid-answer: not retried, the partial output is not an answer
                raise self._timeout_error(what, partial=True) from None
            raise _Transient(f"{what}: timed out after {self.timeout:g} s") from None
        except httpx.TransportError as e:
            if times:
                raise EndpointError(self.name, f"{what}: connection broke mid-stream ({type(e).__name__}: {e})") \
                    from None
            raise _Transient(f"{what}: {type(e).__name__}: {e}") from None
        if not done and finish is None:
            raise EndpointError(self.name, f"{what}: the stream ended without [DONE] or a finish_reason "
                                           f"(truncated answer after {len(times)} token chunks)")
        return StreamResult(text="".join(parts), ttft_s=times[0] if times else None, chunk_times=times,
                            e2e_s=time.perf_counter() - t0, usage=usage, finish_reason=finish, attempts=0,
                            chunks=n_chunks)

    def _timeout_error(self, what: str, partial: bool) -> Exception:
        msg = f"{what}: timed out after {self.timeout:g} s"
        return EndpointError(self.name, msg + " mid-answer") if partial else _Transient(msg)

    def _check_status(self, r: httpx.Response, what: str) -> None:
        if r.status_code < 400:
            return
        try:
            body = r.read().decode("utf-8", "replace")
        except httpx.HTTPError:
            body = ""
        msg = f"{what}: HTTP {r.status_code}: {_error_message(_try_json(body)) or _excerpt(body)}"
        if r.status_code in RETRY_STATUS:
            raise _Transient(msg, status=r.status_code, retry_after=_retry_after(r.headers.get("retry-after")))
        hint = " (check the API key variable)" if r.status_code in (401, 403) else ""
        if r.status_code == 404:
            hint = " (wrong URL, or the model/adapter is not served: see GET /models)"
        raise EndpointError(self.name, msg + hint, status=r.status_code)

    def _json_body(self, r: httpx.Response, deadline: float, what: str) -> Any:
        """Status check, then the whole body (within the deadline) parsed as JSON."""
        self._check_status(r, what)
        body = _read_limited(r, deadline, self.timeout, what)
        try:
            return json.loads(body)
        except json.JSONDecodeError as e:
            raise EndpointError(self.name, f"{what}: answer is not valid JSON ({e.msg} at char {e.pos}): "
                                           f"{_excerpt(body)}", status=r.status_code) from None


def _read_limited(r: httpx.Response, deadline: float, timeout: float, what: str) -> str:
    """The body as text, turning a slow trickle past ``deadline`` and transport errors into _Transient."""
    chunks = []
    try:
        for b in r.iter_bytes():
            chunks.append(b)
            if time.perf_counter() > deadline:
                raise _Transient(f"{what}: timed out after {timeout:g} s")
    except httpx.TimeoutException:
        raise _Transient(f"{what}: timed out after {timeout:g} s") from None
    except httpx.TransportError as e:
        raise _Transient(f"{what}: {type(e).__name__}: {e}") from None
    return b"".join(chunks).decode("utf-8", "replace")


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The data payload of each server-sent event (multi-line data joined with newlines)."""
    buf: list[str] = []
    for line in lines:
        line = line.rstrip("\r")
        if not line:
            if buf:
                yield "\n".join(buf)
                buf = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        key, _, value = line.partition(":")
        if key == "data":
            buf.append(value[1:] if value.startswith(" ") else value)
        elif key not in ("event", "id", "retry"):
            raise _MalformedStream(f"not a server-sent event line: {_excerpt(line, 80)}")
    if buf:
        yield "\n".join(buf)


def _choice_text(data: Any, chat: bool, name: str, what: str) -> tuple[str, str | None]:
    try:
        c = data["choices"][0]
        text = c["message"]["content"] if chat else c["text"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(name, f"{what}: answer has no choices[0].{'message.content' if chat else 'text'}: "
                                  f"{_excerpt(json.dumps(data, ensure_ascii=False))}") from None
    if text is None:
        text = ""  # some servers send null content for an empty answer
    if not isinstance(text, str):
        raise EndpointError(name, f"{what}: choices[0] text is {type(text).__name__}, not a string")
    return text, c.get("finish_reason")


def _usage(data: Any) -> dict | None:
    u = data.get("usage") if isinstance(data, dict) else None
    return u if isinstance(u, dict) and u else None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: not worth parsing, the backoff covers it


def _try_json(body: str) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return None


def _error_message(data: Any) -> str:
    """The message of an OpenAI-style ``{"error": {"message": ...}}`` body, or ''."""
    if isinstance(data, dict):
        err = data.get("error", data.get("detail"))
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if err:
            return str(err)
        if data.get("message"):
            return str(data["message"])
    return ""


def _excerpt(text: str, n: int = _BODY_EXCERPT) -> str:
    text = text.strip().replace("\n", "\\n")
    return repr(text if len(text) <= n else text[:n] + "...")


def report_command(call, output) -> int:
    """The tail of an endpoint command's ``main()`` (``recipes.cli.run_command``): run ``call`` (which
    writes ``output/results.md``) and print that report (exit 0); an endpoint that failed after its
    retries exits 1, bad input 2."""
    return run_command(call, (EndpointError,), bad_input=(ValueError, FileNotFoundError, FileExistsError),
                       show=lambda _: Path(output, "results.md").read_text(encoding="utf-8"))
