"""Turning a request's ``prompt`` or ``messages`` into token ids, and finding where the user's text starts."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError

from steerserve.errors import SteerError
from steerserve.spec import PromptInfo

# Settings.max_prompt_chars' default, for callers that do not pass the server's setting.
DEFAULT_MAX_PROMPT_CHARS = 65536


@functools.cache
def _byte_level() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte, reversed: character -> byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


def has_lone_surrogate(text: str) -> bool:
    """True when ``text`` holds a lone UTF-16 surrogate (``"\\ud800"`` in JSON), which no tokenizer can encode."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


ROLES = ("system", "user", "assistant", "tool")


class PromptRenderer:
    """Wraps a transformers tokenizer. Chat requests use the model's own chat template, or the one given.

    Text is checked (length in characters, encodability) before the tokenizer sees it: tokenizing costs
    time in proportion to the text, and the token limit alone would only be checked after paying it.
    """

    def __init__(self, tokenizer: Any, max_prompt_tokens: int,
                 max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.max_prompt_chars = max_prompt_chars
        self.chat_template = chat_template  # Jinja text used instead of the tokenizer's own (None: its own)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level BPE piece may be part of a UTF-8 character)."""
        piece, byte_of = str(self.tokenizer.convert_ids_to_tokens(token_id)), _byte_level()
        if all(ch in byte_of for ch in piece):
            return bytes(byte_of[ch] for ch in piece)
        return str(self.tokenizer.decode([token_id])).encode()  # not byte-level (e.g. SentencePiece)

    def render(self, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None,
               where: str = "prompt", tools: Sequence[Mapping[str, Any]] | None = None) -> PromptInfo:
        """Exactly one of ``prompt`` (raw text) and ``messages`` (chat) must be given and be non-empty.
        ``tools`` (OpenAI function definitions) go to the chat template, which may use or ignore them, as do a
        message's other keys (an assistant message's ``tool_calls``, a ``tool`` message's ``tool_call_id``)."""
        if (prompt is None) == (messages is None):
            raise SteerError("give exactly one of 'prompt' and 'messages'", field=where)
        if prompt is not None:
            self._check_text(prompt, len(prompt), where, "is")
            if not prompt.strip():
                raise SteerError("must not be empty", field=where)
            return self._checked(PromptInfo(tuple(self.tokenize(prompt)), 0), where)
        assert messages is not None
        if not messages:
            raise SteerError("must not be empty", field="messages")
        total = 0
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise SteerError("must be 'system', 'user', 'assistant' or 'tool'", field=f"messages.{i}.role")
            content = m.get("content")
            if not isinstance(content, str):
                raise SteerError("must be a string", field=f"messages.{i}.content")
            total += len(content)  # the limit is on all messages together: they are tokenized as one text
            self._check_text(content, total, f"messages.{i}.content", "brings the messages to")
        if not any(m["content"].strip() or m.get("tool_calls") for m in messages):
            raise SteerError("every message is empty", field="messages")
        extra: dict[str, Any] = {"tools": [dict(t) for t in tools]} if tools else {}
        if self.chat_template is not None:
            extra["chat_template"] = self.chat_template
        try:
            text = self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                      add_generation_prompt=True, **extra)
        except TemplateError as exc:  # the template's own refusal (raise_exception), e.g. of a role it lacks
            raise SteerError(f"the chat template cannot render these messages: {exc}", field="messages") from exc
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        return self._checked(PromptInfo(tuple(ids), self._user_start(text, messages, enc["offset_mapping"])),
                             "messages")

    def _check_text(self, text: str, total: int, where: str, verb: str) -> None:
        """Refuse text that would be slow to tokenize (``total`` characters so far) or cannot be encoded."""
        if total > self.max_prompt_chars:
            raise SteerError(f"{verb} {total} characters; the limit is {self.max_prompt_chars}", field=where,
                             code="prompt_too_long")
        if has_lone_surrogate(text):
            raise SteerError("contains a lone UTF-16 surrogate (not valid Unicode text)", field=where,
                             code="invalid_unicode")

    @staticmethod
    def _user_start(text: str, messages: Sequence[Mapping[str, Any]], offsets: Sequence[tuple[int, int]]) -> int:
        """Token index of the first character of the last user message's content in the rendered text."""
        users = [m["content"] for m in messages if m["role"] == "user" and m["content"]]
        if not users:
            return 0
        char = text.rfind(users[-1])
        if char < 0:
            return 0
        return next((i for i, (a, b) in enumerate(offsets) if b > char), len(offsets))

    def _checked(self, info: PromptInfo, where: str) -> PromptInfo:
        if not info.token_ids:
            raise SteerError("tokenizes to nothing", field=where)
        if len(info.token_ids) > self.max_prompt_tokens:
            raise SteerError(f"is {len(info.token_ids)} tokens; the limit is {self.max_prompt_tokens}", field=where)
        return info
