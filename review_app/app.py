"""The review page (Streamlit): draft -> "Ask LLM" -> edit the model's rewrite -> "Save Changes".

    python -m review_app [--db URL] [--base-url URL] [--model NAME] [--port N]
    streamlit run review_app/app.py          # settings from REVIEW_* variables (review_app.settings)

Left: the draft with its fund, section and month. Middle: the model's corrected comment in an
editable text area, and "Save Changes". Right: character-level diffs draft -> model output and
model output -> edited text. Below: the saved reviews (newest first) and one of them in detail.

What is saved is what the model was actually asked: if the draft, section, month or fund changed
after "Ask LLM", saving is refused until the model is asked again, so every saved triple
(draft, model output, final) belongs together and can be trained on.
"""
from __future__ import annotations

import datetime as dt
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # `streamlit run review_app/app.py` puts only review_app/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from recipes.schema import SECTIONS, normalize_text, parse_month  # noqa: E402
from recipes.textdiff import char_diff, diff_counts  # noqa: E402
from review_app import llm  # noqa: E402
from review_app.diff import ops_html  # noqa: E402
from review_app.settings import Settings  # noqa: E402
from review_app.store import Review, ReviewStore, safe_url  # noqa: E402

TITLE = "コメントレビュー / Comment review"
INPUT_KEYS = ("fund", "section", "month", "draft")


def check_inputs(draft: str, month: str) -> tuple[str | None, str | None]:
    """(canonical month, None) or (None, message) for the page's inputs before asking the model."""
    if not draft.strip():
        return None, "下書きを入力してください / Enter a draft first"
    m = parse_month(month)
    if m is None:
        return None, f"対象月の形式が不正です / Bad month {month!r} (use YYYY-MM)"
    return m, None


def current_inputs(ss) -> dict:
    """The inputs as the model would be asked with them now (month canonical when valid)."""
    return {"fund": (ss.get("fund") or "").strip() or None, "section": ss.get("section"),
            "month": parse_month(ss.get("month") or "") or ss.get("month"), "draft": ss.get("draft") or ""}


@st.cache_resource(show_spinner=False)
def get_store(url: str) -> ReviewStore:
    return ReviewStore(url)


def page_settings() -> Settings:
    """Settings from the environment, with the endpoint and model the sidebar may change."""
    base = Settings.from_env()
    ss = st.session_state
    return replace(base, base_url=(ss.get("base_url") or "").strip() or base.base_url,
                   model=(ss.get("model") or "").strip() or base.model, user=(ss.get("user") or "").strip() or base.user)


# ---------------------------------------------------------------------------------------------
# Callbacks: they run before the page is drawn, so they may set the widgets' values.


def on_ask() -> None:
    ss = st.session_state
    for k in ("llm_error", "save_error", "save_ok"):
        ss.pop(k, None)
    inputs = current_inputs(ss)
    month, problem = check_inputs(inputs["draft"], ss.get("month") or "")
    if problem:
        ss["llm_error"] = problem
        return
    settings = page_settings()
    with st.spinner("モデルに問い合わせ中… / Asking the model…"):
        try:
            res = llm.ask(settings, inputs["draft"], inputs["section"], month, inputs["fund"])
        except llm.LLMError as e:
            ss["llm_error"] = str(e)
            return
    ss["asked"] = {**inputs, "month": month, "output": res.text, "model": res.model, "adapter": res.adapter,
                   "prompt_version": res.prompt_version, "seconds": res.seconds, "truncated": res.truncated}
    ss["edited"] = res.text


def on_save() -> None:
    ss = st.session_state
    for k in ("save_error", "save_ok"):
        ss.pop(k, None)
    asked = ss.get("asked")
    if not asked:
        ss["save_error"] = "先に「LLMに依頼」を押してください / Ask the model first"
        return
    if {k: asked[k] for k in INPUT_KEYS} != current_inputs(ss):
        ss["save_error"] = ("入力が変更されています。もう一度LLMに依頼してください / The draft, fund, section or "
                            "month changed after asking: press Ask LLM again")
        return
    final = ss.get("edited") or ""
    if not final.strip():
        ss["save_error"] = "最終稿が空です / The final text is empty"
        return
    if ss.get("last_saved", {}).get("key") == (tuple(asked[k] for k in INPUT_KEYS), final):
        ss["save_ok"] = f"保存済みです / Already saved as #{ss['last_saved']['id']}"
        return
    settings = page_settings()
    review = Review(fund=asked["fund"], section=asked["section"], month=asked["month"], draft=asked["draft"],
                    model_output=asked["output"], final=final, model=asked["model"], adapter=asked["adapter"],
                    prompt_version=asked["prompt_version"], user_name=settings.user)
    try:
        rid = get_store(settings.db_url).save(review)
    except Exception as e:  # noqa: BLE001 - StoreError or any database error: show it, keep the edit
        ss["save_error"] = f"保存に失敗しました / Save failed: {type(e).__name__}: {e}"
        return
    ss["last_saved"] = {"key": (tuple(asked[k] for k in INPUT_KEYS), final), "id": rid}
    ss["save_ok"] = f"保存しました / Saved as #{rid}"


# ---------------------------------------------------------------------------------------------
# Page parts


def sidebar(settings: Settings) -> None:
    with st.sidebar:
        st.header("設定 / Settings")
        st.text_input("接続先 / Endpoint (base URL)", key="base_url")
        st.text_input("モデル / Model", key="model", help="served model name; a LoRA adapter is selected by its name")
        st.text_input("ユーザー / User", key="user")
        st.caption(f"クライアント / Client: {settings.provider} · timeout {settings.timeout:g} s · "
                   f"max_tokens {settings.max_tokens}")
        st.caption(f"保存先 / Database: `{safe_url(settings.db_url)}`")


