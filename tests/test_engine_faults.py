"""One bad request must not hurt another, on the hf engine: a request whose steering overflows, or that
fails in its first forward pass, ends alone with an error and releases its bank rows; the batch around it
keeps its exact tokens; seeded sampling is reproducible; a dead engine thread is restarted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from steerserve.api import create_app
from steerserve.config import Settings
from steerserve.engines.base import GenerationOutput, GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.engines.supervisor import EngineSupervisor
from steerserve.prompts import PromptRenderer
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.service import Service
from steerserve.store.artifacts import ArtifactStore

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits."]
Spec = tuple[SteerOp, ...]
HUGE = VectorRef.of(torch.full((576,), 3e38))  # finite in fp32; times any coefficient > 1 it overflows
NAN = VectorRef.of(torch.full((576,), float("nan")))  # what a zero layer normalised to, before the fix


@pytest.fixture(scope="module")
def prompts(hf_engine: HFEngine) -> list[tuple[int, ...]]:
    render = PromptRenderer(hf_engine.tokenizer, 512).render
    return [render(messages=[{"role": "user", "content": p}]).token_ids for p in PROMPTS]


async def _run(engine: HFEngine, ids: Sequence[int], ops: Spec = (), temperature: float = 0.0,
               seed: int | None = None, max_tokens: int = 16) -> list[GenerationOutput]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    req = GenerationRequest(uuid.uuid4().hex, tuple(ids), sampling, ops)
    return [o async for o in engine.generate(req)]


def _tokens(outs: list[GenerationOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.mark.parametrize("bad", [
    tuple(SteerOp(OpKind.ABLATE, layer, NAN, 1.0) for layer in (2, 7)),
    tuple(SteerOp(OpKind.ADD, layer, HUGE, 100.0) for layer in range(30)),
    (SteerOp(OpKind.ADD, 5, HUGE, 10.0, start=40),),  # overflows only once decoding has begun
], ids=["nan-ablation", "huge-add", "huge-add-mid-decode"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_overflowing_steering_fails_alone(hf_engine: HFEngine, prompts: list[tuple[int, ...]], bad: Spec,
                                                temperature: float) -> None:
    alone = [_tokens(await _run(hf_engine, p)) for p in prompts[1:]]
    runs = await asyncio.gather(_run(hf_engine, prompts[0], bad, temperature),
                                *(_run(hf_engine, p) for p in prompts[1:]))
    last = runs[0][-1]
    assert last.finish_reason == "abort" and last.extra["status"] == 400
    assert last.extra["code"] == "steering_non_finite" and "non-finite" in str(last.extra["error"])
    assert [_tokens(r) for r in runs[1:]] == alone  # the batch around it: bit-identical tokens
    stats = await hf_engine.stats()
    assert stats["pinned_rows"] == 0 and stats["steered"] == 0 and stats["running"] == 0
    assert _tokens(await _run(hf_engine, prompts[0])) == _tokens(await _run(hf_engine, prompts[0]))


async def test_a_failure_in_prefill_answers_and_releases_everything(hf_engine: HFEngine,
                                                                    prompts: list[tuple[int, ...]]) -> None:
    """A request the model itself cannot run (a token id outside the vocabulary) fails in its first forward
    pass: it must get an error, not hang; its bank rows are released; the others are untouched."""
    v = VectorRef.of(torch.randn(576, generator=torch.Generator().manual_seed(3)))
    broken = (*prompts[0], 10**9)
    alone = _tokens(await _run(hf_engine, prompts[1]))
    runs = await asyncio.wait_for(asyncio.gather(
        _run(hf_engine, broken, (SteerOp(OpKind.ADD, 4, v, 2.0),), 1.0), _run(hf_engine, prompts[1])), 120)
    assert runs[0][-1].finish_reason == "abort" and runs[0][-1].extra.get("error")
    assert _tokens(runs[1]) == alone
    assert (await hf_engine.stats())["pinned_rows"] == 0


async def test_seeded_sampling_is_reproducible(hf_engine: HFEngine, prompts: list[tuple[int, ...]]) -> None:
    first = await asyncio.gather(*(_run(hf_engine, p, temperature=0.9, seed=i) for i, p in enumerate(prompts)))
    again = await asyncio.gather(*(_run(hf_engine, p, temperature=0.9, seed=i) for i, p in enumerate(prompts)))
    assert [_tokens(r) for r in first] == [_tokens(r) for r in again]
    other = await _run(hf_engine, prompts[0], temperature=0.9, seed=12345)
    assert _tokens(other) != _tokens(first[0])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the kill is the point
async def test_a_dead_engine_thread_is_restarted(hf_engine: HFEngine, prompts: list[tuple[int, ...]],
                                                 settings: Settings, tmp_path: Path) -> None:
    """Kill the engine thread the way a fatal error would (an exception no ``except Exception`` catches),
    with requests in flight over HTTP: the non-streaming one is answered 503 ``engine_failed`` with
    ``Retry-After``, the stream ends with that error event and ``[DONE]`` (not 200 and then nothing), the
    supervisor starts a new thread, and the engine serves the same tokens as before."""
    before = _tokens(await _run(hf_engine, prompts[2]))
    store = ArtifactStore(tmp_path / hf_engine.info.fingerprint, hf_engine.info)
    app_settings = replace(settings, engine="hf")
    service = Service(app_settings, hf_engine, store, PromptRenderer(hf_engine.tokenizer, 512))
    service.supervisor = EngineSupervisor(hf_engine, max_restarts=2, interval=0.1, exit_fn=lambda code: None)
    service.supervisor.start()
    body = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 200, "ignore_eos": True,
            "temperature": 0}
    transport = httpx.ASGITransport(app=create_app(service, app_settings))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:

            async def stream() -> list[str]:
                async with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
                    assert r.status_code == 200
                    return [line async for line in r.aiter_lines() if line.startswith("data: ")]

            plain = asyncio.ensure_future(client.post("/generate", json=body))
            streamed = asyncio.ensure_future(stream())
            await asyncio.sleep(1.0)

            def die() -> None:
                raise SystemExit("simulated fatal engine error")

            hf_engine.call(die)
            r = await asyncio.wait_for(plain, 60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed", r.text
            assert int(r.headers["retry-after"]) >= 1
            events = await asyncio.wait_for(streamed, 60)
            assert events[-1] == "data: [DONE]" and "engine_failed" in events[-2], events[-3:]
        for _ in range(100):
            if service.supervisor.restarts == 1 and await hf_engine.health():
                break
            await asyncio.sleep(0.1)
        assert service.supervisor.restarts == 1
        assert _tokens(await _run(hf_engine, prompts[2])) == before
        assert (await hf_engine.stats())["pinned_rows"] == 0 and service.admission.pending == 0
    finally:
        await service.supervisor.stop()
        store.close()


async def test_too_many_restarts_exit_the_process(hf_engine: HFEngine) -> None:
    codes: list[int] = []

    class Dead:
        async def health(self) -> bool:
            return False

        async def stop(self) -> None:
            return None

        async def start(self) -> None:
            return None

    supervisor = EngineSupervisor(Dead(), max_restarts=2, interval=0.01, exit_fn=codes.append)  # type: ignore[arg-type]
    supervisor.start()
    await asyncio.sleep(0.3)
    await supervisor.stop()
    assert supervisor.restarts >= 2 and codes and codes[0] == 3
