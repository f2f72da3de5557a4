"""What the OpenAPI document says about responses, so that it matches what the server really answers.

The routes build their JSON bodies by hand (``JSONResponse``, dicts); the models here only describe those
bodies for the document and the clients generated from it, and are never used to validate or serialize a
response. ``tidy_openapi`` then adjusts what FastAPI generates: it drops the 422 this server never sends
(every validation failure is a 400 in the one error shape), states the admin key as a bearer scheme, and
writes the limits that come from the settings and the loaded model into the request schemas.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from steerserve.config import Settings

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
    401: "Missing or wrong admin key",
    403: "The admin API is disabled (no admin key configured)",
    404: "Not found",
    413: "The request body is larger than the route's limit",
    415: "Unsupported content type",
    500: "Internal server error",
    503: "The engine is not running, or aborted the request",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for error statuses, all in the one error shape."""
    return {s: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


# Every route: the body cap (EdgeGuard) and the generic 500.
APP_ERRORS = errors(413, 500)
ADMIN_ERRORS = errors(400, 401, 403)
GENERATION_ERRORS = errors(400, 503)

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


class SteeringReport(_Doc):
    applied: list[Applied]


class GenerateResponse(_Doc):
    id: str
    text: str
    finish_reason: str | None
    usage: Usage
    steering: SteeringReport
    model: str


class GenerateChunk(_Doc):
    """One streamed increment; the last one carries finish_reason, usage, steering and model."""

    id: str
    text: str
    finish_reason: str | None
    usage: Usage | None = None
    steering: SteeringReport | None = None
    model: str | None = None


class ChatMessageOut(_Doc):
    role: str
    content: str


class ChatChoice(_Doc):
    index: int
    message: ChatMessageOut
    logprobs: None
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


class ChatDelta(_Doc):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Doc):
    index: int
    delta: ChatDelta
    logprobs: None
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


class CompletionChoice(_Doc):
    index: int
    text: str
    logprobs: None
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
    kind: Literal["vector", "pair"]
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


# ---- the document -----------------------------------------------------------------------------------


def install_openapi(app: FastAPI, settings: Settings, num_layers: int) -> None:
    """Make ``app.openapi()`` return FastAPI's document adjusted by ``tidy_openapi``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = tidy_openapi(FastAPI.openapi(app), settings, num_layers)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def tidy_openapi(doc: dict[str, Any], settings: Settings, num_layers: int) -> dict[str, Any]:
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, defs = models_json_schema([(m, "serialization") for m in STREAM_MODELS], ref_template=REF)
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    components["securitySchemes"] = {"adminKey": {"type": "http", "scheme": "bearer",
                                                  "description": "Settings.admin_key (STEERSERVE_ADMIN_KEY)"}}
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            if not isinstance(op, dict):
                continue
            responses = op.get("responses", {})
            responses.pop("422", None)  # never sent: validation failures are 400s
            error = {"schema": {"$ref": REF.format(model=ErrorResponse.__name__)}}
            for response in responses.values():
                # FastAPI gives every response the route's media type; errors are JSON on every route.
                if error in (response.get("content") or {}).values():
                    response["content"] = {"application/json": error}
            if path.startswith("/admin/"):
                op["security"] = [{"adminKey": []}]
    # Limits from the settings and the loaded model, on the request fields that already state a bound.
    limits: dict[str, Callable[[dict[str, Any]], None]] = {
        "max_tokens": _set("maximum", settings.max_tokens_cap, "minimum"),
        "max_completion_tokens": _set("maximum", settings.max_tokens_cap, "minimum"),
        "layer": _set("maximum", num_layers - 1, "minimum"),
        "layers": _set("maximum", num_layers - 1, "minimum"),
        "description": _set("maxLength", settings.max_description_chars, "maxLength"),
        "interventions": _set("maxItems", settings.max_interventions, "maxItems"),
    }
    for name, schema in list(_named_schemas(doc)):  # listed first: applying a limit changes the dicts walked
        if name in limits:
            limits[name](schema)
    return doc


def _set(key: str, value: int, only_if: str) -> Callable[[dict[str, Any]], None]:
    """Set ``key`` on every integer/string schema within a property's schema that already has ``only_if``."""

    def apply(schema: dict[str, Any]) -> None:
        for sub in _subschemas(schema):
            if only_if in sub:
                sub[key] = value

    return apply


def _subschemas(schema: Any) -> Iterator[dict[str, Any]]:
    """``schema`` and the branches of its anyOf/oneOf and array items (``int | None``, ``list[int]``)."""
    if not isinstance(schema, dict):
        return
    yield schema
    for key in ("anyOf", "oneOf"):
        for branch in schema.get(key, []):
            yield from _subschemas(branch)
    yield from _subschemas(schema.get("items"))


def _named_schemas(node: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(property or parameter name, its schema) everywhere in the document."""
    if isinstance(node, dict):
        for name, schema in (node.get("properties") or {}).items():
            if isinstance(schema, dict):
                yield name, schema
        if isinstance(node.get("name"), str) and isinstance(node.get("schema"), dict) and "in" in node:
            yield node["name"], node["schema"]
        for value in node.values():
            yield from _named_schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _named_schemas(value)


# ---- request examples (shown in the document; a schema-driven client test runs each one) --------------


def examples(**named: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``Body(openapi_examples=...)`` from ``name=value`` pairs."""
    return {name: {"summary": name.replace("_", " "), "value": value} for name, value in named.items()}


STORY = [{"role": "user", "content": "Tell me a short story about a dog."}]
NO_STEERING: dict[str, Any] = {"interventions": []}
GENERATE_EXAMPLES = examples(
    chat={"messages": STORY, "max_tokens": 8, "temperature": 0},
    raw_prompt={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.7, "seed": 1},
    streamed={"messages": STORY, "max_tokens": 8, "stream": True, "steering": NO_STEERING},
)
CHAT_EXAMPLES = examples(
    chat={"messages": STORY, "max_tokens": 8, "temperature": 0},
    streamed={"messages": [{"role": "system", "content": "Be brief."}, *STORY], "max_completion_tokens": 8,
              "stream": True, "stream_options": {"include_usage": True}, "steering": NO_STEERING},
)
COMPLETION_EXAMPLES = examples(
    completion={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
    streamed={"prompt": ["The capital of France is"], "max_tokens": 8, "stream": True, "stop": ["."]},
)
COMPUTE_EXAMPLES = examples(
    mean_difference={"name": "joy", "layers": [6, 8], "positive": ["I love this!", "What a wonderful day."],
                     "negative": ["I hate this!", "What an awful day."], "description": "joy - anger"},
)
PAIR_EXAMPLES = examples(
    actadd_pair={"name": "love-hate", "positive": "Love", "negative": "Hate", "layer": 6, "coeff": 5.0},
)
ENABLE_EXAMPLES = examples(disable={"enabled": False}, enable_one_version={"enabled": True, "version": 1})
