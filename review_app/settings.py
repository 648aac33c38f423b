"""Settings of the review app: command-line options of ``python -m review_app``, carried to the
Streamlit page in environment variables (``streamlit run`` owns the page's command line, and
Streamlit's AppTest runs the page in-process, where only the environment can reach it).

| Setting     | Option          | Environment             | Default                        |
|-------------|-----------------|-------------------------|--------------------------------|
| db_url      | --db            | REVIEW_DB_URL           | sqlite:///runs/review.db       |
| base_url    | --base-url      | REVIEW_BASE_URL         | http://127.0.0.1:8000/v1 (NIM) |
| model       | --model         | REVIEW_MODEL            | base                           |
| provider    | --provider      | REVIEW_PROVIDER         | openai (or nvidia)             |
| adapter     | --adapter       | REVIEW_ADAPTER          | (asked from the server)        |
| user        | --user          | REVIEW_USER             | the login name                 |
| timeout     | --timeout       | REVIEW_TIMEOUT          | 120 (seconds per request)      |
| max_retries | --max-retries   | REVIEW_MAX_RETRIES      | 1                              |
| max_tokens  | --max-tokens    | REVIEW_MAX_TOKENS       | 1024                           |

The API key is never an option (it would show in ``ps``): REVIEW_API_KEY, else OPENAI_API_KEY
(provider openai) or NVIDIA_API_KEY (provider nvidia), else "EMPTY" (local servers ignore it).
"""
from __future__ import annotations

import argparse
import getpass
import os
from dataclasses import asdict, dataclass, fields

from review_app.store import DEFAULT_DB_URL

PROVIDERS = ("openai", "nvidia")
_TYPES = {"timeout": float, "max_retries": int, "max_tokens": int}  # the rest are text
ENV = {"db_url": "REVIEW_DB_URL", "base_url": "REVIEW_BASE_URL", "model": "REVIEW_MODEL",
       "provider": "REVIEW_PROVIDER", "adapter": "REVIEW_ADAPTER", "user": "REVIEW_USER",
       "timeout": "REVIEW_TIMEOUT", "max_retries": "REVIEW_MAX_RETRIES", "max_tokens": "REVIEW_MAX_TOKENS"}


def _login() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return None


@dataclass(frozen=True)
class Settings:
    db_url: str = DEFAULT_DB_URL
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "base"
    provider: str = "openai"
    adapter: str | None = None
    user: str | None = None
    timeout: float = 120.0
    max_retries: int = 1
    max_tokens: int = 1024

    def __post_init__(self):
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider {self.provider!r}: expected one of {', '.join(PROVIDERS)}")
        if self.timeout <= 0 or self.max_retries < 0 or self.max_tokens < 1:
            raise ValueError("timeout must be > 0, max_retries >= 0 and max_tokens >= 1")

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "Settings":
        """Settings from REVIEW_* variables (unset or empty ones keep the default)."""
        environ = os.environ if environ is None else environ
        kw = {}
        for f in fields(cls):
            raw = environ.get(ENV[f.name], "")
            if raw.strip():
                try:
                    kw[f.name] = _TYPES.get(f.name, str)(raw.strip())
                except ValueError:
                    raise ValueError(f"{ENV[f.name]}={raw!r}: not a number") from None
        s = cls(**kw)
        return s if s.user else cls(**{**kw, "user": _login()})

    def to_env(self) -> dict[str, str]:
        """The REVIEW_* variables that reproduce these settings."""
        return {ENV[k]: str(v) for k, v in asdict(self).items() if v is not None}

    def api_key(self, environ: dict | None = None) -> str:
        environ = os.environ if environ is None else environ
        fallback = "OPENAI_API_KEY" if self.provider == "openai" else "NVIDIA_API_KEY"
        return environ.get("REVIEW_API_KEY") or environ.get(fallback) or "EMPTY"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The settings as command-line options (defaults: the environment, then the built-in ones)."""
    d = Settings()
    ap.add_argument("--db", dest="db_url", help=f"SQLAlchemy database URL for saved reviews (default {d.db_url}; "
                    "snowflake://user:pass@account/db/schema?warehouse=WH for Snowflake)")
    ap.add_argument("--base-url", help=f"OpenAI-compatible endpoint: NIM, vLLM, llama.cpp (default {d.base_url})")
    ap.add_argument("--model", help=f"served model name; a LoRA adapter's name selects it (default {d.model})")
    ap.add_argument("--provider", choices=PROVIDERS, help="LangChain client: openai = ChatOpenAI (default), "
                    "nvidia = ChatNVIDIA (langchain-nvidia-ai-endpoints)")
    ap.add_argument("--adapter", help="adapter label saved with each review (default: the LoRA path the server "
                    "reports for --model, if any)")
    ap.add_argument("--user", help="reviewer name saved with each review (default: login name)")
    ap.add_argument("--timeout", type=float, help=f"seconds per model request (default {d.timeout:g})")
    ap.add_argument("--max-retries", type=int, help=f"retries of a failed request (default {d.max_retries})")
    ap.add_argument("--max-tokens", type=int, help=f"longest answer in tokens (default {d.max_tokens})")


def from_args(args: argparse.Namespace, environ: dict | None = None) -> Settings:
    """Options given on the command line override the environment."""
    base = Settings.from_env(environ)
    given = {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}
    return Settings(**{**asdict(base), **given})
