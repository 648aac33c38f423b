"""recipes.prompt: the message layout and its inverse (used to show a prepared test row in the app)."""
import pytest

from recipes.prompt import build_messages, parse_user_message


@pytest.mark.parametrize("fund", ["日本株式ファンド", None])
def test_parse_user_message_inverts_the_layout(fund):
    draft = "当月の国内株式市場は上昇した。\n\n見通し: 慎重に見る。"  # blank line and ': ' inside the draft
    msgs = build_messages(draft, "市場動向", "2024-06", fund)
    assert parse_user_message(msgs[1]["content"]) == {"draft": draft, "section": "市場動向", "date": "2024-06",
                                                      "fund": fund}


def test_parse_user_message_rejects_other_text():
    with pytest.raises(ValueError, match="下書き"):
        parse_user_message("ただの文章")
