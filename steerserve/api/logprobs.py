"""Per-token log-probabilities in OpenAI's two shapes: chat's ``{"content": [...]}`` and the legacy completions'
parallel lists. The engines give token ids (``engines.base.TokenLogprob``); the token text and bytes come from
the tokenizer, as on vLLM's server (a byte-level piece that is part of a UTF-8 character shows as U+FFFD in
``token`` and exactly in ``bytes``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steerserve.engines.base import TokenLogprob
from steerserve.prompts import PromptRenderer


def _piece(renderer: PromptRenderer, token_id: int) -> tuple[str, list[int]]:
    raw = renderer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _entry(renderer: PromptRenderer, token_id: int, logprob: float) -> dict[str, Any]:
    text, raw = _piece(renderer, token_id)
    return {"token": text, "logprob": logprob, "bytes": raw}


def chat_logprobs(renderer: PromptRenderer, tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion (or of one chunk's tokens)."""
    content = [{**_entry(renderer, t.token_id, t.logprob),
                "top_logprobs": [_entry(renderer, tid, lp) for tid, lp in t.top]} for t in tokens]
    return {"content": content, "refusal": None}


def completion_logprobs(renderer: PromptRenderer, tokens: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """``choices[i].logprobs`` of a completion; ``offset``: characters of this choice's text already sent."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text, _ = _piece(renderer, t.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({_piece(renderer, tid)[0]: lp for tid, lp in t.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
