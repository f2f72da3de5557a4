"""Every request body the HTTP edge accepts, as pydantic models (pydantic never leaves steerserve.api).

Models parse types (strict: no "1" for 1, no "true" for true) and carry the constraints that do not depend
on the loaded model or the settings (ranges, name patterns, non-empty lists), so that the OpenAPI document
states them; everything else (the token cap, the model's layer count, prompt rules, the steering spec) is
checked by the service, which names the offending field itself. OpenAI-compatible bodies allow unknown
fields (clients send many); ``unsupported()`` rejects the values of known fields we cannot honour.

Every body model refuses a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but not Unicode text) anywhere
in it, naming the field: no tokenizer can encode one, and neither can the error response that echoes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from steerserve.api.structured import ResponseFormat, Tool, ToolChoice
from steerserve.config import Settings
from steerserve.errors import SteerError
from steerserve.prompts import has_lone_surrogate
from steerserve.store.db import NAME_RE
from steerserve.store.sae_labels import MAX_MATCHES, MAX_QUERY_CHARS


def _accepts(schema: dict[str, Any], nullable: bool = True) -> WithJsonSchema:
    """Document the values the service accepts for a field the model parses more loosely.

    The model takes any value of the type, so that the service can refuse the others with its own message
    naming the field; the OpenAPI document states the rule for clients all the same.
    """
    return WithJsonSchema({"anyOf": [schema, {"type": "null"}]} if nullable else schema)


def _exactly_one(*names: str) -> Any:
    """``json_schema_extra`` for fields of which the service requires exactly one, given and not null."""

    def extra(schema: dict[str, Any]) -> None:
        schema["oneOf"] = [{"required": [n], "properties": {n: {"not": {"type": "null"}}}} for n in names]

    return extra


def _only_with(field: str, needs: str, value: Any) -> Any:
    """``json_schema_extra`` for a field the service accepts (non-null) only when ``needs`` is ``value``."""

    def extra(schema: dict[str, Any]) -> None:
        schema["anyOf"] = [{"properties": {field: {"type": "null"}}},
                           {"required": [needs], "properties": {needs: {"const": value}}}]

    return extra


def _required(*names: str) -> Any:
    """``json_schema_extra`` for fields the service requires although the model has a default for them."""

    def extra(schema: dict[str, Any]) -> None:
        schema["required"] = sorted({*schema.get("required", []), *names})

    return extra


NON_BLANK = {"type": "string", "pattern": "\\S"}
STEERING = _accepts({
    "type": "object", "additionalProperties": False,
    "description": "Steering for this request: interventions applied together (see the README's methods).",
    "properties": {"interventions": {
        "type": "array", "maxItems": Settings.max_interventions,
        "items": {"type": "object", "required": ["method"],
                  "properties": {"method": {"type": "string", "description": "add, actadd, ablate, ..."}},
                  "description": "the method's name and its own parameters"}}},
})
def _whole(value: Any) -> Any:
    """JSON has one kind of number: ``5.0`` is the integer 5 (JSON Schema agrees), so a strict model takes it
    as such; ``5.5`` stays a float and is refused as not an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


# On every integer field of a body, after its constraints (placed before them, pydantic would state them as
# ``ge`` rather than JSON Schema's ``minimum`` in the document): strict, but 5.0 is 5.
WHOLE = BeforeValidator(_whole)

