"""Every invalid input gets its 4xx with the offending field named, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import pytest

from steerserve.api import create_app
from steerserve.config import Settings
from steerserve.prompts import PromptRenderer
from steerserve.service import Service
from steerserve.spec import PromptInfo

VEC = "val-vec"
HI = [{"role": "user", "content": "Hi"}]


def add(**params: Any) -> dict[str, Any]:
    return {"interventions": [{"method": "add", "vector": VEC, "coeff": 2.0, **params}]}


CASES: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("unknown method", {"steering": {"interventions": [{"method": "telepathy"}]}}, 400,
     "steering.interventions.0.method"),
    ("missing method", {"steering": {"interventions": [{"vector": VEC}]}}, 400, "steering.interventions.0.method"),
    ("unknown vector", {"steering": {"interventions": [{"method": "add", "vector": "no-such", "coeff": 1}]}}, 400,
     "steering.interventions.0.vector"),
    ("bad vector ref", {"steering": {"interventions": [{"method": "add", "vector": "x@0", "coeff": 1}]}}, 400,
     "steering.interventions.0.vector"),
    ("layer 30", {"steering": add(layers=[30])}, 400, "steering.interventions.0.layers.0"),
    ("layer -1", {"steering": add(layers=[-1])}, 400, "steering.interventions.0.layers.0"),
    ("second layer bad", {"steering": add(layers=[2, 99])}, 400, "steering.interventions.0.layers.1"),
    ("layer twice", {"steering": add(layers=[2, 2])}, 400, "steering.interventions.0.layers"),
    ("coeff over cap", {"steering": add(coeff=1e6)}, 400, "steering.interventions.0.coeff"),
    ("coeff string", {"steering": add(coeff="big")}, 400, "steering.interventions.0.coeff"),
    ("coeff bool", {"steering": add(coeff=True)}, 400, "steering.interventions.0.coeff"),
    ("too many interventions", {"steering": {"interventions": [add()["interventions"][0]] * 5}}, 400,
     "steering.interventions"),
    ("interventions not a list", {"steering": {"interventions": {"method": "add"}}}, 400, "steering.interventions"),
    ("unknown steering key", {"steering": {"interventions": [], "mode": "fast"}}, 400, "steering"),
    ("steering not an object", {"steering": ["add"]}, 400, "steering"),
    ("unknown add parameter", {"steering": add(strength=3)}, 400, "steering.interventions.0"),
    ("positions middle", {"steering": add(positions="middle")}, 400, "steering.interventions.0.positions"),
    ("actadd missing layer", {"steering": {"interventions": [
        {"method": "actadd", "positive": "Love", "negative": "Hate", "coeff": 3}]}}, 400,
     "steering.interventions.0.layer"),
    ("actadd missing negative", {"steering": {"interventions": [
        {"method": "actadd", "positive": "Love", "layer": 3, "coeff": 3}]}}, 400,
     "steering.interventions.0.negative"),
    ("expert_mask on a dense model", {"steering": {"interventions": [
        {"method": "expert_mask", "experts": {"1": [0]}}]}}, 400, "steering.interventions.0.method"),
    ("ablate unknown vector", {"steering": {"interventions": [{"method": "ablate", "vector": "nope"}]}}, 400,
     "steering.interventions.0.vector"),
    ("empty prompt", {"prompt": "", "messages": None}, 400, "prompt"),
    ("blank prompt", {"prompt": "   ", "messages": None}, 400, "prompt"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("both prompt and messages", {"prompt": "Hi"}, 400, "prompt"),
    ("neither prompt nor messages", {"messages": None}, 400, "prompt"),
    ("bad role", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages.0.role"),
    ("content not a string", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("message missing content", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("prompt not a string", {"prompt": ["Hi"], "messages": None}, 400, "prompt"),
    ("max_tokens 0", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens too large", {"max_tokens": 100000}, 400, "max_tokens"),
    ("max_tokens not an int", {"max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens fractional", {"max_tokens": 2.5}, 400, "max_tokens"),
    ("temperature -1", {"temperature": -1}, 400, "temperature"),
    ("top_p 0", {"top_p": 0}, 400, "top_p"),
    ("too many stops", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("empty stop", {"stop": [""]}, 400, "stop"),
    ("stop not a string", {"stop": 5}, 400, "stop"),
    ("stop item not a string", {"stop": ["ok", 5]}, 400, "stop.1"),
    ("stream not a bool", {"stream": "yes"}, 400, "stream"),
    ("seed too wide", {"seed": 2**70, "temperature": 1.0}, 400, "seed"),
    ("unknown field", {"temprature": 0.5}, 400, "temprature"),
]


@pytest.fixture(scope="module")
def vector(fresh_vector: Callable[[str], dict[str, Any]]) -> str:
    return str(fresh_vector(VEC)["ref"])


def ok(client: httpx.Client) -> None:
    """A valid request still succeeds (sampled and seeded, so the engine's sampling path is exercised too)."""
    r = client.post("/generate", json={"messages": HI, "temperature": 0.7, "seed": 7, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


def check(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert err["type"] == ("invalid_request_error" if status == 400 else err["type"])
    assert err["message"]
    return err


@pytest.mark.parametrize(("body", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_generate(client: httpx.Client, vector: str, body: dict[str, Any], status: int,
                          param: str | None) -> None:
    request = {"messages": HI, "max_tokens": 2, "temperature": 0, **body}
    request = {k: v for k, v in request.items() if v is not None}
    check(client.post("/generate", json=request), status, param)
    if "stream" not in body:  # a streamed request is checked the same way, before the stream starts
        check(client.post("/generate", json={**request, "stream": True}), status, param)
    ok(client)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_coeff_in_raw_json(client: httpx.Client, vector: str, token: str) -> None:
    raw = ('{"prompt": "Hi", "max_tokens": 2, "steering": {"interventions": '
           f'[{{"method": "add", "vector": "{VEC}", "coeff": {token}}}]}}}}')
    r = client.post("/generate", content=raw, headers={"Content-Type": "application/json"})
    err = check(r, 400, "steering.interventions.0.coeff")
    assert "finite" in err["message"]
    ok(client)


def test_nan_temperature(client: httpx.Client) -> None:
    raw = '{"prompt": "Hi", "max_tokens": 2, "temperature": NaN}'
    check(client.post("/generate", content=raw, headers={"Content-Type": "application/json"}), 400, "temperature")
    ok(client)


def test_a_whole_float_is_an_integer(client: httpx.Client) -> None:
    """JSON has one kind of number and JSON Schema calls 3.0 an integer: so does every integer field here
    (the same tokens as with 3); 3.5 and "3" are still refused, naming the field."""
    body = {"messages": HI, "temperature": 0, "seed": 7}
    as_int = client.post("/generate", json={**body, "max_tokens": 3})
    as_float = client.post("/generate", json={**body, "max_tokens": 3.0, "seed": 7.0})
    assert as_int.status_code == as_float.status_code == 200, as_float.text
    assert as_float.json()["text"] == as_int.json()["text"] and as_float.json()["usage"]["completion_tokens"] == 3
    for bad in (3.5, "3"):
        check(client.post("/generate", json={**body, "max_tokens": bad}), 400, "max_tokens")


@pytest.mark.parametrize("raw", ['{"prompt": "Hi",', "", "[1, 2]", '"text"'])
def test_malformed_bodies(client: httpx.Client, raw: str) -> None:
    r = client.post("/generate", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    ok(client)


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/chat/completions", {"messages": HI, "n": 99}, 400, "n"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": "yes"}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": HI, "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema"),
    ("/v1/chat/completions", {"messages": HI, "model": "gpt-4o"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 400,
     "messages.0.tool_calls"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400,
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": HI, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": HI, "steering": {"interventions": [{"method": "add", "coeff": 1}]}}, 400,
     "steering.interventions.0.vector"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "Hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "seed": 2**64, "temperature": 0.7}, 400, "seed"),
])
def test_invalid_openai(client: httpx.Client, path: str, body: dict[str, Any], status: int, param: str) -> None:
    check(client.post(path, json={"max_tokens": 2, **body}), status, param)
    ok(client)


def test_unknown_route_and_method(client: httpx.Client) -> None:
    check(client.get("/v2/whatever"), 404, None)
    check(client.get("/generate"), 405, None)
    ok(client)


class _ExplodingRenderer(PromptRenderer):
    def render(self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
               where: str = "prompt") -> PromptInfo:
        raise RuntimeError("secret internal detail")


class _IdleEngine:
    """Stands in for the live server's engine, which belongs to the server thread's event loop."""

    def __init__(self, engine: Any) -> None:
        self.info, self.hidden_states = engine.info, engine.hidden_states

    async def health(self) -> bool:
        return True

    async def stats(self) -> dict[str, int]:
        return {}


async def test_unexpected_error_is_a_generic_500(service: Service, settings: Settings) -> None:
    """A bug behind the edge answers 500 in the error shape, without its details, and the app keeps serving."""
    engine: Any = _IdleEngine(service.engine)
    broken = Service(settings, engine, service.store, _ExplodingRenderer(service.renderer.tokenizer, 2048))
    app = create_app(broken, settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as ac:
        for path, body in (("/generate", {"prompt": "Hi"}), ("/v1/completions", {"prompt": "Hi"})):
            r = await ac.post(path, json=body)
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert err == {"message": "internal server error", "type": "server_error", "param": None,
                           "code": "internal_error"}
        assert (await ac.get("/v1/models")).status_code == 200
        metrics = (await ac.get("/metrics")).text
        assert 'steerserve_requests_total{route="/generate",status="500"} 1.0' in metrics
