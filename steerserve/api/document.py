"""The OpenAPI document beyond what FastAPI derives from the routes: its post-processing and the request examples.

``tidy_openapi`` adjusts what FastAPI generates: it drops the 422 this server never sends (every validation
failure is a 400 in the one error shape), adds the schemas only the event streams refer to, states the admin
key and the (optional) client API key as bearer schemes, and writes the limits that come from the settings
and the loaded model into the request schemas. The response models it refers to are in ``steerserve.api.apidoc``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from steerserve.api.apidoc import REF, STREAM_MODELS, ErrorResponse
from steerserve.api.guard import is_generation
from steerserve.config import Settings
from steerserve.methods import REGISTRY

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
    components["securitySchemes"] = {
        "adminKey": {"type": "http", "scheme": "bearer", "description": "Settings.admin_key (STEERSERVE_ADMIN_KEY)"},
        "apiKey": {"type": "http", "scheme": "bearer", "description": "a client key bound to a policy "
                   "(POST /admin/keys); without one the default policy applies"}}
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
            elif is_generation(path):
                op["security"] = [{}, {"apiKey": []}]  # optional
    # Limits from the settings and the loaded model, on the request fields that already state a bound.
    limits: dict[str, Callable[[dict[str, Any]], None]] = {
        "max_tokens": _set("maximum", settings.max_tokens_cap, "minimum"),
        "max_completion_tokens": _set("maximum", settings.max_tokens_cap, "minimum"),
        "layer": _set("maximum", num_layers - 1, "minimum"),
        "layers": _set("maximum", num_layers - 1, "minimum"),
        "description": _set("maxLength", settings.max_description_chars, "maxLength"),
        "interventions": _set("maxItems", settings.max_interventions, "maxItems"),
        "prompt": _set("maxLength", settings.max_prompt_chars, "pattern"),  # a prompt's text: non-blank
    }
    for name, schema in list(_named_schemas(doc)):  # listed first: applying a limit changes the dicts walked
        if name in limits:
            limits[name](schema)
    # The steering methods a request or a policy may name: the registry's (not in responses, which report them).
    methods = {"enum": sorted(REGISTRY)}
    method_names: dict[str, Callable[[dict[str, Any]], None]] = {
        "method": lambda schema: schema.update(methods),
        "allowed_methods": _set_items(methods),
        "method_caps": lambda schema: schema.update(propertyNames=methods),
    }
    for name, schema in list(_named_schemas([schemas[c] for c in _request_components(doc)])):
        if name in method_names:
            method_names[name](schema)
    return doc


def _set_items(extra: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """Add ``extra`` to the item schemas of every array schema within a property's schema."""

    def apply(schema: dict[str, Any]) -> None:
        for sub in _subschemas(schema):
            if sub.get("type") == "array" and isinstance(sub.get("items"), dict):
                sub["items"].update(extra)

    return apply


def _request_components(doc: dict[str, Any]) -> set[str]:
    """The component schemas request bodies refer to, directly or through other components."""
    prefix = REF.format(model="")
    found: set[str] = set()
    todo = [body for item in doc.get("paths", {}).values() for op in item.values()
            if isinstance(op, dict) for body in [op.get("requestBody")] if body]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(prefix) and ref[len(prefix):] not in found:
                found.add(ref[len(prefix):])
                todo.append(doc["components"]["schemas"].get(ref[len(prefix):]))
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return found


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
_RESTRICTED = {"allowed_methods": ["actadd", "ablate"], "max_coeff": 8,
               "description": "ActAdd and ablation only, |coeff| <= 8"}
_MANDATORY = {"mandatory": [{"method": "ablate", "vector": "refusal"}], "method_caps": {"add": 4}}
POLICY_EXAMPLES = examples(restricted={"name": "no-add", **_RESTRICTED}, mandatory={"name": "safe", **_MANDATORY})
PUT_POLICY_EXAMPLES = examples(restricted=_RESTRICTED, mandatory=_MANDATORY)
KEY_EXAMPLES = examples(generated={"policy": "default", "label": "alice"},
                        given={"policy": "default", "key": "my-own-key-0123456789", "label": "bob"})
