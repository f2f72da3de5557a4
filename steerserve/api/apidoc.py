"""What the OpenAPI document says about responses, so that it matches what the server really answers.

The routes build their JSON bodies by hand (``JSONResponse``, dicts); the models here only describe those
bodies for the document and the clients generated from it, and are never used to validate or serialize a
response. Every error is described by ``ErrorResponse`` (``errors``); ``steerserve.api.document`` then
adjusts what FastAPI generates from these (``tidy_openapi``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

REF = "#/components/schemas/{model}"

# ---- errors -----------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, not_found_error, server_error
    param: str | None  # the offending field as a dotted path (messages.0.content), when there is one
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, OpenAI's shape."""

    error: ErrorDetail


ERROR_DESCRIPTIONS = {
    400: "The request is invalid; error.param names the field",
    401: "Missing or wrong key: the admin key on /admin routes, elsewhere an API key no policy binds",
    403: "The admin API is disabled (no admin key configured), or the API key's policy forbids what the "
         "request asks for (error.param names the field)",
    404: "Not found",
    413: "The request body is larger than the route's limit",
    409: "Conflicts with what is stored (error.param names the field)",
    415: "Unsupported content type",
    429: "Over a limit: the server's requests in flight, the API key's rate, or a slot pool; Retry-After says "
         "when to try again",
    500: "Internal server error",
    503: "The engine is not running, or aborted the request",
    504: "The request's deadline (its timeout, or the server's) passed; it was cancelled",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for error statuses, all in the one error shape."""
    return {s: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


# Every route: the body cap (EdgeGuard) and the generic 500.
APP_ERRORS = errors(413, 500)
ADMIN_ERRORS = errors(400, 401, 403)
GENERATION_ERRORS = errors(400, 401, 403, 429, 503, 504)

# ---- generation -------------------------------------------------------------------------------------


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Applied(_Doc):
    method: str
    artifacts: list[str]  # "name@version"
    detail: dict[str, Any]
    mandatory: bool  # applied by the API key's policy, whatever the request asked for
    policy: str | None = None  # that policy, for a mandatory intervention


class LoopReport(_Doc):
    """What a closed-loop request's loop measured (``entropic`` with ``target_entropy``)."""

    mean_entropy_bits: float | None
    loop_steps: float
    final_gain: float
    target_entropy_bits: float


class SteeringReport(_Doc):
    applied: list[Applied]
    report: LoopReport | None = None


class GenerateResponse(_Doc):
    id: str
    text: str
    finish_reason: str | None
    usage: Usage
    steering: SteeringReport
    model: str


class FeatureOut(_Doc):
    id: int
    activation: float
    unsteered: float | None = None  # with steering: the feature's activation at this token without it
    label: str | None = None


class TokenFeatures(_Doc):
    position: int
    token: str
    reply: bool = False  # a token of the generated reply (``max_tokens`` > 0)
    features: list[FeatureOut]  # the most active first; only those above 0


class FeaturesResponse(_Doc):
    sae: str  # NAME@V
    layer: int
    d_sae: int
    tokens: list[TokenFeatures]
    text: str | None = None  # the reply, when ``max_tokens`` > 0
    steering: SteeringReport | None = None  # what was applied, when ``steering`` was given


class FeatureMatch(_Doc):
    feature: int
    label: str


class FeatureSearchResponse(_Doc):
    """The features whose label contains ``q``: as a whole word first, then as a word's start, then anywhere;
    shorter labels first within each."""

    sae: str  # NAME@V
    layer: int
    d_sae: int
    q: str
    labelled: int  # how many features have a label
    total: int  # how many matched (``matches`` holds at most ``limit``)
    matches: list[FeatureMatch]
    note: str | None = None  # e.g. that the dictionary has no labels


class LoopFigures(_Doc):
    """A closed loop's figures at one token: the entropy it measured (bits) and the gain it set next."""

    entropy_bits: float
    gain: float


class GenerateChunk(_Doc):
    """One streamed increment; the last one carries finish_reason, usage, steering and model. A closed-loop
    request's increments carry ``loop`` (hf engine)."""

    id: str
    text: str
    finish_reason: str | None
    loop: LoopFigures | None = None
    usage: Usage | None = None
    steering: SteeringReport | None = None
    model: str | None = None


class TopLogprob(_Doc):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Doc):
    """Per generated token: its log-probability and the ``top_logprobs`` most likely tokens'."""

    content: list[TokenLogprobOut]
    refusal: None = None


