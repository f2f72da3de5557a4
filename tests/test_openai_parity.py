"""OpenAI API parity with vLLM's server, through the official client on the live server: logprobs, ``n``,
penalties, ``logit_bias``, and (vllm engine) JSON ``response_format`` and forced tool calls; on the hf engine
those two are a 400 naming the field and the engine that can."""

from __future__ import annotations

import json
import math
from typing import Any

import openai
import pytest
from openai import OpenAI

from steerserve.service import Service

MODEL = "SmolLM2-135M-Instruct"
FRANCE: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
DOG: list[Any] = [{"role": "user", "content": "Repeat the word dog ten times."}]
WEATHER: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"capital": {"type": "string"}, "population": {"type": "integer"}},
          "required": ["capital", "population"], "additionalProperties": False}


def joy(coeff: float) -> dict[str, Any]:
    """An ActAdd love - hate pair at layer 3: enough to change the distribution."""
    return {"steering": {"interventions": [{"method": "actadd", "positive": "I love this, it is wonderful!",
                                            "negative": "I hate this, it is awful!", "layer": 3, "coeff": coeff}]}}


def test_chat_logprobs_are_the_greedy_distribution(oai: OpenAI) -> None:
    r = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12, logprobs=True,
                                    top_logprobs=3)
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert r.usage is not None
    # one entry per shown token (an EOS that ended the reply is counted in usage but not shown)
    assert len(content) in (r.usage.completion_tokens, r.usage.completion_tokens - 1)
    assert "".join(t.token for t in content) == choice.message.content
    assert b"".join(bytes(t.bytes or []) for t in content).decode() == choice.message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(tops[0])  # greedy takes the best
        assert t.logprob <= 0 and sum(math.exp(x) for x in tops) <= 1 + 1e-5


def test_logprobs_show_what_the_steering_did(oai: OpenAI) -> None:
    def first(**kw: Any) -> dict[str, float]:
        r = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=1, logprobs=True,
                                        top_logprobs=5, **kw)
        assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content
        return {x.token: x.logprob for x in r.choices[0].logprobs.content[0].top_logprobs}

    plain, zero, steered = first(), first(extra_body=joy(0.0)), first(extra_body=joy(8.0))
    assert zero == plain  # coefficient 0: the same distribution, bit for bit
    assert steered != plain


def test_completion_logprobs_legacy_shape(oai: OpenAI) -> None:
    r = oai.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6,
                               logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(value) and top[token] == pytest.approx(value)


def test_streamed_logprobs_match(oai: OpenAI) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": FRANCE, "temperature": 0, "max_tokens": 10, "logprobs": True,
                          "top_logprobs": 1}
    whole = oai.chat.completions.create(**kw).choices[0].logprobs
    tokens = [t for c in oai.chat.completions.create(stream=True, **kw) for ch in c.choices
              if ch.logprobs and ch.logprobs.content for t in ch.logprobs.content]
    assert whole is not None and whole.content is not None
    assert [(t.token, round(t.logprob, 4)) for t in tokens] == [(t.token, round(t.logprob, 4)) for t in whole.content]


def test_n_choices_seeded_and_counted(oai: OpenAI) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": FRANCE, "temperature": 1.0, "seed": 5, "max_tokens": 8, "n": 3}
    r = oai.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # choice i samples with seed + i
    assert [c.message.content for c in oai.chat.completions.create(**kw).choices] == texts
    assert r.usage is not None and r.usage.completion_tokens <= 3 * 8 and r.usage.completion_tokens > 8
    streamed: dict[int, str] = {}
    finished: set[int] = set()
    for chunk in oai.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason is not None:
                finished.add(ch.index)
    assert [streamed[i] for i in range(3)] == texts and finished == {0, 1, 2}
    greedy = oai.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=6, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_penalties_break_repetition(oai: OpenAI) -> None:
    def reply(**kw: Any) -> list[str]:
        r = oai.chat.completions.create(model=MODEL, messages=DOG, temperature=0, max_tokens=32, logprobs=True, **kw)
        assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content is not None
        return [t.token for t in r.choices[0].logprobs.content]

    plain, freq, presence = reply(), reply(frequency_penalty=1.5), reply(presence_penalty=1.5)
    assert freq != plain and presence != plain

    def repeats(tokens: list[str]) -> int:
        return len(tokens) - len(set(tokens))

    assert repeats(freq) < repeats(plain) or len(freq) < len(plain)


def test_logit_bias_bans_and_forces(oai: OpenAI, service: Service) -> None:
    paris = service.renderer.tokenize(" Paris")
    assert len(paris) == 1
    base = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    assert "Paris" in (base.choices[0].message.content or "")
    banned = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12,
                                         logit_bias={str(paris[0]): -100})
    assert " Paris" not in (banned.choices[0].message.content or "")
    forced = oai.completions.create(model=MODEL, prompt="Hello", temperature=0, max_tokens=3,
                                    logit_bias={str(paris[0]): 100})
    assert forced.choices[0].text == " Paris Paris Paris"


def _structured_or_refused(service: Service, call: Any, field: str) -> Any:
    """The reply on the vllm engine; on the hf engine, check the 400 names ``field`` and the engine."""
    if service.settings.engine == "hf" or not getattr(service.engine, "structured_outputs", False):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.param == field and "vllm engine" in info.value.message
        return None
    return call()


def test_response_format_json_schema(oai: OpenAI, service: Service) -> None:
    r = _structured_or_refused(service, lambda: oai.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}), "response_format")
    if r is not None:
        value = json.loads(r.choices[0].message.content)
        assert set(value) == {"capital", "population"} and isinstance(value["population"], int)
        plain = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=64)
        with pytest.raises(json.JSONDecodeError):  # unconstrained, the model writes prose
            json.loads(plain.choices[0].message.content or "")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call(oai: OpenAI, service: Service, choice: Any) -> None:
    ask: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = _structured_or_refused(service, lambda: oai.chat.completions.create(
        model=MODEL, messages=ask, temperature=0, max_tokens=64, tools=WEATHER, tool_choice=choice), "tool_choice")
    if r is not None:
        message = r.choices[0].message
        assert message.content is None and message.tool_calls
        call = message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        assert r.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")


def test_streamed_named_tool_call(oai: OpenAI, service: Service) -> None:
    ask: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    named: Any = {"type": "function", "function": {"name": "get_weather"}}

    def call() -> list[Any]:
        return list(oai.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=64, tools=WEATHER,
                                                tool_choice=named, stream=True))

    chunks = _structured_or_refused(service, call, "tool_choice")
    if chunks is not None:
        deltas = [d for c in chunks for ch in c.choices for d in (ch.delta.tool_calls or [])]
        assert deltas[0].function.name == "get_weather" and deltas[0].id
        assert isinstance(json.loads("".join(d.function.arguments or "" for d in deltas))["city"], str)
        assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["stop"]  # OpenAI's
