"""The model call: draft -> house-style comment, through LangChain, from any OpenAI-compatible server.

``langchain_openai.ChatOpenAI`` talks to NIM, vLLM and llama.cpp alike (``--provider openai``,
the default); ``langchain_nvidia_ai_endpoints.ChatNVIDIA`` is the option for NVIDIA's hosted API
or a NIM (``--provider nvidia``). The messages come from recipes.prompt.build_messages, so the
served model is asked exactly as it was trained (same system prompt, same user-turn layout, the
server applies the same chat template). Greedy (temperature 0), so asking twice gives one answer.

Every failure (server down, timeout, unknown model name, HTTP error) becomes :class:`LLMError`
with a message for the page; nothing else escapes :func:`ask`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from recipes.schema import normalize_text
from recipes.prompt import PROMPT_VERSION, build_messages
from review_app.settings import Settings


class LLMError(RuntimeError):
    """The model could not be asked; the message is meant for the person using the page."""


@dataclass(frozen=True)
class Correction:
    text: str                    # the model's rewrite, surrounding whitespace removed
    model: str                   # the model name the server says answered
    adapter: str | None          # the LoRA adapter behind that name (settings or server), if any
    prompt_version: str
    seconds: float
    truncated: bool              # stopped by max_tokens: the text is cut off


def to_langchain(messages: list[dict[str, str]]):
    """recipes.prompt messages ({"role", "content"}) -> LangChain message objects."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    return [kinds[m["role"]](content=m["content"]) for m in messages]


def make_chat_model(settings: Settings):
    """The LangChain chat model for these settings (no request is sent for provider openai)."""
    if settings.provider == "nvidia":
        from langchain_nvidia_ai_endpoints import ChatNVIDIA
        return ChatNVIDIA(base_url=settings.base_url, model=settings.model, api_key=settings.api_key(),
                          temperature=0, max_tokens=settings.max_tokens, timeout=settings.timeout)
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(base_url=settings.base_url, model=settings.model, api_key=settings.api_key(),
                      temperature=0, max_tokens=settings.max_tokens, timeout=settings.timeout,
                      max_retries=settings.max_retries)


def server_adapter(settings: Settings) -> str | None:
    """The adapter behind ``settings.model`` as the server lists it: vLLM and NIM list a LoRA in
    /v1/models with ``parent`` = its base model and ``root`` = where it was loaded from. None for a
    base model, or when the server does not say (best effort: never raises)."""
    import openai
    try:
        client = openai.OpenAI(base_url=settings.base_url, api_key=settings.api_key(),
                               timeout=min(settings.timeout, 10.0), max_retries=0)
        for m in client.models.list():
            if m.id == settings.model:
                parent = getattr(m, "parent", None)
                return (getattr(m, "root", None) or m.id) if parent else None
    except Exception:  # noqa: BLE001 - metadata only; the chat request reports real errors
        return None
    return None


def _is_requests_error(e: Exception, name: str) -> bool:
    """ChatNVIDIA sends with ``requests``: is ``e`` requests.exceptions.<name>?"""
    try:
        import requests
    except ImportError:
        return False
    return isinstance(e, getattr(requests.exceptions, name))


def _explain(e: Exception, settings: Settings) -> str:
    """A short bilingual message naming the endpoint and model, and what went wrong."""
    import openai
    where = f"{settings.base_url} (model '{settings.model}')"
    if isinstance(e, openai.APITimeoutError) or _is_requests_error(e, "Timeout"):
        return (f"モデルの応答がタイムアウトしました / The model did not answer within {settings.timeout:g} s: {where}")
    if isinstance(e, openai.APIConnectionError) or _is_requests_error(e, "ConnectionError"):
        return f"モデルサーバーに接続できません / Cannot reach the model server at {where}: {e}"
    if isinstance(e, openai.NotFoundError):
        return (f"モデルが見つかりません / The server has no model '{settings.model}' at {settings.base_url} "
                f"(check --model; a LoRA adapter is requested by its served name): {e}")
    if isinstance(e, openai.APIStatusError):
        return f"モデルサーバーのエラー / The model server answered HTTP {e.status_code}: {where}: {e}"
    return f"モデルの呼び出しに失敗しました / The model call failed: {where}: {type(e).__name__}: {e}"


def ask(settings: Settings, draft: str, section: str, month: str, fund: str | None = None,
        chat=None) -> Correction:
    """Ask the served model to rewrite ``draft``; LLMError on any failure or an empty answer.
    ``chat``: a ready LangChain chat model (default: :func:`make_chat_model`)."""
    # normalised as recipes.data normalises training drafts: the model sees what it was trained on
    messages = to_langchain(build_messages(normalize_text(draft), section, month,
                                           normalize_text(fund) if fund else None))
    t0 = time.perf_counter()
    try:
        chat = chat or make_chat_model(settings)  # ChatNVIDIA may already call the server here
        reply = chat.invoke(messages)
    except Exception as e:  # noqa: BLE001 - LangChain wraps transport errors per provider
        raise LLMError(_explain(e, settings)) from e
    seconds = time.perf_counter() - t0
    text = reply.content if isinstance(reply.content, str) else "".join(
        p.get("text", "") if isinstance(p, dict) else str(p) for p in reply.content)
    text = text.strip()
    if not text:
        raise LLMError(f"モデルの出力が空です / The model returned an empty answer: {settings.base_url} "
                       f"(model '{settings.model}')")
    meta = reply.response_metadata or {}
    return Correction(
        text=text, model=meta.get("model_name") or meta.get("model") or settings.model,
        adapter=settings.adapter or server_adapter(settings), prompt_version=PROMPT_VERSION,
        seconds=seconds, truncated=meta.get("finish_reason") == "length")