class FunctionCall(_Doc):
    name: str
    arguments: str  # JSON text


class ToolCall(_Doc):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessageOut(_Doc):
    role: str
    content: str | None  # None when the reply is tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Doc):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None
    steering: SteeringReport


class ToolCallDelta(_Doc):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str]  # name (first delta), arguments (JSON text, in pieces)


class ChatDelta(_Doc):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Doc):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Doc):
    """The first chunk carries ``steering``; with ``stream_options.include_usage`` the last one ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: None
    usage: Usage | None = None
    steering: SteeringReport | None = None


class CompletionLogprobs(_Doc):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Doc):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: None
    steering: SteeringReport


class CompletionChunk(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: None
    usage: Usage | None = None
    steering: SteeringReport | None = None


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Doc):
    status: str


class Ready(_Doc):
    status: str
    model: str


# Schemas only the event streams refer to: FastAPI does not see them, tidy_openapi adds them.
STREAM_MODELS: tuple[type[BaseModel], ...] = (GenerateChunk, ChatCompletionChunk, CompletionChunk)


def streamed(body: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route that answers ``body`` as JSON, or with ``"stream": true`` an event stream
    of ``chunk`` events (an error mid-stream is an ``ErrorResponse`` event), ended by ``data: [DONE]``."""
    json_payload = {"type": "string", "not": {"const": "[DONE]"}, "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [{"$ref": REF.format(model=chunk.__name__)},
                                                {"$ref": REF.format(model=ErrorResponse.__name__)}]}}
    event = {"type": "object", "required": ["data"], "description": "one server-sent event",
             "properties": {"data": {"oneOf": [{"const": "[DONE]"}, json_payload]},
                            "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}
    return {200: {"model": body, "description": "The result; with \"stream\": true, server-sent events",
                  "content": {"text/event-stream": {"schema": event}}},
            **GENERATION_ERRORS}


# ---- admin ------------------------------------------------------------------------------------------


class ArtifactOut(_Doc):
    name: str
    version: int
    ref: str  # name@version
    kind: Literal["vector", "pair", "direction", "controller", "probe", "head", "expert_set", "sae"]
    model_fingerprint: str
    model_name: str
    hidden_size: int
    num_layers: int
    layers: list[int]
    method: str | None
    provenance: dict[str, Any]
    norms: dict[str, float]  # by layer
    sha256: str
    created: str
    enabled: bool
    description: str
    layer_convention: str
    versions: int | None = None  # in listings of the latest versions: how many are stored


class PairOut(ArtifactOut):
    positive: str | None = None
    negative: str | None = None
    layer: int | None = None
    coeff: float | None = None


class ArtifactList(_Doc):
    object: Literal["list"]
    data: list[ArtifactOut]


class PairList(_Doc):
    object: Literal["list"]
    data: list[PairOut]


class PolicyOut(_Doc):
    name: str
    mandatory: list[dict[str, Any]]  # intervention objects applied to every request under the policy
    allowed_methods: list[str] | None  # null: every method
    max_coeff: float | None
    method_caps: dict[str, float]
    description: str
    requests_per_minute: float | None  # per API key; null: no limit
    created: str  # empty for the built-in default policy
    updated: str


class PolicyList(_Doc):
    object: Literal["list"]
    data: list[PolicyOut]


class KeyOut(_Doc):
    id: str  # what DELETE /admin/keys/{id} takes
    policy: str
    label: str
    created: str
    key: str | None = None  # a generated key, in the response that created it only


class KeyList(_Doc):
    object: Literal["list"]
    data: list[KeyOut]
