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


@pytest.mark.parametrize("template", [
    "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n",  # ChatML
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{u}<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\n",  # Llama 3
    "<s>[INST] {u} [/INST]",  # Mistral
], ids=["chatml", "llama3", "mistral"])
def test_draft_from_prompt_finds_the_draft_in_a_rendered_prompt(template):
    from recipes.prompt import draft_from_prompt, user_message

    draft = "TOPIXは前月末比-2.1%となった。\n\n下落した。"
    assert draft_from_prompt(template.format(u=user_message(draft, "市場動向", "2024-06", "F"))) == draft


def test_draft_from_prompt_is_none_without_a_draft_or_a_marker():
    from recipes.prompt import draft_from_prompt, user_message

    assert draft_from_prompt("<|im_start|>user\nただの文章<|im_end|>") is None
    assert draft_from_prompt(user_message("上昇した。", "市場動向", "2024-06")) is None  # not rendered
