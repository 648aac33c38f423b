"""The review page (Streamlit): draft -> "Ask LLM" -> edit the model's rewrite -> "Save Changes".

    python -m review_app [--db URL] [--base-url URL] [--model NAME] [--port N]
    streamlit run review_app/app.py          # settings from REVIEW_* variables (review_app.settings)

Left: the draft with its fund, section and month. Middle: the model's corrected comment in an
editable text area, and "Save Changes". Right: character-level diffs draft -> model output and
model output -> edited text. Below: the saved reviews (newest first) and one of them in detail.

What is saved is what the model was actually asked: if the draft, section, month or fund changed
after "Ask LLM", saving is refused until the model is asked again, so every saved triple
(draft, model output, final) belongs together and can be trained on.

Before saving, the edited final is checked against the draft by benchmarks.fidelity (every number
with its unit, sign and period, and every named instrument): the findings are listed above Save
Changes, and the draft and the final are shown with those spans marked. A final with findings is
saved only after "数値の相違を確認しました / I have checked the differences" is ticked (for that very
text: editing it again clears the tick); the findings are saved with the review.
"""
from __future__ import annotations

import datetime as dt
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # `streamlit run review_app/app.py` puts only review_app/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from benchmarks.fidelity import Comparison, Fact, Finding, compare  # noqa: E402
from recipes.schema import SECTIONS, normalize_text, parse_month  # noqa: E402
from recipes.textdiff import char_diff, diff_counts  # noqa: E402
from review_app import llm  # noqa: E402
from review_app.diff import Mark, marked_html, ops_html  # noqa: E402
from review_app.settings import Settings  # noqa: E402
from review_app.store import Review, ReviewStore, safe_url  # noqa: E402

TITLE = "コメントレビュー / Comment review"
INPUT_KEYS = ("fund", "section", "month", "draft")
CONFIRM_KEY = "fidelity_ok"
CONFIRM_LABEL = "数値の相違を確認しました / I have checked the differences"
CONFIRM_NEEDED = ("数値・銘柄が下書きと異なります。相違を確認し「数値の相違を確認しました」にチェックを入れてから保存してください / "
                  "The numbers or instruments differ from the draft: check the differences and tick "
                  "\"I have checked the differences\" before saving")
LABEL_STYLE = "font-size:0.85rem;color:#57606a;margin:0.5em 0 0.2em"


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


def check_facts(draft: str, final: str) -> Comparison:
    """The fact-fidelity findings of ``final`` against ``draft`` (the draft as entered, so that the
    saved spans index the saved draft and final)."""
    return compare(draft, final)


def fact_marks(facts: list[Fact], findings: list[Finding], side: str) -> list[Mark]:
    """Marks for one side (``draft`` or ``final``): the span of each finding (tooltip: kind and
    message), and the other facts found there, marked lightly."""
    by_span: dict[tuple[int, int], list[str]] = {}
    for f in findings:
        span = f.draft_span if side == "draft" else f.final_span
        if span:
            by_span.setdefault((span[0], span[1]), []).append(f"{f.kind}: {f.message}")
    marks = [Mark(a, b, "finding", "; ".join(msgs)) for (a, b), msgs in by_span.items()]
    return marks + [Mark(x.start, x.end, "fact", x.describe()) for x in facts if (x.start, x.end) not in by_span]


def findings_html(draft: str, final: str, comparison: Comparison) -> str:
    """The draft and the final, each with its facts marked (findings strongly), as escaped HTML."""
    parts = []
    for label, text, facts, side in (("下書き / Draft", draft, comparison.draft_facts, "draft"),
                                     ("編集後 / Edited", final, comparison.final_facts, "final")):
        parts.append(f'<div style="{LABEL_STYLE}">{label}</div>')
        parts.append(marked_html(text, fact_marks(facts, comparison.findings, side)))
    return '<div class="fact-check">' + "".join(parts) + "</div>"


def _md(text: str) -> str:
    """Text shown literally inside Streamlit markdown (its markup characters escaped)."""
    return "".join("\\" + c if c in "\\`*_[]<>#|$~" else c for c in text)


