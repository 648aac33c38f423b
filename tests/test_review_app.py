"""The review page driven by Streamlit's AppTest: draft -> Ask LLM (a real vLLM server for the slow
tests) -> edit -> Save Changes -> history; the error path with nothing listening; settings; the
fact-fidelity check before saving (tests/fault_server.py answers with the draft); and a screenshot of
the running page with headless Chromium."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_server import FaultServer  # noqa: E402

from benchmarks.fidelity import compare
from recipes.prompt import PROMPT_VERSION, build_messages
from recipes.schema import normalize_text
from benchmarks.serve import free_port
from review_app.screenshot import find_chromium, png_size, screenshot
from review_app.settings import ENV, Settings, add_arguments, from_args
from review_app.diff import Mark, marked_html
from review_app.store import Review, ReviewStore

APP = str(Path(__file__).resolve().parents[1] / "review_app" / "app.py")
DRAFT = "ﾌｧﾝﾄﾞの基準価額は上昇しました。米国株は<好調>でした。"
FUND, SECTION, MONTH = "グローバル株式ファンド", "運用状況", "2024-06"


@pytest.fixture
def db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'review.db'}"


@pytest.fixture
def app_env(monkeypatch, db_url):
    """Point the page at a fresh database; tests add the endpoint. Unset REVIEW_* from outside."""
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("REVIEW_DB_URL", db_url)
    monkeypatch.setenv("REVIEW_USER", "reviewer1")
    monkeypatch.setenv("REVIEW_MAX_RETRIES", "0")

    def set_env(**kw):
        for k, v in kw.items():
            monkeypatch.setenv(ENV[k], str(v))
    return set_env


def _page(timeout: float = 30):
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(APP, default_timeout=timeout)
    at.run()
    assert not at.exception, at.exception
    return at


def _fill(at, draft=DRAFT, fund=FUND, section=SECTION, month=MONTH):
    at.text_input(key="fund").input(fund)
    at.selectbox(key="section").select(section)
    at.text_input(key="month").input(month)
    at.text_area(key="draft").input(draft)
    return at


def _keys(widgets) -> set:
    return {w.key for w in widgets}


# ---------------------------------------------------------------------------------------------
# Without a model server


def test_server_down_shows_an_error_and_saves_nothing(app_env, db_url):
    port = free_port()  # nothing listens there
    app_env(base_url=f"http://127.0.0.1:{port}/v1", timeout=5)
    at = _fill(_page())
    at.button(key="ask").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "Cannot reach the model server" in errors[0] and f":{port}/v1" in errors[0]
    assert "edited" not in _keys(at.text_area) and "save" not in _keys(at.button)
    assert ReviewStore(db_url).count() == 0
    assert at.text_area(key="draft").value == DRAFT  # the draft is kept for the next try


@pytest.mark.parametrize("draft, month, message", [
    ("  ", MONTH, "Enter a draft first"),
    (DRAFT, "June 2024", "Bad month 'June 2024'"),
])
def test_inputs_are_checked_before_asking(app_env, db_url, draft, month, message):
    app_env(base_url=f"http://127.0.0.1:{free_port()}/v1")
    at = _fill(_page(), draft=draft, month=month)
    at.button(key="ask").click().run()
    assert [e.value for e in at.error] == [e.value for e in at.error if message in e.value] and len(at.error) == 1


def test_history_lists_saved_reviews(app_env, db_url):
    store = ReviewStore(db_url)
    ids = store.save_many([Review(section="市場動向", month="2024-05", draft="下書きA", model_output="出力A",
                                  final="最終稿A", model="base", fund="F1", user_name="u1"),
                           Review(section="運用状況", month="2024-06", draft="下書きB", model_output="出力B",
                                  final="出力B（修正）", model="lora", adapter="/a/v2", user_name="u2")])
    at = _page()
    table = at.dataframe[0].value
    assert list(table["id"]) == ids[::-1]  # newest first
    assert list(table["final"]) == ["出力B（修正）", "最終稿A"] and list(table["edited chars"]) == [4, 5]
    assert at.selectbox(key="history_id").value == ids[1]
    at.selectbox(key="history_id").select(ids[0]).run()
    assert any("下書きA" == t.value for t in at.text)


def test_inputs_can_come_from_the_url(app_env):
    app_env(base_url=f"http://127.0.0.1:{free_port()}/v1")
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params.update({"draft": DRAFT, "fund": FUND, "section": SECTION, "month": "2024/06"})
    at.run()
    assert at.text_area(key="draft").value == DRAFT and at.text_input(key="fund").value == FUND
    assert at.selectbox(key="section").value == SECTION and at.text_input(key="month").value == "2024/06"
    assert not at.error  # not asked: no ask=1


def test_settings_from_options_and_environment():
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    env = {"REVIEW_MODEL": "from-env", "REVIEW_TIMEOUT": "7", "REVIEW_USER": "u"}
    s = from_args(ap.parse_args(["--db", "sqlite:///x.db", "--base-url", "http://h:9/v1", "--max-tokens", "16"]), env)
    assert (s.db_url, s.base_url, s.model, s.timeout, s.max_tokens, s.user) == (
        "sqlite:///x.db", "http://h:9/v1", "from-env", 7.0, 16, "u")
    assert Settings.from_env(s.to_env()) == s  # what the launcher hands to the page
    assert s.api_key({}) == "EMPTY" and s.api_key({"OPENAI_API_KEY": "k"}) == "k"
    assert Settings(provider="nvidia").api_key({"NVIDIA_API_KEY": "n", "OPENAI_API_KEY": "k"}) == "n"
    with pytest.raises(ValueError, match="REVIEW_TIMEOUT"):
        Settings.from_env({"REVIEW_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="provider"):
        Settings(provider="other")


# ---------------------------------------------------------------------------------------------
# Fact fidelity before saving (a fake OpenAI-compatible server that answers with the draft)

FACT_DRAFT = "ﾌｧﾝﾄﾞの基準価額は前月末比で2.1%上昇しました。TOPIXは<堅調>でした。"
CONFIRM = "数値の相違を確認しました / I have checked the differences"


@pytest.fixture
def echo_server(app_env):
    with FaultServer(models=("echo",)) as server:
        app_env(base_url=server.base_url, model="echo", timeout=10)
        yield server


def _asked(draft=FACT_DRAFT):
    at = _fill(_page(), draft=draft)
    at.button(key="ask").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def _fact_warnings(at) -> list[str]:
    return [w.value for w in at.warning if "difference(s) in numbers or instruments" in w.value]


def test_a_changed_number_is_shown_and_needs_a_confirmation(echo_server, db_url):
    at = _asked()
    answer = at.text_area(key="edited").value
    assert answer == normalize_text(FACT_DRAFT)  # the fake model gives the (normalised) draft back
    # unchanged numbers: said so, no confirmation asked, no marked view
    assert [i.value for i in at.info] == ["数値・銘柄はすべて下書きと一致しています / The numbers and instruments "
                                          "all match the draft (2 checked)"]
    assert not _fact_warnings(at) and not at.checkbox and len(at.html) == 2

    edited = answer.replace("2.1%", "2.3%")
    at.text_area(key="edited").input(edited).run()
    expected = compare(FACT_DRAFT, edited).findings
    assert [f.kind for f in expected] == ["value_changed"]
    warning, = _fact_warnings(at)
    assert "数値・銘柄の相違 1 件 / 1 difference(s)" in warning
    assert f"- `value_changed` {expected[0].message}" in warning and "2.1% (mom) in the draft" in warning
    assert [c.label for c in at.checkbox] == [CONFIRM] and at.checkbox(key="fidelity_ok").value is False
    marked = at.html[2].proto.body  # after the two diffs: the draft and the edited text, facts marked
    assert marked.count('<mark class="fact-finding"') == 2  # 2.1% in the draft, 2.3% in the edit
    assert ">2.1%</mark>" in marked and ">2.3%</mark>" in marked
    assert marked.count('<mark class="fact-fact"') == 2 and ">TOPIX</mark>" in marked  # kept: marked lightly
    assert "&lt;堅調&gt;" in marked and "<堅調>" not in marked

    at.button(key="save").click().run()  # not confirmed: refused, with a message in both languages
    assert [e.value for e in at.error] == ["数値・銘柄が下書きと異なります。相違を確認し「数値の相違を確認しました」にチェックを入れてから"
                                           "保存してください / The numbers or instruments differ from the draft: check "
                                           'the differences and tick "I have checked the differences" before saving']
    assert not at.success and ReviewStore(db_url).count() == 0

    at.checkbox(key="fidelity_ok").check().run()
    edited2 = edited.replace("TOPIX", "日経平均株価")  # edited again after ticking: the tick is cleared
    at.text_area(key="edited").input(edited2).run()
    assert at.checkbox(key="fidelity_ok").value is False
    assert "`missing`" in _fact_warnings(at)[0] and "`added`" in _fact_warnings(at)[0]
    at.button(key="save").click().run()
    assert "check the differences" in at.error[0].value and ReviewStore(db_url).count() == 0

    at.text_area(key="edited").input(edited).run()
    at.checkbox(key="fidelity_ok").check().run()
    at.button(key="save").click().run()
    assert not at.error and [s.value for s in at.success] == ["保存しました / Saved as #1"]

    r = ReviewStore(db_url).get(1)  # read back from the database
    assert (r.draft, r.model_output, r.final) == (FACT_DRAFT, answer, edited)
    assert r.findings == [f.to_dict() for f in expected]
    f = r.findings[0]
    assert f["kind"] == "value_changed" and f["message"] == expected[0].message
    assert r.draft[slice(*f["draft_span"])] == "2.1%" and r.final[slice(*f["final_span"])] == "2.3%"

    fresh = _page()  # the history shows how many findings were saved, and which
    assert list(fresh.dataframe[0].value["findings"]) == [1]
    assert any(f"`value_changed` {expected[0].message}" in m.value for m in fresh.markdown)


def test_a_text_without_findings_saves_as_before(echo_server, db_url):
    at = _asked()
    edited = at.text_area(key="edited").value.replace("でした。", "に推移しました。")  # wording only
    at.text_area(key="edited").input(edited).run()
    assert "all match the draft" in at.info[0].value and not _fact_warnings(at) and not at.checkbox
    at.button(key="save").click().run()
    assert not at.error and [s.value for s in at.success] == ["保存しました / Saved as #1"]
    r = ReviewStore(db_url).get(1)
    assert r.final == edited and r.findings == []
    fresh = _page()
    assert list(fresh.dataframe[0].value["findings"]) == [0]


def test_the_marked_view_escapes_the_text():
    from review_app.app import findings_html
    text = '<script>alert("x")</script> & 2.1%下落 <b>'
    start = text.index("2.1%")
    out = marked_html(text, [Mark(start, start + 4, "finding", 'value changed: "-2.1%" <in> the draft'),
                             Mark(0, 8, "fact", "")])
    assert "<script>" not in out and "<b>" not in out
    assert out.count("<mark") == 2 and out.count("</mark>") == 2
    assert '<mark class="fact-fact" style=' in out and "&lt;script&gt;</mark>" in out
    assert 'title="value changed: &quot;-2.1%&quot; &lt;in&gt; the draft"' in out and ">2.1%</mark>" in out
    assert "alert(&quot;x&quot;)&lt;/script&gt; &amp; " in out and out.endswith(" &lt;b&gt;</div>")
    # overlapping marks: the first one is kept; a span outside the text is an error
    assert marked_html("abcdef", [Mark(1, 4), Mark(2, 5, "fact")]).count("<mark") == 1
    with pytest.raises(ValueError, match="outside a text of 3 characters"):
        marked_html("abc", [Mark(2, 5)])
    draft, final = "米国株は<上昇>、TOPIXは2.1%上昇", "米国株は<上昇>、TOPIXは2.3%上昇"
    page = findings_html(draft, final, compare(draft, final))
    assert page.count("&lt;上昇&gt;") == 2 and "<上昇>" not in page
    assert page.count('<mark class="fact-finding"') == 2 and page.count(">TOPIX</mark>") == 2


# ---------------------------------------------------------------------------------------------
# Against the real OpenAI-compatible server (vLLM CPU, tests/conftest.py)


@pytest.mark.slow
def test_ask_edit_save_and_reload(openai_server, app_env, db_url):
    import openai
    app_env(base_url=openai_server.base_url, model=openai_server.base_model, max_tokens=24, timeout=120)
    at = _fill(_page(timeout=180))
    at.button(key="ask").click().run()
    assert not at.error, [e.value for e in at.error]
    answer = at.text_area(key="edited").value
    # independently: the plain OpenAI client with the training prompt (normalised draft) gives the
    # same greedy answer, so the page asked exactly that
    client = openai.OpenAI(base_url=openai_server.base_url, api_key="EMPTY")
    direct = client.chat.completions.create(
        model=openai_server.base_model, temperature=0, max_tokens=24,
        messages=build_messages(normalize_text(DRAFT), SECTION, MONTH, FUND)).choices[0].message.content
    assert answer and answer == direct.strip()
    draft_diff, edit_diff = (h.proto.body for h in at.html)
    assert "&lt;好調&gt;" in draft_diff or "好調" not in answer  # the draft's <...> is escaped, never markup
    assert "<ins" not in edit_diff and "<del" not in edit_diff  # nothing edited yet

    edited = answer + "（追記）"
    at.text_area(key="edited").input(edited).run()
    edit_diff = at.html[1].proto.body
    assert edit_diff.count("<ins") == 1 and "（追記）</ins>" in edit_diff and "<del" not in edit_diff
    at.button(key="save").click().run()
    assert [s.value for s in at.success] == ["保存しました / Saved as #1"]

    saved = ReviewStore(db_url).recent()
    assert len(saved) == 1
    r = saved[0]
    assert (r.fund, r.section, r.month, r.draft) == (FUND, SECTION, MONTH, DRAFT)
    assert (r.model_output, r.final) == (answer, edited)
    assert (r.model, r.adapter, r.prompt_version, r.user_name) == ("base", None, PROMPT_VERSION, "reviewer1")

    at.button(key="save").click().run()  # pressing again does not save a duplicate
    assert "Already saved as #1" in at.success[0].value and ReviewStore(db_url).count() == 1

    at.text_area(key="draft").input(DRAFT + "追加の文。").run()
    at.button(key="save").click().run()  # the output no longer belongs to the draft
    assert "press Ask LLM again" in at.error[0].value and ReviewStore(db_url).count() == 1

    fresh = _page()  # a reload (new session) shows the saved review in the history
    table = fresh.dataframe[0].value
    assert list(table["id"]) == [1] and list(table["model"]) == ["base"]


@pytest.mark.slow
def test_lora_answer_records_its_adapter(openai_server, app_env, db_url):
    app_env(base_url=openai_server.base_url, max_tokens=8, timeout=120)
    at = _page(timeout=180)
    at.sidebar.text_input(key="model").input(openai_server.lora_model)
    _fill(at).button(key="ask").click().run()
    assert not at.error, [e.value for e in at.error]
    at.button(key="save").click().run()
    r = ReviewStore(db_url).recent()[0]
    assert r.model == openai_server.lora_model
    assert Path(r.adapter).resolve() == Path(openai_server.adapter_dir).resolve()  # as vLLM lists it


@pytest.mark.slow
def test_both_langchain_clients_ask_the_same_question(openai_server):
    """ChatOpenAI (default) and ChatNVIDIA (--provider nvidia) against the same server: same prompt,
    greedy, so the same answer; and an unknown model name is a readable error, not a traceback."""
    from review_app import llm
    s = Settings(base_url=openai_server.base_url, model=openai_server.base_model, max_tokens=12, max_retries=0)
    a = llm.ask(s, DRAFT, SECTION, MONTH, FUND)
    b = llm.ask(replace(s, provider="nvidia"), DRAFT, SECTION, MONTH, FUND)
    assert a.text == b.text and a.model == b.model == "base" and a.adapter is None and a.truncated
    with pytest.raises(llm.LLMError, match="has no model 'nope'"):
        llm.ask(replace(s, model="nope"), DRAFT, SECTION, MONTH, FUND)


def test_prompt_messages_map_to_langchain_roles():
    from review_app.llm import to_langchain
    msgs = to_langchain(build_messages("下書き", SECTION, MONTH, FUND, final="最終"))
    assert [m.type for m in msgs] == ["system", "human", "ai"]
    assert [m.content for m in msgs] == [m["content"] for m in build_messages("下書き", SECTION, MONTH, FUND, "最終")]


# ---------------------------------------------------------------------------------------------
# Screenshot with headless Chromium


@pytest.mark.slow
def test_screenshot_of_the_running_page(tmp_path, db_url):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    settings = Settings(db_url=db_url, base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0, user="shot")
    out = screenshot(tmp_path / "page.png", settings, chromium, draft=DRAFT, fund=FUND, month=MONTH, ask=True,
                     width=1400, height=1000)
    assert png_size(out) == (1400, 1000) and out.stat().st_size > 20_000
    from PIL import Image
    img = Image.open(out).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    background = max(colours)[0]
    # a page that never rendered (e.g. captured before the WebSocket delivered it) is ~99 % white
    assert background / (img.width * img.height) < 0.9
    # the failed ask's error box is in the picture: a large light-red area (Streamlit's alert tint)
    assert any(n > 5000 and r == 255 and 200 < g < 250 and abs(g - b) < 10 for n, (r, g, b) in colours)
