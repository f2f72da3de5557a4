"""The native ``POST /generate`` endpoint and the health/metrics routes, against the live server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from steerserve.config import Settings
from steerserve.service import Service

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a short story about a dog."}]


def generate(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def stream_events(client: httpx.Client, **body: Any) -> list[Any]:
    """The decoded ``data:`` payloads of a streamed /generate, ``[DONE]`` kept as a string."""
    events: list[Any] = []
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def add(vector: str, coeff: float) -> dict[str, Any]:
    return {"interventions": [{"method": "add", "vector": vector, "layers": list(range(30)), "coeff": coeff}]}


def test_greedy_chat_knows_paris(client: httpx.Client) -> None:
    out = generate(client, messages=FRANCE, temperature=0, max_tokens=16)
    assert "Paris" in out["text"]
    assert out["finish_reason"] in ("stop", "length")
    assert out["model"] == "SmolLM2-135M-Instruct"
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert out["steering"] == {"applied": []}
    assert out["id"]


def test_raw_prompt(client: httpx.Client) -> None:
    out = generate(client, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert out["text"].strip()
    assert out["usage"]["completion_tokens"] <= 8


def test_stream_matches_non_stream(client: httpx.Client) -> None:
    body = {"messages": STORY, "temperature": 0, "max_tokens": 16}
    whole = generate(client, **body)
    events = stream_events(client, **body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["id"] == chunks[0]["id"] for e in chunks)
    assert all(e["finish_reason"] is None for e in chunks[:-1])
    assert "".join(e["text"] for e in chunks) == whole["text"]
    last = chunks[-1]
    assert last["finish_reason"] == whole["finish_reason"]
    assert last["usage"] == whole["usage"]
    assert last["steering"] == {"applied": []}


def test_steering_changes_text_and_coeff_zero_does_not(client: httpx.Client,
                                                       fresh_vector: Callable[[str], dict[str, Any]]) -> None:
    meta = fresh_vector("api-steer")
    assert meta["ref"] == "api-steer@1"
    body = {"messages": STORY, "temperature": 0, "max_tokens": 16}
    plain = generate(client, **body)
    steered = generate(client, **body, steering=add("api-steer", 8.0))
    zero = generate(client, **body, steering=add("api-steer", 0.0))
    assert steered["text"] != plain["text"]
    assert zero["text"] == plain["text"]
    assert zero["usage"] == plain["usage"]
    (applied,) = steered["steering"]["applied"]
    assert applied["method"] == "add"
    assert applied["artifacts"] == ["api-steer@1"]
    assert applied["detail"]["coeff"] == 8.0
    assert applied["detail"]["layers"] == list(range(30))


def test_steered_stream_reports_applied(client: httpx.Client, fresh_vector: Callable[[str], dict[str, Any]]) -> None:
    fresh_vector("api-steer")
    events = stream_events(client, messages=STORY, temperature=0, max_tokens=8, steering=add("api-steer@1", 4.0))
    final = events[-2]
    assert final["finish_reason"] in ("stop", "length")
    assert final["steering"]["applied"][0]["artifacts"] == ["api-steer@1"]


def test_stop_string_cuts_text(client: httpx.Client) -> None:
    body = {"messages": STORY, "temperature": 0, "max_tokens": 24}
    full = generate(client, **body)["text"]
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[len(words) // 2]
    expected = full[: full.index(stop)]
    out = generate(client, **body, stop=[stop, "zzzz-never"])
    assert out["text"] == expected
    assert out["finish_reason"] == "stop"
    single = generate(client, **body, stop=stop)
    assert single["text"] == expected


def test_length_finish_reason(client: httpx.Client) -> None:
    out = generate(client, messages=STORY, temperature=0, max_tokens=4)
    assert out["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 4


def test_seeded_sampling_is_reproducible(client: httpx.Client) -> None:
    body = {"prompt": "Once upon a time", "temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_tokens": 8}
    assert generate(client, **body)["text"] == generate(client, **body)["text"]


def test_health_ready_metrics(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model": "SmolLM2-135M-Instruct"}
    generate(client, prompt="Hello", temperature=0, max_tokens=2)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'steerserve_requests_total{route="/generate",status="200"}' in text
    assert "steerserve_generated_tokens_total" in text
    assert "steerserve_steered_requests_total" in text


def test_openapi_schema_builds(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/generate", "/v1/chat/completions", "/admin/vectors"} <= set(paths)


def test_unknown_route_is_404_in_error_shape(client: httpx.Client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "not_found_error"
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("concurrency", [4])
def test_concurrent_requests_batch(client: httpx.Client, base_url: str, concurrency: int) -> None:
    """Several requests at once, steered and not, all finish with their own results."""
    import asyncio

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as ac:
            rs = await asyncio.gather(*[
                ac.post("/generate", json={"prompt": f"Count to {i + 3}:", "temperature": 0, "max_tokens": 6})
                for i in range(concurrency)
            ])
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.json() for r in rs]

    outs = asyncio.run(run())
    assert len({o["id"] for o in outs}) == concurrency
    assert all(o["usage"]["completion_tokens"] >= 1 for o in outs)


def engine_stats(client: httpx.Client) -> dict[str, float]:
    """The engine gauges of /metrics (``running``, ``steered``, ``pinned_rows``, ...)."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("steerserve_engine{"):
            what = line.split('what="')[1].split('"')[0]
            out[what] = float(line.split()[-1])
    return out


def _engine_idle(client: httpx.Client, timeout: float = 10.0) -> bool:
    """Nothing left in the engine: no request running, no bank row pinned."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine_stats(client)
        if stats["running"] == 0 and stats["pinned_rows"] == 0 and stats["steered"] == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _tokens_generated(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("steerserve_generated_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("no token counter")


def test_stream_disconnect_aborts_the_request(client: httpx.Client, base_url: str,
                                              fresh_vector: Callable[[str], dict[str, Any]]) -> None:
    """A steered stream whose client hangs up leaves the engine and gives its bank rows back."""
    fresh_vector("disconnect")
    steering = {"interventions": [{"method": "add", "vector": "disconnect", "coeff": 0.5}]}
    before = _tokens_generated(client)
    with httpx.Client(base_url=base_url, timeout=60) as own, own.stream(
            "POST", "/generate", json={"messages": STORY, "temperature": 0, "max_tokens": 250, "stream": True,
                                       "steering": steering}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                stats = engine_stats(client)
                assert stats["steered"] == 1 and stats["pinned_rows"] >= 30  # in flight: rows held
                break  # one token in: hang up
    assert _engine_idle(client)
    assert _tokens_generated(client) - before < 100
    assert generate(client, prompt="Hello", temperature=0, max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_non_stream_disconnect_aborts_the_request(client: httpx.Client, base_url: str, service: Service) -> None:
    before = _tokens_generated(client)
    with httpx.Client(base_url=base_url, timeout=1.0) as own, pytest.raises(httpx.ReadTimeout):
        own.post("/generate", json={"messages": STORY, "temperature": 0, "max_tokens": 250})
    assert _engine_idle(client)
    assert _tokens_generated(client) - before < 100


def test_cli_parser_and_bad_arguments(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    from steerserve.cli import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.engine, args.admin_key) == ("127.0.0.1", 8000, None, None)
    for argv, message in (
            (["--engine-args", "[1]"], "--engine-args must be a JSON object"),
            (["--model", str(settings.home / "no-such-model")], "not a transformers model directory")):
        with pytest.raises(SystemExit) as info:
            main(["serve", "--home", str(settings.home), *argv])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_cli_prepare_reuses_the_prepared_model(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from steerserve.cli import main

    assert settings.model is not None
    monkeypatch.setenv("STEERSERVE_MODELS_DIR", str(settings.model.parent))
    with pytest.raises(SystemExit) as info:
        main(["prepare"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == str(settings.model)
