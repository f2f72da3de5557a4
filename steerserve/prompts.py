"""Turning a request's ``prompt`` or ``messages`` into token ids, and finding where the user's text starts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from steerserve.errors import SteerError
from steerserve.spec import PromptInfo


class PromptRenderer:
    """Wraps a transformers tokenizer. Chat requests use the model's own chat template."""

    def __init__(self, tokenizer: Any, max_prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def render(self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
               where: str = "prompt") -> PromptInfo:
        """Exactly one of ``prompt`` (raw text) and ``messages`` (chat) must be given and be non-empty."""
        if (prompt is None) == (messages is None):
            raise SteerError("give exactly one of 'prompt' and 'messages'", field=where)
        if prompt is not None:
            if not prompt.strip():
                raise SteerError("must not be empty", field=where)
            return self._checked(PromptInfo(tuple(self.tokenize(prompt)), 0), where)
        assert messages is not None
        if not messages:
            raise SteerError("must not be empty", field="messages")
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant"):
                raise SteerError("must be 'system', 'user' or 'assistant'", field=f"messages.{i}.role")
            if not isinstance(m.get("content"), str):
                raise SteerError("must be a string", field=f"messages.{i}.content")
        if not any(m["content"].strip() for m in messages):
            raise SteerError("every message is empty", field="messages")
        text = self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                  add_generation_prompt=True)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        return self._checked(PromptInfo(tuple(ids), self._user_start(text, messages, enc["offset_mapping"])),
                             "messages")

    @staticmethod
    def _user_start(text: str, messages: Sequence[Mapping[str, str]], offsets: Sequence[tuple[int, int]]) -> int:
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
