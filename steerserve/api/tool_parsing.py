"""Tool calls read out of a chat reply by vLLM's own code, as vLLM's server reads them.

``tool_choice: "auto"``: the model writes its calls in its own format (Hermes' ``<tool_call>{...}</tool_call>``,
Llama 3's JSON, ...), which the tool-call parser the server was started with finds (``serve --tool-call-parser
NAME``, a name in vLLM's ``ToolParserManager`` registry), composed into vLLM's ``Parser`` by its
``ParserManager`` as vLLM's server composes it, whole replies and streams alike. Streamed forced calls
(``"required"``, a named function; the reply is JSON constrained by ``api.structured``) go through vLLM's
streaming helpers for those (``vllm.tool_parsers.streaming``).

vLLM is an optional dependency (the ``cpu``/``gpu`` extras): it is imported here only when one of these is used.
Not done as vLLM does: a parser's ``adjust_request`` (e.g. decoding special tokens, strict structural tags) is not
applied, so a parser whose markers are special tokens the engine skips finds no calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from steerserve.api.structured import ToolMode
from steerserve.errors import SteerError

ID_TYPE = "random"  # vLLM's default tool-call id form (chatcmpl-tool-<hex>)


def check_parser_name(name: str) -> None:
    """A ``ValueError`` naming vLLM's parsers unless vLLM is installed and has a tool-call parser ``name``."""
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError as exc:
        raise ValueError("--tool-call-parser needs vLLM (install the 'cpu' or 'gpu' extra)") from exc
    names = ToolParserManager.list_registered()
    if name not in names:
        raise ValueError(f"--tool-call-parser {name!r} is not a vLLM tool-call parser; vLLM has: {', '.join(names)}")


class ToolParsing:
    """The server's tool-call parsing: vLLM's ``Parser`` class for ``parser`` (None: no ``"auto"``), bound to the
    model's tokenizer. Built once per app; ``reader`` makes the per-choice reader (parsers keep stream state)."""

    def __init__(self, parser: str | None, tokenizer: Any, model: str | None = None) -> None:
        """A ``RuntimeError`` (at start-up) for a parser vLLM does not have or that does not fit the tokenizer
        (e.g. ``llama3_json`` needs Llama 3's ``<|python_tag|>`` token)."""
        self.name, self.tokenizer = parser, tokenizer
        self.parser_cls: Any = None
        if parser is not None:
            try:
                check_parser_name(parser)
                from vllm.parser import ParserManager

                self.parser_cls = ParserManager.get_parser(tool_parser_name=parser, enable_auto_tools=True,
                                                           tokenizer=tokenizer, model_name=model)
            except (ValueError, TypeError) as exc:
                raise RuntimeError(str(exc)) from exc

    def reader(self, mode: ToolMode, tools: Sequence[Mapping[str, Any]]) -> ToolReader:
        return ToolReader(self, mode, tools)


class ToolReader:
    """Reads one choice's reply (whole with ``parse``, or in pieces with ``feed``) as OpenAI tool calls."""

    def __init__(self, parsing: ToolParsing, mode: ToolMode, tools: Sequence[Mapping[str, Any]]) -> None:
        self.mode, self.tokenizer = mode, parsing.tokenizer
        self.called = False  # whether a tool call has been found (streamed) so far
        self._text = ""  # the reply so far ("required": the helper reads the whole JSON list each time)
        self._named_sent = False  # a named call: whether its first delta (id, name) has gone out
        self._parser: Any = None
        self._request: Any = None
        if mode.auto:
            if parsing.parser_cls is None:
                raise SteerError("needs a tool-call parser (--tool-call-parser)", field="tool_choice",
                                 code="unsupported_value")
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

            # What the parsers read of the request: the tools and the choice (the messages only matter to ids
            # numbered over the conversation, which the default id form is not).
            self._request = ChatCompletionRequest.model_validate(
                {"messages": [], "tools": [dict(t) for t in tools], "tool_choice": "auto"})
            self._parser = parsing.parser_cls(self.tokenizer, self._request.tools)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """("auto") The whole reply as (content, tool calls); no calls found: (the text, None)."""
        from vllm.renderers.chat_utils import make_tool_call_id

        _reasoning, content, calls = self._parser.parse(text, self._request, enable_auto_tools=True)
        if not calls:
            return text, None
        self.called = True
        return (content or None), [{"id": c.id or make_tool_call_id(), "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments}} for c in calls]

    def feed(self, text: str, token_ids: Sequence[int], prompt_ids: Sequence[int],
             finished: bool) -> dict[str, Any] | None:
        """The OpenAI delta (``content`` and/or ``tool_calls``) for the next piece of the reply, or None when
        there is nothing to send yet (a parser holds back what may be the start of a call)."""
        from vllm.tool_parsers import streaming

        delta: Any
        if self.mode.auto:
            delta = self._parser.parse_delta(text, list(token_ids), self._request, list(prompt_ids),
                                             finished=finished)
        elif self.mode.function is not None:
            if not text:
                return None
            delta, self._named_sent = streaming.extract_named_tool_call_streaming(
                delta_text=text, function_name=self.mode.function, function_name_returned=self._named_sent,
                tool_call_idx=None, tool_call_id_type=ID_TYPE, tokenizer=self.tokenizer)
        else:
            before, self._text = self._text, self._text + text
            delta, _ = streaming.extract_required_tool_call_streaming(
                previous_text=before, current_text=self._text, tool_call_idx=None, tool_call_id_type=ID_TYPE)
        if delta is None:
            return None
        out: dict[str, Any] = {}
        if delta.content:
            out["content"] = delta.content
        if delta.tool_calls:
            self.called = True
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in delta.tool_calls]
        return out or None
