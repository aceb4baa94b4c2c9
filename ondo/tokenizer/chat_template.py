"""Chat templates: turning a list of messages into the prompt text a chat model was trained on.

The template is the model's own (tokenizer_config.json `chat_template`, a `chat_template.jinja`
file, or the GGUF metadata key `tokenizer.chat_template`) unless the user passes one. Rendering
goes through the tokenizer's `apply_chat_template`, i.e. the same sandboxed jinja2 environment
(`raise_exception`, `tojson`, `strftime_now`, ...) transformers uses, so ondo's prompts are
byte-for-byte the ones the model saw in training.

Some templates (Gemma's) reject the "system" role. Rather than failing the request, ondo folds the
system text into the first user turn -- what those models' authors recommend -- and warns once.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import jinja2

_TEMPLATE_FILE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt", ".tmpl")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered: no template, or the template rejected the messages."""


def resolve_chat_template(value: str | os.PathLike | None) -> str | None:
    """A user-supplied chat template: jinja source text, or the path of a file that holds it."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"chat_template must be a jinja string or a file path, got {type(value).__name__}")
    looks_like_jinja = "{{" in value or "{%" in value
    if not looks_like_jinja and "\n" not in value:
        path = Path(value).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        if path.suffix in _TEMPLATE_FILE_SUFFIXES or os.sep in value:
            raise FileNotFoundError(f"chat_template file not found: {value!r}")
    if not value.strip():
        raise ChatTemplateError("chat_template must not be empty")
    return value


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the shape of a conversation and return it as a list of dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{index}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{index}].role must be a non-empty string, got {role!r}")
    return list(messages)


def fold_system_into_first_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge the system messages into the first user turn as "{system}\\n\\n{user}"."""
    system_texts = [_content_text(m.get("content")) for m in messages if m["role"] == "system"]
    system_text = "\n\n".join(t for t in system_texts if t)
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for message in rest:
        if message["role"] == "user":
            message["content"] = _prepend_text(system_text, message.get("content"))
            return rest
    # No user turn to carry it: the system text becomes the user turn.
    return [{"role": "user", "content": system_text}, *rest]


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _prepend_text(prefix: str, content: Any) -> Any:
    if not prefix:
        return content
    if isinstance(content, list):
        return [{"type": "text", "text": prefix + "\n\n"}, *content]
    user_text = _content_text(content)
    return f"{prefix}\n\n{user_text}" if user_text else prefix


def _rejects_system_role(error: Exception) -> bool:
    return "system" in str(error).lower()


def render_chat_template(
    apply: Any,
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict] | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `messages` with `template` as transformers does; returns the prompt text. `apply`: a
    transformers tokenizer (its `apply_chat_template`), or a function taking (conversation, template,
    **options) as `jinja_chat.render` does (`PlainTokenizer.render`)."""
    messages = validate_messages(messages)
    if continue_final_message:
        # Continuing the last (assistant) message and opening a new turn are exclusive; the
        # continuation wins because it is the more specific request.
        add_generation_prompt = False
    options = dict(tools=tools, add_generation_prompt=add_generation_prompt,
                   continue_final_message=continue_final_message, **template_kwargs)

    def render(conversation: list[dict[str, Any]]) -> str:
        if callable(getattr(apply, "apply_chat_template", None)):
            return apply.apply_chat_template(conversation, chat_template=template, tokenize=False, **options)
        return apply(conversation, template, **options)

    try:
        return render(messages)
    except jinja2.TemplateError as error:
        has_system = any(m["role"] == "system" for m in messages)
        if not (has_system and _rejects_system_role(error)):
            raise ChatTemplateError(f"the chat template rejected the conversation: {error}") from error
        message = (
            f"the chat template does not accept a system message ({error}); "
            "folding it into the first user message"
        )
        warnings.warn(message, stacklevel=3)
        try:
            return render(fold_system_into_first_user(messages))
        except jinja2.TemplateError as second_error:
            raise ChatTemplateError(f"the chat template rejected the conversation: {second_error}") from second_error
    except TypeError as error:   # the template met a message of a shape it does not handle (content parts, ...)
        raise ChatTemplateError(f"the chat template rejected the conversation: {error}") from error
    except ValueError as error:
        # transformers reports bad continue_final_message use etc. as ValueError.
        if isinstance(error, ChatTemplateError):
            raise
        raise ChatTemplateError(str(error)) from error
