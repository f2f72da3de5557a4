"""Every request body the HTTP edge accepts, as pydantic models (pydantic never leaves steerserve.api).

Models parse types only (strict: no "1" for 1, no "true" for true); ranges, prompt rules and the steering
spec are checked by the service, which names the offending field itself. OpenAI-compatible bodies allow
unknown fields (clients send many); ``unsupported()`` rejects the values of known fields we cannot honour.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from steerserve.errors import SteerError

Stop = str | list[str] | None
# A 64-bit signed seed: torch cannot seed from wider integers, and the error would surface in the engine's
# thread rather than here.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _OpenAI(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


# ---- native -----------------------------------------------------------------------------------------


class Message(_Strict):
    role: str
    content: str


class GenerateRequest(_Strict):
    prompt: str | None = None
    messages: list[Message] | None = None
    max_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = None
    seed: Seed = None
    stop: Stop = None
    ignore_eos: bool = False  # keep generating past the end-of-sequence token (benchmarks)
    stream: bool = False
    steering: dict[str, Any] | None = None


# ---- OpenAI-compatible ------------------------------------------------------------------------------


class StreamOptions(_OpenAI):
    include_usage: bool | None = None


class ContentPart(_OpenAI):
    type: str
    text: str | None = None


class ChatMessage(_OpenAI):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self, where: str) -> str:
        """The message's text; content parts other than text are refused, naming the part."""
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            raise SteerError("must be a string (tool calls are not supported)", field=f"{where}.content")
        texts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise SteerError(f"content part type {part.type!r} is not supported; only 'text'",
                                 field=f"{where}.content.{j}.type")
            texts.append(part.text)
        return "".join(texts)


def _refuse(field: str, value: Any, ok: bool, why: str) -> None:
    if value is not None and not ok:
        raise SteerError(why, field=field, code="unsupported_value")


class CompletionBase(_OpenAI):
    """Fields shared by chat completions and completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Seed = None
    stop: Stop = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens regardless of EOS
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    steering: dict[str, Any] | None = None

    def unsupported(self) -> None:
        """Refuse values this server cannot honour, naming the field (a 400, never a silent ignore)."""
        _refuse("n", self.n, self.n == 1, "only n=1 is supported")
        for key in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, key)
            _refuse(key, value, value == 0, "penalties are not supported; use 0 or omit it")
        _refuse("logit_bias", self.logit_bias, not self.logit_bias, "logit_bias is not supported")


class ChatCompletionRequest(CompletionBase):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None

    def unsupported(self) -> None:
        super().unsupported()
        _refuse("logprobs", self.logprobs, self.logprobs is False, "logprobs are not supported")
        _refuse("top_logprobs", self.top_logprobs, self.top_logprobs == 0, "logprobs are not supported")
        _refuse("tools", self.tools, not self.tools, "tools are not supported")
        _refuse("tool_choice", self.tool_choice, self.tool_choice in ("none", "auto"), "tools are not supported")
        fmt = self.response_format
        _refuse("response_format", fmt, fmt is not None and fmt.get("type") == "text",
                "only response_format {'type': 'text'} is supported")
        _refuse("modalities", self.modalities, self.modalities == ["text"], "only the 'text' modality is supported")

    def max_new_tokens(self) -> tuple[int | None, str]:
        """(value, field name): ``max_completion_tokens`` wins over the deprecated ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def plain_messages(self) -> list[dict[str, str]]:
        """``{role, content}`` dicts for the renderer; OpenAI's ``developer`` role is a system message."""
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text(f"messages.{i}")})
        return out


class CompletionRequest(CompletionBase):
    prompt: Any = None  # a string or a list of one string; checked by prompt_text()
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        _refuse("logprobs", self.logprobs, self.logprobs == 0, "logprobs are not supported")
        _refuse("echo", self.echo, self.echo is False, "echo is not supported")
        _refuse("best_of", self.best_of, self.best_of == 1, "only best_of=1 is supported")
        _refuse("suffix", self.suffix, not self.suffix, "suffix is not supported")

    def prompt_text(self) -> str:
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            return p[0]
        if isinstance(p, str):
            return p
        if p is None:
            raise SteerError("is required", field="prompt")
        if isinstance(p, list) and len(p) > 1:
            raise SteerError("batched prompts are not supported: send one prompt per request", field="prompt")
        raise SteerError("must be a string or a list of one string (token ids are not supported)", field="prompt")


# ---- admin ------------------------------------------------------------------------------------------


class VectorUpload(_Strict):
    name: str
    description: str = ""
    vectors: dict[str, list[float]] = Field(description='{"<layer>": [hidden_size floats]}')


class ComputeVector(_Strict):
    name: str
    positive: list[str]
    negative: list[str]
    layers: list[int] | None = None
    description: str = ""
    pooling: Literal["mean", "last"] = "mean"  # mean over each prompt's tokens, or its last token
    chat: bool = False  # render each prompt as a user message with the chat template


class EnableVector(_Strict):
    enabled: bool
    version: int | None = None


class PairCreate(_Strict):
    name: str
    positive: str
    negative: str
    layer: int | None = None
    coeff: float | None = None
    description: str = ""


