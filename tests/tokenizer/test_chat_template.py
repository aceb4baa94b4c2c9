"""Chat templates: token ids equal transformers' apply_chat_template; Gemma-style system fold-in."""
from __future__ import annotations

import warnings

import pytest

from ondo.tokenizer import ChatTemplateError, load_tokenizer
from ondo.tokenizer.chat_template import fold_system_into_first_user, resolve_chat_template

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one word."}
MULTI_TURN = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Korea? 한국어로 답해 주세요."},
]
FEW_SHOT = [
    {"role": "user", "content": "Translate to French: cat"},
    {"role": "assistant", "content": "chat"},
    {"role": "user", "content": "Translate to French: dog"},
    {"role": "assistant", "content": "chien"},
    {"role": "user", "content": "Translate to French: bird"},
]
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi there 👋"}],
    "multi_turn": MULTI_TURN,
    "few_shot": FEW_SHOT,
    "system": [SYSTEM, *MULTI_TURN],
}

# Gemma's template, reduced to its structure: it refuses a system turn outright.
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def reference_ids(tok, messages, **kwargs):
    return list(tok.hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(smollm2_tokenizer, name, add_generation_prompt):
    tok = smollm2_tokenizer
    messages = CONVERSATIONS[name]
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == reference_ids(tok, messages, add_generation_prompt=add_generation_prompt)
    text = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text.endswith("<|im_start|>assistant\n") is add_generation_prompt
    assert tok.encode(text, add_special_tokens=False) == ids


def test_smollm2_system_prompt_replaces_default(smollm2_tokenizer):
    text = smollm2_tokenizer.render_chat([SYSTEM, *MULTI_TURN])
    assert SYSTEM["content"] in text and "named SmolLM" not in text
    assert "named SmolLM" in smollm2_tokenizer.render_chat(MULTI_TURN)


def test_continue_final_message(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [*MULTI_TURN, {"role": "assistant", "content": "The capital of Korea is"}]
    ids = tok.apply_chat_template(messages, continue_final_message=True)
    assert ids == reference_ids(tok, messages, continue_final_message=True)
    assert tok.render_chat(messages, continue_final_message=True).endswith("The capital of Korea is")


def test_gemma_style_template_folds_system_into_first_user(tiny_bpe_folder):
    tok = load_tokenizer(tiny_bpe_folder, chat_template=GEMMA_STYLE_TEMPLATE)
    with pytest.warns(UserWarning, match="system message"):
        text = tok.render_chat([SYSTEM, *MULTI_TURN])
    folded = [{"role": "user", "content": f"{SYSTEM['content']}\n\n{MULTI_TURN[0]['content']}"}, *MULTI_TURN[1:]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no system message: no warning
        assert text == tok.render_chat(folded)
    assert text.startswith(f"<s><start_of_turn>user\n{SYSTEM['content']}\n\n{MULTI_TURN[0]['content']}<end_of_turn>")
    assert text.endswith("<start_of_turn>model\n")


def test_gemma_style_fold_in_token_ids(tiny_bpe_folder):
    tok = load_tokenizer(tiny_bpe_folder, chat_template=GEMMA_STYLE_TEMPLATE)
    folded = fold_system_into_first_user([SYSTEM, *FEW_SHOT])
    with pytest.warns(UserWarning):
        ids = tok.apply_chat_template([SYSTEM, *FEW_SHOT])
    assert ids == reference_ids(tok, folded, add_generation_prompt=True, chat_template=GEMMA_STYLE_TEMPLATE)


def test_fold_without_user_turn():
    assert fold_system_into_first_user([SYSTEM]) == [{"role": "user", "content": SYSTEM["content"]}]
    parts = [{"type": "text", "text": "hi"}]
    folded = fold_system_into_first_user([SYSTEM, {"role": "user", "content": parts}])
    assert folded[0]["content"][0] == {"type": "text", "text": SYSTEM["content"] + "\n\n"}


def test_model_without_template_raises(tmp_path):
    from tests.tokenizer.conftest import build_tiny_bpe

    tok = load_tokenizer(build_tiny_bpe(tmp_path, chat_template=None))
    with pytest.raises(ChatTemplateError, match="no chat template.*--chat-template"):
        tok.apply_chat_template(MULTI_TURN)


def test_template_errors_are_chat_template_errors(tiny_bpe_folder):
    tok = load_tokenizer(tiny_bpe_folder, chat_template="{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.render_chat(MULTI_TURN)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([{"content": "no role"}], r"messages\[0\]\.role must be a non-empty string, got None"),
])
def test_bad_messages(smollm2_tokenizer, messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        smollm2_tokenizer.render_chat(messages)


def test_resolve_chat_template(tmp_path):
    assert resolve_chat_template(None) is None
    assert resolve_chat_template("{{ messages }}") == "{{ messages }}"
    file = tmp_path / "t.jinja"
    file.write_text("{{ messages }}")
    assert resolve_chat_template(file) == "{{ messages }}"
    with pytest.raises(ChatTemplateError, match="must not be empty"):
        resolve_chat_template("   ")
