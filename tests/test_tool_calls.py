"""Tool calling on ``/v1/chat/completions``: vLLM's own tool-call parsers for ``tool_choice: "auto"``
(``serve --tool-call-parser``), ``tool`` messages and assistant ``tool_calls`` through a chat template that
renders them (``serve --chat-template``; ``templates/tools_hermes.jinja``), and streamed forced calls.

The live server has neither option; the tests with them run an app of their own on the live server's engine
and event loop (no second engine). The default model follows a few-shot pattern of Hermes calls greedily,
so the ``auto`` tests read a call the real model wrote; the parser wiring is also checked on fixed text.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
import uvicorn
from openai import OpenAI

from steerserve.api import create_app
from steerserve.api.schemas import ChatCompletionRequest
from steerserve.api.structured import ToolMode
from steerserve.api.tool_parsing import ToolParsing, check_parser_name
from steerserve.cli import build_parser, serve_settings
from steerserve.errors import SteerError
from steerserve.prompts import PromptRenderer
from steerserve.service import Service

TEMPLATE = Path(__file__).parent / "templates" / "tools_hermes.jinja"
WEATHER: Any = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def _called(i: int, city: str) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": f"call_{i}", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}


# Three questions answered by calls: greedily, the model answers the fourth with a call of its own.
FEW_SHOT: Any = [m for i, city in enumerate(("Paris", "Rome", "Madrid"))
                 for m in ({"role": "user", "content": f"What is the weather in {city}?"}, _called(i, city))]
ASK_BERLIN: Any = [*FEW_SHOT, {"role": "user", "content": "What is the weather in Berlin?"}]


# ---- the parser wiring, on fixed text -----------------------------------------------------------------


def test_vllm_parser_reads_fixed_text(service: Service) -> None:
    parsing = ToolParsing("hermes", service.renderer.tokenizer)
    content, calls = parsing.reader(ToolMode(None, auto=True), WEATHER).parse(f"Let me look. {CALL}")
    assert content == "Let me look. " and calls is not None and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert parsing.reader(ToolMode(None, auto=True), WEATHER).parse("No call here.") == ("No call here.", None)

    reader = parsing.reader(ToolMode(None, auto=True), WEATHER)  # streamed: in pieces of 4 characters
    text = f"Ok. {CALL}"
    deltas = [reader.feed(text[i:i + 4], [], [1], i + 4 >= len(text)) for i in range(0, len(text), 4)]
    sent = [d for d in deltas if d is not None]
    assert "".join(d.get("content", "") for d in sent) == "Ok. " and reader.called
    tool_deltas = [c for d in sent for c in d.get("tool_calls", [])]
    assert [c["function"]["name"] for c in tool_deltas if "name" in c["function"]] == ["get_weather"]
    assert tool_deltas[0]["id"] and all(c["index"] == 0 for c in tool_deltas)
    assert json.loads("".join(c["function"].get("arguments", "") for c in tool_deltas)) == {"city": "Paris"}


def test_parser_names_checked_at_start(service: Service) -> None:
    with pytest.raises(ValueError, match="hermes"):  # the message lists vLLM's parsers
        check_parser_name("no-such-parser")
    with pytest.raises(RuntimeError, match="python_tag"):  # vLLM's own check of the parser against the tokenizer
        ToolParsing("llama3_json", service.renderer.tokenizer)


def test_serve_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--tool-call-parser", "hermes", "--chat-template", str(TEMPLATE)])
    s = serve_settings(args)
    assert (s.tool_call_parser, s.chat_template) == ("hermes", TEMPLATE)
    monkeypatch.setenv("STEERSERVE_TOOL_CALL_PARSER", "hermes")
    assert serve_settings(build_parser().parse_args(["serve"])).tool_call_parser == "hermes"
    with pytest.raises(ValueError, match="no-such-parser"):
        serve_settings(build_parser().parse_args(["serve", "--tool-call-parser", "no-such-parser"]))
    with pytest.raises(ValueError, match="no such file"):
        serve_settings(build_parser().parse_args(["serve", "--chat-template", str(tmp_path / "none.jinja")]))


def test_template_renders_tools_calls_and_results(service: Service) -> None:
    renderer = PromptRenderer(service.renderer.tokenizer, 2048, chat_template=TEMPLATE.read_text())
    body = ChatCompletionRequest.model_validate({"messages": [
        *FEW_SHOT[:2], {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
        {"role": "user", "content": "And in Rome?"}]})
    info = renderer.render(messages=body.plain_messages(), tools=WEATHER)
    text = renderer.tokenizer.decode(list(info.token_ids))
    assert '"name": "get_weather", "description": "Current weather of a city"' in text  # the tools
    assert CALL in text and "<tool_response>sunny</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n") and info.user_start > 0
    no_id = ChatCompletionRequest.model_validate({"messages": [{"role": "tool", "content": "sunny"}]})
    with pytest.raises(SteerError) as info_:
        no_id.plain_messages()
    assert info_.value.field == "messages.0.tool_call_id"


# ---- the live server: no parser, the model's own template ----------------------------------------------


def test_auto_needs_a_parser(oai: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], tools=WEATHER,
                                    tool_choice="auto", max_tokens=4)
    assert info.value.param == "tool_choice" and "--tool-call-parser" in info.value.message


def test_tool_messages_accepted(oai: OpenAI) -> None:
    """The default template ignores tool calls, but the messages are valid: rendered, answered."""
    messages: Any = [*FEW_SHOT[:2], {"role": "tool", "tool_call_id": "call_0", "content": "sunny"}]
    r = oai.chat.completions.create(model="", messages=messages, max_tokens=4, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage is not None and r.usage.completion_tokens > 0


def test_streamed_required_tool_call(oai: OpenAI, service: Service) -> None:
    ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    kwargs: Any = {"model": "", "messages": ask, "temperature": 0, "max_tokens": 64, "tools": WEATHER,
                   "tool_choice": "required"}
    if not getattr(service.engine, "structured_outputs", False):  # the hf engine: refused, naming the field
        with pytest.raises(openai.BadRequestError) as info:
            list(oai.chat.completions.create(stream=True, **kwargs))
        assert info.value.param == "tool_choice"
        return
    chunks = list(oai.chat.completions.create(stream=True, **kwargs))
    deltas = [d for c in chunks for ch in c.choices for d in (ch.delta.tool_calls or [])]
    assert deltas and deltas[0].id and deltas[0].type == "function" and deltas[0].function is not None
    assert deltas[0].function.name == "get_weather" and all(d.index == 0 for d in deltas)
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function is not None)
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["tool_calls"]
    whole = oai.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert whole is not None and json.loads(arguments) == json.loads(whole[0].function.arguments)


# ---- an app with the tools template and vLLM's hermes parser, on the live engine -------------------------


@pytest.fixture(scope="module")
def tools_oai(service: Service, oai: OpenAI) -> Iterator[OpenAI]:
    """The official client on an app of its own (``--chat-template`` the test template, ``--tool-call-parser
    hermes``) over the live server's engine, store and event loop (the vllm engine's front end serves one)."""
    own_settings = replace(service.settings, chat_template=TEMPLATE, tool_call_parser="hermes")
    renderer = PromptRenderer(service.renderer.tokenizer, own_settings.max_prompt_tokens,
                              own_settings.max_prompt_chars, TEMPLATE.read_text())
    app = create_app(Service(own_settings, service.engine, service.store, renderer), own_settings)
    loop = service.supervisor._task.get_loop()  # type: ignore[union-attr]  # the live server's
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))  # the engine is started
    done = asyncio.run_coroutine_threadsafe(server.serve(sockets=[sock]), loop)
    deadline = time.monotonic() + 30
    while not server.started:
        assert not done.done() and time.monotonic() < deadline, "the tools app did not start"
        time.sleep(0.02)
    try:
        with OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key=oai.api_key, max_retries=0,
                    timeout=120) as client:
            yield client
    finally:
        server.should_exit = True
        done.result(timeout=30)
        sock.close()


def test_auto_tool_call_written_by_the_model(tools_oai: OpenAI) -> None:
    plain = tools_oai.chat.completions.create(model="", messages=ASK_BERLIN, tools=WEATHER, tool_choice="none",
                                              temperature=0, max_tokens=40)
    assert plain.choices[0].message.content == CALL.replace("Paris", "Berlin")  # what the model writes, unparsed
    r = tools_oai.chat.completions.create(model="", messages=ASK_BERLIN, tools=WEATHER, temperature=0,
                                          max_tokens=40)  # tool_choice defaults to "auto" with tools
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1 and calls[0].id and calls[0].type == "function"
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Berlin"}


def test_streamed_auto_tool_call(tools_oai: OpenAI) -> None:
    chunks = list(tools_oai.chat.completions.create(model="", messages=ASK_BERLIN, tools=WEATHER, tool_choice="auto",
                                                    temperature=0, max_tokens=40, stream=True))
    deltas = [d for c in chunks for ch in c.choices for d in (ch.delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function is not None and deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function is not None)
    assert json.loads(arguments) == {"city": "Berlin"}
    assert not "".join(ch.delta.content or "" for c in chunks for ch in c.choices)  # the call is not content
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["tool_calls"]


def test_auto_without_a_call_is_content(tools_oai: OpenAI) -> None:
    ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]  # no examples: prose
    r = tools_oai.chat.completions.create(model="", messages=ask, tools=WEATHER, temperature=0, max_tokens=16)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