Stop = Annotated[str | Annotated[list[str], Field(max_length=4)] | None, _accepts({"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]})]
# A 64-bit signed seed: torch cannot seed from wider integers, and the error would surface in the engine's
# thread rather than here.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), WHOLE] | None
MaxTokens = Annotated[int, Field(ge=1, description="at most the server's max_tokens_cap"), WHOLE] | None
Temperature = Annotated[float, Field(ge=0.0, le=5.0, description="0 means greedy")] | None
TopP = Annotated[float, Field(gt=0.0, le=1.0)] | None
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)] | None
Timeout = Annotated[float, Field(gt=0, le=86400, description="deadline in seconds: past it the request is cancelled "
                                "(504)")] | None
Name = Annotated[str, Field(pattern=f"^{NAME_RE.pattern}$", description="1-64 of A-Z a-z 0-9 _ . -, starting "
                            "alphanumeric")]
Description = Annotated[str, Field(max_length=Settings.max_description_chars)]
Layer = Annotated[int, Field(ge=0, description="0-based; below the model's layer count"), WHOLE]
Text = Annotated[str, Field(min_length=1)]
SURROGATE = "contains a lone UTF-16 surrogate (not valid Unicode text)"


def json_text(value: Any) -> str | None:
    """``value`` as JSON text, or None if it is not plain JSON data.

    The validators below run on the event loop over bodies of up to ``max_body_bytes``; serializing is one
    pass at C speed, which settles the common case (nothing to refuse) without walking the value in Python.
    """
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return None


def find_string(value: Any, bad: Callable[[str], bool]) -> tuple[str, bool] | None:
    """Where the first string (or object key) of a parsed JSON value for which ``bad`` holds is:
    (dotted path, whether it is a key), or None. Iterative: a deeply nested body must not exhaust the stack.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if bad(v):
                return path, False
        elif isinstance(v, dict):
            if any(isinstance(k, str) and bad(k) for k in v):
                return path, True
            stack.extend(reversed([(f"{path}.{k}" if path else str(k), item) for k, item in v.items()]))
        elif isinstance(v, list):
            stack.extend(reversed([(f"{path}.{i}" if path else str(i), item) for i, item in enumerate(v)]))
    return None


class BodyModel(BaseModel):
    """A whole request body."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # SteerError is not a ValueError: pydantic lets it through to the app's handler, field and all.
        text = json_text(data)
        found = find_string(data, has_lone_surrogate) if text is None or has_lone_surrogate(text) else None
        if found is not None:
            path, in_key = found
            raise SteerError(f"an object key {SURROGATE}" if in_key else SURROGATE, field=path or None,
                             code="invalid_unicode")
        return data


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _OpenAI(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


# ---- native -----------------------------------------------------------------------------------------


class Message(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(StrictModel, BodyModel):
    """Exactly one of ``prompt`` and ``messages`` (both, or neither, is a 400)."""

    model_config = ConfigDict(json_schema_extra=_exactly_one("prompt", "messages"))

    prompt: Annotated[str | None, _accepts(NON_BLANK)] = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    max_tokens: MaxTokens = None
    temperature: Temperature = 1.0
    top_p: TopP = None
    seed: Seed = None
    stop: Stop = None
    ignore_eos: bool = False  # keep generating past the end-of-sequence token (benchmarks)
    stream: bool = False
    steering: Annotated[dict[str, Any] | None, STEERING] = None
    timeout: Timeout = None


class FeaturesRequest(StrictModel, BodyModel):
    """``POST /features``: the most active SAE features at every token of a prompt (exactly one of ``prompt``
    and ``messages``)."""

    model_config = ConfigDict(json_schema_extra=_exactly_one("prompt", "messages"))

    prompt: Annotated[str | None, _accepts(NON_BLANK)] = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    sae: Annotated[str, Field(min_length=1, max_length=80, description="a sae artifact, NAME or NAME@V")]
    top_k: Annotated[int, Field(ge=1, le=64, description="features per token"), WHOLE] = 8
    steering: Annotated[dict[str, Any] | None, STEERING] = None
    max_tokens: Annotated[int, Field(ge=0, le=256, description="a greedy reply of up to this many tokens is "
                                     "generated (with ``steering``) and read too; 0: the prompt only"), WHOLE] = 0
    timeout: Timeout = None


# GET /features/search: query parameters (strings on the wire, so not strict; FastAPI parses them)
SaeRef = Annotated[str, Query(min_length=1, max_length=80, description="a sae artifact, NAME or NAME@V")]
SearchText = Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS, pattern="\\S",
                                  description="text to find in the features' labels (case-insensitive)")]
SearchLimit = Annotated[int, Query(ge=1, le=MAX_MATCHES, description="most matches returned")]


# ---- OpenAI-compatible ------------------------------------------------------------------------------


class StreamOptions(_OpenAI):
    include_usage: bool | None = None


class ContentPart(_OpenAI):
    type: str
    text: str | None = None


TEXT_PART = {"type": "object", "required": ["type", "text"],
             "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}


class FunctionCall(_OpenAI):
    name: str
    arguments: str  # JSON text, as the server returned it


class ToolCall(_OpenAI):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_OpenAI):
    role: Literal["system", "user", "assistant", "developer", "tool"]  # developer: OpenAI's newer name for system
    content: Annotated[str | list[ContentPart] | None, _accepts(
        {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]})] = None
    tool_calls: list[ToolCall] | None = None  # an assistant message: the calls it made (content may be null)
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self, where: str) -> str:
        """The message's text; content parts other than text are refused, naming the part. Only an assistant
        message with ``tool_calls`` may have none."""
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            if self.role == "assistant" and self.tool_calls:
                return ""
            raise SteerError("must be a string or a list of text parts", field=f"{where}.content")
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