def draft_column() -> None:
    st.subheader("下書き / Draft")
    st.text_input("ファンド / Fund", key="fund")
    st.selectbox("セクション / Section", SECTIONS, key="section")
    st.text_input("対象月 / Month (YYYY-MM)", key="month")
    st.text_area("下書き / Draft", key="draft", height=320, placeholder="外部運用会社のコメントを貼り付け / Paste the draft")
    st.button("LLMに依頼 / Ask LLM", key="ask", type="primary", on_click=on_ask)


def output_column() -> None:
    ss = st.session_state
    st.subheader("修正案 / Corrected comment")
    if ss.get("llm_error"):
        st.error(ss["llm_error"])
    asked = ss.get("asked")
    if not asked:
        if not ss.get("llm_error"):
            st.info("下書きを入力して「LLMに依頼」を押してください / Enter a draft and press Ask LLM")
        return
    st.text_area("最終稿（編集可） / Final (editable)", key="edited", height=320)
    st.caption(f"{asked['model']}" + (f" + {asked['adapter']}" if asked["adapter"] else "")
               + f" · prompt {asked['prompt_version']} · {asked['seconds']:.1f} s")
    if asked["truncated"]:
        st.warning("出力が max_tokens で途切れています / The answer was cut off at max_tokens")
    st.button("変更を保存 / Save Changes", key="save", type="primary", on_click=on_save)
    if ss.get("save_error"):
        st.error(ss["save_error"])
    if ss.get("save_ok"):
        st.success(ss["save_ok"])


def _diff_block(label: str, a: str, b: str) -> None:
    ops = char_diff(a, b)
    n = diff_counts(ops)
    st.markdown(f"**{label}**  \n+{n['inserted']} / −{n['deleted']} 文字 / chars")
    st.html(ops_html(ops))


def diff_column() -> None:
    ss = st.session_state
    st.subheader("差分 / Diff")
    asked = ss.get("asked")
    if not asked:
        return
    _diff_block("下書き → モデル出力 / Draft → model output", normalize_text(asked["draft"]), asked["output"])
    _diff_block("モデル出力 → 編集後 / Model output → edited", asked["output"], ss.get("edited") or "")


def history(settings: Settings) -> None:
    st.divider()
    head, button = st.columns([5, 1])
    head.subheader("保存履歴 / Saved reviews")
    button.button("再読み込み / Reload", key="reload")  # any rerun reads the table again
    try:
        items = get_store(settings.db_url).recent(limit=200)
    except Exception as e:  # noqa: BLE001 - an unreachable database must not take the page down
        st.error(f"保存先を読めません / Cannot read the database {safe_url(settings.db_url)}: "
                 f"{type(e).__name__}: {e}")
        return
    if not items:
        st.caption("まだ保存されていません / Nothing saved yet")
        return
    rows = []
    for r in items:
        n = diff_counts(char_diff(r.model_output, r.final))
        rows.append({"id": r.id, "created (UTC)": r.created_at.strftime("%Y-%m-%d %H:%M:%S"), "fund": r.fund,
                     "section": r.section, "month": r.month, "user": r.user_name, "model": r.model,
                     "adapter": r.adapter, "edited chars": n["inserted"] + n["deleted"],
                     "final": r.final[:60] + ("…" if len(r.final) > 60 else "")})
    st.dataframe(rows, hide_index=True)
    chosen = st.selectbox("詳細 / Details", [r.id for r in items], key="history_id",
                          format_func=lambda i: f"#{i}")
    r = next(x for x in items if x.id == chosen)
    with st.expander(f"#{r.id} {r.section} {r.month} {r.fund or ''}", expanded=False):
        st.text(r.draft)
        _diff_block("モデル出力 → 保存版 / Model output → saved", r.model_output, r.final)


def init_state(settings: Settings) -> None:
    """Widget defaults, set once through session state (a widget given both a default and a
    session-state value warns on the page)."""
    ss = st.session_state
    defaults = {"base_url": settings.base_url, "model": settings.model, "user": settings.user or "",
                "month": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m"), "fund": "", "draft": ""}
    for k, v in defaults.items():
        ss.setdefault(k, v)


def prefill_from_query() -> None:
    """Once per session, fill the inputs from the URL (``?fund=&section=&month=&draft=``) and, with
    ``ask=1``, ask the model at once: a link from another system (or review_app.screenshot) can
    open the page with a draft in it."""
    ss = st.session_state
    if ss.get("prefilled"):
        return
    ss["prefilled"] = True
    q = st.query_params
    for k in INPUT_KEYS:
        if q.get(k):
            if k == "section" and q[k] not in SECTIONS:
                continue
            ss[k] = q[k]
    if q.get("ask") == "1" and q.get("draft"):
        on_ask()


def main() -> None:
    st.set_page_config(page_title=TITLE, layout="wide")
    st.title(TITLE)
    try:
        settings = page_settings()
    except ValueError as e:
        st.error(f"設定エラー / Bad settings: {e}")
        return
    init_state(settings)
    prefill_from_query()
    sidebar(settings)
    left, middle, right = st.columns(3)
    with left:
        draft_column()
    with middle:
        output_column()
    with right:
        diff_column()
    history(settings)


if __name__ == "__main__":
    main()
