"""The OpenAI-compatible endpoints, driven by the official ``openai`` client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

MODEL = "SmolLM2-135M-Instruct"
FRANCE: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
STORY: list[Any] = [{"role": "user", "content": "Tell me a short story about a dog."}]


def steering(vector: str, coeff: float) -> dict[str, Any]:
    return {"steering": {"interventions": [{"method": "add", "vector": vector, "layers": "all", "coeff": coeff}]}}


def chat(oai: OpenAI, messages: list[Any] = STORY, **kw: Any) -> Any:
    return oai.chat.completions.create(**{"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 16,
                                          **kw})


def test_models_list(oai: OpenAI) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "steerserve"
    assert oai.models.retrieve(MODEL).id == MODEL


def test_chat_greedy_knows_paris(oai: OpenAI) -> None:
    r = chat(oai, FRANCE)
    assert r.object == "chat.completion"
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_completion_tokens(oai: OpenAI) -> None:
    r = oai.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 3


def test_completions(oai: OpenAI) -> None:
    r = oai.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert r.object == "text_completion"
    assert r.choices[0].text.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    listed = oai.completions.create(model=MODEL, prompt=["The capital of France is"], temperature=0, max_tokens=8)
    assert listed.choices[0].text == r.choices[0].text


def test_completions_stream(oai: OpenAI) -> None:
    whole = oai.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=8)
    chunks = list(oai.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=8,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stream_matches_non_stream(oai: OpenAI) -> None:
    whole = chat(oai)
    chunks = list(chat(oai, stream=True))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1


def test_stream_include_usage(oai: OpenAI) -> None:
    chunks = list(chat(oai, stream=True, max_tokens=4, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_steering_via_extra_body(oai: OpenAI, fresh_vector: Callable[[str], dict[str, Any]]) -> None:
    fresh_vector("oai-steer")
    plain = chat(oai)
    steered = chat(oai, extra_body=steering("oai-steer", 8.0))
    zero = chat(oai, extra_body=steering("oai-steer", 0.0))
    assert steered.choices[0].message.content != plain.choices[0].message.content
    assert zero.choices[0].message.content == plain.choices[0].message.content
    assert zero.usage == plain.usage
    report = (steered.model_extra or {})["steering"]
    assert report["applied"][0]["artifacts"] == ["oai-steer@1"]


def test_steered_stream(oai: OpenAI, fresh_vector: Callable[[str], dict[str, Any]]) -> None:
    fresh_vector("oai-steer")
    whole = chat(oai, extra_body=steering("oai-steer", 8.0))
    chunks = list(chat(oai, stream=True, extra_body=steering("oai-steer", 8.0)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert (chunks[0].model_extra or {})["steering"]["applied"][0]["artifacts"] == ["oai-steer@1"]


def test_bad_steering_names_field(oai: OpenAI, fresh_vector: Callable[[str], dict[str, Any]]) -> None:
    fresh_vector("oai-steer")
    with pytest.raises(openai.BadRequestError) as info:
        chat(oai, extra_body=steering("oai-steer", 1e6))
    body = info.value.body
    assert isinstance(body, dict)
    assert body["param"] == "steering.interventions.0.coeff"
    assert body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        chat(oai, extra_body={"steering": {"interventions": [{"method": "nope"}]}})
    assert info.value.param == "steering.interventions.0.method"
    with pytest.raises(openai.BadRequestError) as info:
        chat(oai, stream=True, extra_body=steering("no-such-vector", 1.0))
    assert info.value.param == "steering.interventions.0.vector"


def test_wrong_model_is_not_found(oai: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="gpt-4o", messages=FRANCE, max_tokens=2)
    assert info.value.param == "model"
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4o")


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"n": 99}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias.99999999"),
    ({"logit_bias": {"42": 101}}, "logit_bias.42"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"max_completion_tokens": 100000}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 9}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_unsupported_values_are_refused(oai: OpenAI, kwargs: dict[str, Any], param: str) -> None:
    args: dict[str, Any] = {"model": MODEL, "messages": FRANCE, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(**args)
    assert info.value.param == param


def test_content_parts_and_unknown_fields(oai: OpenAI, base_url: str) -> None:
    parts: list[Any] = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    r = oai.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=16, user="u1",
                                    extra_body={"some_future_field": {"x": 1}})
    assert r.choices[0].message.content == chat(oai, FRANCE).choices[0].message.content
    bad = httpx.post(f"{base_url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "messages.0.content.0.type"
