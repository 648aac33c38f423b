"""The one place that decides how a draft comment is shown to the model.

Data preparation, both training backends, generation, evaluation against served endpoints and the
review app all build their chat messages here, so a model is always asked the way it was trained.
Bump PROMPT_VERSION whenever the wording or layout changes: saved reviews record it.
"""
from __future__ import annotations

PROMPT_VERSION = "v1"

# Short on purpose: with SmolLM2's English-centric tokenizer a Japanese character costs ~1.8 tokens,
# and every token of the system prompt is paid in every training step and every request.
SYSTEM_PROMPT = "下書きを当社ハウススタイルの最終稿に書き直してください。数値と事実は変えません。"


def user_message(draft: str, section: str, date: str, fund: str | None = None) -> str:
    """The user turn: metadata lines, then the draft."""
    head = [f"対象月: {date}", f"セクション: {section}"]
    if fund:
        head.insert(0, f"ファンド: {fund}")
    return "\n".join(head) + "\n\n下書き:\n" + draft


def parse_user_message(text: str) -> dict[str, str | None]:
    """Inverse of user_message: {"draft", "section", "date", "fund"} of a user turn built here."""
    head, sep, draft = text.partition("\n\n下書き:\n")
    if not sep:
        raise ValueError("not a user message built by recipes.prompt.user_message (no '下書き:' line)")
    fields = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
    return {"draft": draft, "section": fields.get("セクション"), "date": fields.get("対象月"),
            "fund": fields.get("ファンド")}


# What chat templates write after the user turn's content (ChatML/SmolLM2/Qwen2, Llama 3, Mistral/Llama 2,
# Gemma, Phi-3): a rendered prompt's draft ends at the first of them.
_END_OF_USER_TURN = ("<|im_end|>", "<|eot_id|>", "[/INST]", "</s>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
                     "<|im_start|>", "<|start_header_id|>")


def draft_from_prompt(rendered: str) -> str | None:
    """The draft inside a prompt rendered with a chat template (the NeMo-format ``input``): the text after
    the ``下書き:`` line of :func:`user_message` up to the template's end-of-turn marker (trailing
    whitespace dropped). None when the prompt holds no user message built here or no known marker
    follows it."""
    _, sep, tail = rendered.partition("\n\n下書き:\n")
    if not sep:
        return None
    cuts = [i for i in (tail.find(m) for m in _END_OF_USER_TURN) if i >= 0]
    return tail[:min(cuts)].rstrip() if cuts else None


def build_messages(draft: str, section: str, date: str, fund: str | None = None,
                   final: str | None = None) -> list[dict[str, str]]:
    """OpenAI-style chat messages; with ``final`` the assistant turn is included (training)."""
    msgs = [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_message(draft, section, date, fund)}]
    if final is not None:
        msgs.append({"role": "assistant", "content": final})
    return msgs


_SLOT = "\x00user-content\x00"  # no normalised text holds a NUL (recipes.schema.normalize_text removes them)


def prompt_renderer(tokenizer, system: str = SYSTEM_PROMPT):
    """A function ``user content -> rendered prompt`` equal to :func:`render_prompt` of
    ``[system, user]`` messages, rendering the chat template once: the template is rendered with a slot
    for the user content, which is then substituted. The substitution is used only when the template
    inserts the content verbatim, checked on probe contents (whitespace at both ends, newlines, braces, a
    template-looking string); otherwise every call renders the template (always correct, slower)."""
    def direct(content: str) -> str:
        return render_prompt(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": content}])

    shell = direct(_SLOT)
    if shell.count(_SLOT) != 1:
        return direct
    head, tail = shell.split(_SLOT)
    probes = (" 前後に空白 \n", "下書き:\n{{ x }} {% if %}\n\n二行", "<|im_end|> [INST] \\n", "a")
    if any(direct(p) != head + p + tail for p in probes):
        return direct
    return lambda content: head + content + tail


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text up to and including the assistant header, rendered with the model's own
    chat template (tokenizer_config.json). The completion follows it directly, without a space."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template")
    msgs = [m for m in messages if m["role"] != "assistant"]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
