"""A tokenizer's own chat template (the `chat_template` of the tokenizer_config.json beside its
tokenizer.json, as Hugging Face ships them), rendered with Jinja in a sandbox, cut into the
pieces that carry loss (the assistant's answers) and the pieces that do not.

The template renders a whole conversation; the pieces come from rendering it one message longer
at a time: message i's piece is what rendering messages[:i + 1] adds to messages[:i]. Within an
assistant's piece, the text before its content (the role header) is prompt, the content and what
follows it (the end-of-turn marker) the answer. A template whose renderings are not prefixes of
one another cannot be cut so, and is refused in one line.
"""
from __future__ import annotations

import json
from pathlib import Path

from loom.data.prepare import PrepareError

CONFIG_NAME = "tokenizer_config.json"


class ChatTemplate:
    """messages [{"role", "content"}, ...] -> [(text, carries loss), ...]."""

    def __init__(self, source: str, special: dict[str, str], where: str):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise PrepareError(f"{where}: its chat_template is not a Jinja template ({e})") from None
        self.special, self.where = special, where

    def render(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=False, **self.special)
        except (TemplateError, TypeError, ValueError) as e:
            raise PrepareError(f"{self.where}: its chat_template failed on a conversation ({e})") from None

    def segments(self, messages: list[dict], where: str) -> list[tuple[str, bool]]:
        pieces, before = [], ""
        for i, message in enumerate(messages):
            text = self.render(messages[: i + 1])
            if not text.startswith(before):
                raise PrepareError(f"{where}: the chat template of {self.where} renders this conversation so that "
                                   f"its message {i} rewrites the text before it; loom cannot tell the answers "
                                   f"apart (remove tokenizer_config.json's chat_template to use loom's plain one)")
            piece, before = text[len(before):], text
            if message["role"] != "assistant":
                pieces.append((piece, False))
                continue
            at = piece.find(message["content"])
            if at < 0:
                raise PrepareError(f"{where}: the chat template of {self.where} does not render messages[{i}]'s "
                                   f"content as it is; loom cannot tell which tokens are the answer")
            pieces += [(piece[:at], False), (piece[at:], True)]
        return [(text, loss) for text, loss in pieces if text]


def _raise(message: str):
    raise ValueError(message)


def _token_text(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def find_chat_template(tokenizer_path: str | Path) -> ChatTemplate | None:
    """The chat template of the tokenizer_config.json beside `tokenizer_path`, or None."""
    config_path = Path(tokenizer_path).with_name(CONFIG_NAME)
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepareError(f"{config_path} is not JSON ({e})") from None
    source = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(source, list):  # named templates: the default one
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str) or not source.strip():
        return None
    special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return ChatTemplate(source, special, str(config_path))
