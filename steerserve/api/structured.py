"""OpenAI's ``response_format`` and ``tools``: the request side as a constraint for vLLM's own structured-output
backend (``engines.base.Structured``), and the reply side as ``tool_calls``.

As on vLLM's server: ``tool_choice`` ``"required"`` or a named function constrains the reply to a valid call
(``required``: a JSON list of ``{"name", "parameters"}``; named: that function's ``parameters``), ``"none"``
generates text, and ``"auto"`` (the default with tools) generates freely and needs the model's tool-call parser
(``serve --tool-call-parser``, ``api.tool_parsing``) to find the calls in the text.
The tools reach the model through its chat template (which may ignore them, as the default model's does;
``serve --chat-template`` replaces it).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from steerserve.engines.base import Structured
from steerserve.errors import SteerError

FunctionName = Annotated[str, Field(pattern="^[A-Za-z0-9_-]{1,64}$")]


class _Loose(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class FunctionDef(_Loose):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema for the arguments (an object)
    strict: bool | None = None


class Tool(_Loose):
    type: Literal["function"]
    function: FunctionDef


class FunctionRef(_Loose):
    name: FunctionName


class NamedToolChoice(_Loose):
    type: Literal["function"]
    function: FunctionRef


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Loose):
    name: Annotated[str, Field(pattern="^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class ResponseFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


@dataclass(frozen=True)
class ToolMode:
    """How to read the reply back as tool calls: one named function, a list (``required``), or whatever the
    server's tool-call parser finds in free text (``auto``)."""

    function: str | None  # None: "required" (the reply is a list of {"name", "parameters"}) or "auto"
    auto: bool = False


def constraint(response_format: ResponseFormat | None, tools: list[Tool] | None,
               tool_choice: ToolChoice | None,
               parser: str | None = None) -> tuple[Structured | None, ToolMode | None]:
    """(what to constrain decoding to, how to read tool calls back); ``parser``: the server's tool-call parser
    (``serve --tool-call-parser``), without which ``"auto"`` is refused."""
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    mode: ToolMode | None = None
    structured: Structured | None = None
    if choice != "none":
        if not tools:
            raise SteerError("needs 'tools'", field="tool_choice", code="invalid_value")
        if choice == "auto" and parser is None:
            raise SteerError("'auto' tool choice needs a tool-call parser for the model's output format: start the "
                             "server with --tool-call-parser NAME (e.g. hermes), or use 'required' or a named "
                             "function", field="tool_choice", code="unsupported_value")
        if choice == "auto":
            mode = ToolMode(None, auto=True)
        elif choice == "required":
            mode, structured = ToolMode(None), Structured("json", json.dumps(_any_call(tools)), "tool_choice")
        else:
            assert isinstance(choice, NamedToolChoice)
            named = [t for t in tools if t.function.name == choice.function.name]
            if not named:
                raise SteerError(f"no tool is named {choice.function.name!r}", field="tool_choice.function.name",
                                 code="invalid_value")
            mode = ToolMode(choice.function.name)
            structured = Structured("json", json.dumps(_params(named[0])), "tool_choice")
    fmt = response_format
    if fmt is not None and fmt.type != "text":
        if structured is not None:
            raise SteerError("cannot be combined with a forced tool call", field="response_format",
                             code="invalid_value")
        if fmt.type == "json_object":
            structured = Structured("json_object")
        else:
            if fmt.json_schema is None:
                raise SteerError("is required with type 'json_schema'", field="response_format.json_schema",
                                 code="invalid_value")
            schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {"type": "object"}
            structured = Structured("json", json.dumps(schema))
    return structured, mode


def _params(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object"}


def _any_call(tools: list[Tool]) -> dict[str, Any]:
    """A non-empty JSON list of calls, each ``{"name": one of the tools, "parameters": its arguments}``."""
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": _params(t)},
              "required": ["name", "parameters"]} for t in tools]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


def tool_calls(text: str, mode: ToolMode) -> list[dict[str, Any]] | None:
    """The reply as OpenAI ``tool_calls`` (arguments as JSON text); None if it is not a complete call (e.g.
    cut by ``max_tokens``), in which case the text goes back as content."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if mode.function is not None:
        calls = [(mode.function, value)]
    elif isinstance(value, list) and all(isinstance(c, dict) and "name" in c for c in value):
        calls = [(str(c["name"]), c.get("parameters", {})) for c in value]
    else:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}} for name, args in calls]