class CompletionBase(_OpenAI, BodyModel):
    """Fields shared by chat completions and completions."""

    model: str | None = None
    max_tokens: MaxTokens = None
    temperature: Temperature = None
    top_p: TopP = None
    seed: Seed = None
    stop: Stop = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens regardless of EOS
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    steering: Annotated[dict[str, Any] | None, STEERING] = None
    timeout: Timeout = None
    n: Annotated[int, Field(ge=1, le=Settings.max_choices, description="choices to generate"), WHOLE] | None = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logit_bias: Annotated[dict[str, float] | None, _accepts({
        "type": "object", "maxProperties": 300, "propertyNames": {"pattern": "^[0-9]+$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})] = None

    def unsupported(self) -> None:
        """Refuse values this server cannot honour, naming the field (a 400, never a silent ignore)."""


class ChatCompletionRequest(CompletionBase):
    model_config = ConfigDict(json_schema_extra=_only_with("top_logprobs", "logprobs", True))

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), WHOLE] | None = None
    tools: Annotated[list[Tool], Field(max_length=64)] | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    modalities: Annotated[list[str] | None, _accepts(
        {"type": "array", "items": {"const": "text"}, "minItems": 1, "maxItems": 1})] = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise SteerError("needs 'logprobs': true", field="top_logprobs", code="invalid_value")
        _refuse("modalities", self.modalities, self.modalities == ["text"], "only the 'text' modality is supported")

    def logprob_count(self) -> int | None:
        """Alternatives per token for the engine (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_new_tokens(self) -> tuple[int | None, str]:
        """(value, field name): ``max_completion_tokens`` wins over the deprecated ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def plain_messages(self) -> list[dict[str, Any]]:
        """``{role, content}`` dicts for the renderer; OpenAI's ``developer`` role is a system message. A tool
        message keeps its ``tool_call_id``; an assistant message its ``tool_calls``, with each call's arguments
        parsed back into an object where they are one (chat templates write them out with ``tojson``)."""
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            message: dict[str, Any] = {"role": role, "content": m.text(f"messages.{i}")}
            if m.role == "tool":
                if m.tool_call_id is None:
                    raise SteerError("is required in a tool message", field=f"messages.{i}.tool_call_id")
                message["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                if m.role != "assistant":
                    raise SteerError("only an assistant message has tool calls", field=f"messages.{i}.tool_calls")
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
            out.append(message)
        return out


def _arguments(text: str) -> Any:
    """A call's arguments (JSON text) as the object they encode, or the text itself if they are not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


class CompletionRequest(CompletionBase):
    model_config = ConfigDict(json_schema_extra=_required("prompt"))

    prompt: Annotated[Any, _accepts({"anyOf": [  # checked by prompt_text()
        NON_BLANK, {"type": "array", "items": NON_BLANK, "minItems": 1, "maxItems": 1}]}, nullable=False)] = None
    logprobs: Annotated[int, Field(ge=0, le=5), WHOLE] | None = None
    echo: Annotated[bool | None, _accepts({"const": False})] = None
    best_of: Annotated[int | None, WHOLE, _accepts({"const": 1})] = None
    suffix: Annotated[str | None, _accepts({"const": ""})] = None

    def unsupported(self) -> None:
        super().unsupported()
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