def findings_markdown(findings: list[dict] | list[Finding]) -> str:
    """One markdown line per finding: its kind and message (Finding objects or saved dicts)."""
    items = [f if isinstance(f, dict) else f.to_dict() for f in findings]
    return "\n".join(f"- `{str(f.get('kind', '?')).replace('`', '')}` {_md(str(f.get('message', '')))}"
                     for f in items)


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
    clear_confirmation()


def clear_confirmation() -> None:
    """A new text needs a new confirmation (on a new answer, and as the final's on_change)."""
    ss = st.session_state
    ss[CONFIRM_KEY] = False
    ss.pop("confirmed_for", None)


def on_confirm() -> None:
    """Record which (draft, final) the differences were confirmed for."""
    ss = st.session_state
    asked = ss.get("asked")
    if ss.get(CONFIRM_KEY) and asked:
        ss["confirmed_for"] = (asked["draft"], ss.get("edited") or "")
    else:
        ss.pop("confirmed_for", None)


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
    comparison = check_facts(asked["draft"], final)  # again here: what is saved is what is checked now
    if comparison.findings and not (ss.get(CONFIRM_KEY) and ss.get("confirmed_for") == (asked["draft"], final)):
        ss["save_error"] = CONFIRM_NEEDED
        return
    settings = page_settings()
    review = Review(fund=asked["fund"], section=asked["section"], month=asked["month"], draft=asked["draft"],
                    model_output=asked["output"], final=final, model=asked["model"], adapter=asked["adapter"],
                    prompt_version=asked["prompt_version"], user_name=settings.user,
                    findings=[f.to_dict() for f in comparison.findings])
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
    st.text_area("最終稿（編集可） / Final (editable)", key="edited", height=320, on_change=clear_confirmation)
    st.caption(f"{asked['model']}" + (f" + {asked['adapter']}" if asked["adapter"] else "")
               + f" · prompt {asked['prompt_version']} · {asked['seconds']:.1f} s")
    if asked["truncated"]:
        st.warning("出力が max_tokens で途切れています / The answer was cut off at max_tokens")
    fact_check(asked["draft"], ss.get("edited") or "")
    st.button("変更を保存 / Save Changes", key="save", type="primary", on_click=on_save)
    if ss.get("save_error"):
        st.error(ss["save_error"])
    if ss.get("save_ok"):
        st.success(ss["save_ok"])


def fact_check(draft: str, final: str) -> None:
    """The findings of the edited final against the draft, and the confirmation they need."""
    comparison = check_facts(draft, final)
    n = len(comparison.findings)
    if not n:
        st.info(f"数値・銘柄はすべて下書きと一致しています / The numbers and instruments all match the draft "
                f"({comparison.kept} checked)")
        return
    st.warning(f"**数値・銘柄の相違 {n} 件 / {n} difference(s) in numbers or instruments** "
               "(下書き → 編集後 / draft → edited; marked under Diff)\n\n" + findings_markdown(comparison.findings))
    st.checkbox(CONFIRM_LABEL, key=CONFIRM_KEY, on_change=on_confirm)


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
    final = ss.get("edited") or ""
    comparison = check_facts(asked["draft"], final)
    if comparison.findings:
        st.markdown(f"**数値・銘柄 下書き → 編集後 / Numbers and instruments, draft → edited**  \n"
                    f"{len(comparison.findings)} 件の相違を強調表示 / {len(comparison.findings)} difference(s) marked")
        st.html(findings_html(asked["draft"], final, comparison))


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
                     "findings": None if r.findings is None else len(r.findings),
                     "final": r.final[:60] + ("…" if len(r.final) > 60 else "")})
    st.dataframe(rows, hide_index=True)
    chosen = st.selectbox("詳細 / Details", [r.id for r in items], key="history_id",
                          format_func=lambda i: f"#{i}")
    r = next(x for x in items if x.id == chosen)
    with st.expander(f"#{r.id} {r.section} {r.month} {r.fund or ''}", expanded=False):
        st.text(r.draft)
        if r.findings is None:
            st.caption("数値チェック前に保存 / Saved before the number check")
        elif not r.findings:
            st.caption("数値・銘柄の相違なし / No differences in numbers or instruments")
        else:
            st.markdown(f"**保存時の数値・銘柄の相違 {len(r.findings)} 件 / {len(r.findings)} difference(s) in numbers "
                        "or instruments when saved**\n\n" + findings_markdown(r.findings))
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
