"""Faults on the vllm engine (``VLLMEngine``, engine core in its own process, default compilation).

The engine here has a deliberately tiny KV pool (``BLOCKS`` blocks of ``BLOCK`` tokens), so freed blocks
are handed to the next requests at once, and prefix caching on. That is what turned one request's
overflowing steering into a permanent outage: its NaN keys/values stayed in freed blocks, the next
(unsteered) request that got such a block read them through the attention over its partly filled last
block, and its own now-NaN blocks entered the prefix cache under the unsalted hash of the default chat
prompt; every later request with that prefix answered empty text until restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as exc:  # not installed, or installed with a broken torchvision
    pytest.skip(f"vLLM is not importable here ({type(exc).__name__}: {exc}); install the 'cpu' extra",
                allow_module_level=True)

from transformers import AutoTokenizer
from vllm.v1.engine.exceptions import EngineDeadError

from steerserve.config import Settings
from steerserve.engines.base import GenerationOutput, GenerationRequest, SamplingParams
from steerserve.engines.supervisor import EngineSupervisor
from steerserve.engines.vllm.engine import VLLMEngine
from steerserve.errors import EngineUnavailable
from steerserve.model import model_info, prepare_default_model
from steerserve.prompts import PromptRenderer
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from tests.paths import models_dir

PROMPTS = ["What is the capital of France?", "Tell me a joke.", "Name a color.", "How are you today?", "Say hi."]
BLOCK = 32
BLOCKS = 24  # 768 tokens of KV in all: a few requests' worth
Spec = tuple[SteerOp, ...]


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[VLLMEngine]:
    path = prepare_default_model(models_dir())
    settings = Settings(bank_slots=128, max_batch=8, engine_args={
        "max_num_batched_tokens": 64, "enable_prefix_caching": True, "block_size": BLOCK,
        "num_gpu_blocks_override": BLOCKS, "max_model_len": 512})
    eng = VLLMEngine(path, AutoTokenizer.from_pretrained(path), model_info(path), settings)
    await eng.start()
    yield eng
    await eng.stop()


@pytest.fixture(scope="module")
def prompts(engine: VLLMEngine) -> list[tuple[int, ...]]:
    render = PromptRenderer(engine.tokenizer, 512).render
    return [render(messages=[{"role": "user", "content": p}]).token_ids for p in PROMPTS]  # default system prompt


async def _run(engine: VLLMEngine, ids: Sequence[int], ops: Spec = (), temperature: float = 0.0,
               seed: int | None = None, max_tokens: int = 24, ignore_eos: bool = False) -> list[GenerationOutput]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=ignore_eos)
    return [o async for o in engine.generate(GenerationRequest(uuid.uuid4().hex, tuple(ids), sampling, ops))]


def _tokens(outs: list[GenerationOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def test_degenerate_steering_fails_alone_and_poisons_nothing(engine: VLLMEngine,
                                                                   prompts: list[tuple[int, ...]]) -> None:
    """The fuzzing sequence: a ~3e38 vector (finite in fp32; overflows times the coefficient) added on all
    layers and a NaN ablation direction (what a zero layer normalised to), at temperature 0 and 1, beside
    unsteered default-chat streams, three rounds. Before the fix every default-chat request afterwards
    returned empty text (cached_tokens > 0: the poisoned system-prompt block). Now each degenerate
    request fails alone with a clear error and everything else is bit-identical to a clean run."""
    clean = [_tokens(await _run(engine, p)) for p in prompts]
    huge = VectorRef.of(torch.full((576,), 3e38))
    nan = VectorRef.of(torch.full((576,), float("nan")))
    bad: list[Spec] = [tuple(SteerOp(OpKind.ADD, layer, huge, 100.0) for layer in range(30)),
                       tuple(SteerOp(OpKind.ABLATE, layer, nan, 1.0) for layer in (3, 9))]
    jobs = [(spec, t) for spec in bad for t in (0.0, 1.0)]
    unit = VectorRef.of(torch.randn(576, generator=torch.Generator().manual_seed(7)) / 24)
    normal_at_cap = tuple(SteerOp(OpKind.ADD, layer, unit, 100.0)
                          for layer in range(30))  # norm ~1 x 100: large but finite
    for _ in range(3):
        runs = await asyncio.gather(*(_run(engine, prompts[i % 5], spec, t, max_tokens=60)
                                      for i, (spec, t) in enumerate(jobs)),
                                    _run(engine, prompts[0], normal_at_cap, 1.0),
                                    *(_run(engine, p) for p in prompts))
        for outs in runs[: len(jobs)]:
            last = outs[-1]
            assert last.finish_reason == "abort" and last.extra["status"] == 400, last
            assert "non-finite" in str(last.extra["error"])
        assert not runs[len(jobs)][-1].extra.get("error")  # large but finite: steered, not refused
        assert [_tokens(r) for r in runs[len(jobs) + 1:]] == clean
    after = [await _run(engine, p) for p in prompts]
    assert [_tokens(r) for r in after] == clean
    assert all(r[-1].extra["cached_tokens"] > 0 for r in after)  # served from prefix-cache blocks, still clean
    stats = await engine.stats()
    assert stats["steered"] == 0 and stats["pinned_rows"] == 0 and stats["gate_rows"] == 0


async def test_seeded_sampling_with_chunked_prefill(engine: VLLMEngine) -> None:
    """Three concurrent seeded, sampled requests whose prompts are prefilled in several chunks: vLLM 0.32's
    CPU worker died in its sampler bookkeeping (``CPU Generator does not use offset``). Now they run, the
    same seeds give the same text, and the engine keeps serving."""
    render = PromptRenderer(engine.tokenizer, 512).render
    long = [render(messages=[{"role": "user", "content": f"{i}: " + "Tell me about the sea. " * 28}]).token_ids
            for i in range(3)]
    assert all(len(p) > 3 * 64 for p in long)  # at least four prefill chunks each

    async def batch() -> list[list[int]]:
        runs = await asyncio.gather(*(_run(engine, p, temperature=0.7, seed=i, max_tokens=16)
                                      for i, p in enumerate(long)))
        assert all(not r[-1].extra.get("error") for r in runs)
        return [_tokens(r) for r in runs]

    first = await batch()
    assert await batch() == first
    assert await engine.health()
    other = _tokens(await _run(engine, long[0], temperature=0.7, seed=99, max_tokens=16))
    assert other != first[0]


Running = tuple["asyncio.Task[list[GenerationOutput]]", asyncio.Event]


async def _until_out(engine: VLLMEngine, ids: Sequence[int], ops: Spec = ()) -> Running:
    """A long request run in a task, and an event set once its first tokens are out (it is decoding)."""
    decoding = asyncio.Event()

    async def run() -> list[GenerationOutput]:
        sampling = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        outs = []
        async for o in engine.generate(GenerationRequest(uuid.uuid4().hex, tuple(ids), sampling, ops)):
            outs.append(o)
            decoding.set()
        return outs

    return asyncio.ensure_future(run()), decoding


async def _ends_503(call: asyncio.Future[Any]) -> str:
    """How a request bound to the dead engine ended: it must end (within the wait) and with a 503."""
    try:
        outs = await asyncio.wait_for(call, 60)
    except EngineUnavailable as exc:  # refused before vLLM took it, or a capture: the 503 with Retry-After
        assert exc.status == 503 and exc.retry_after > 0
        return "refused"
    except EngineDeadError:  # an RPC of the front end's own (stats)
        return "dead"
    assert isinstance(outs, list) and outs[-1].finish_reason == "abort", outs
    assert outs[-1].extra["status"] == 503 and outs[-1].extra["code"] == "engine_failed"
    return "failed"


async def test_a_killed_engine_core_is_restarted(engine: VLLMEngine, prompts: list[tuple[int, ...]]) -> None:
    """Kill the engine core with requests at every point of their life, and every one of them ends with a
    503 (or the error its caller maps to one) within seconds; then the supervisor starts a new engine that
    serves the same tokens as before. (Last in this module.)

    SIGSTOP first freezes the core wherever it is, so that what is sent next is reliably in flight at the
    moment of death: a request vLLM has taken but the core never scheduled (added at the moment it died), a
    hidden-state capture (an actadd pair's), and one of the front end's own RPCs to the worker (the call
    that used to wait forever: vLLM never fails a utility call's future when the core dies). Beside them a
    steered request is decoding and a long prompt is in prefill (64-token chunks)."""
    before = _tokens(await _run(engine, prompts[0]))
    supervisor = EngineSupervisor(engine, max_restarts=1, interval=0.2, exit_fn=lambda code: None)
    render = PromptRenderer(engine.tokenizer, 512).render
    long = render(messages=[{"role": "user", "content": "Tell me about the sea. " * 60}]).token_ids
    assert len(long) > 5 * 64
    core = engine.llm.engine_core.resources.engine_manager.processes[0]
    steered = (SteerOp(OpKind.ADD, 5, VectorRef.of(torch.randn(1, engine.info.hidden_size)), 2.0),)
    try:
        decoding, started = await _until_out(engine, prompts[1], steered)
        await asyncio.wait_for(started.wait(), 60)
        prefill, _ = await _until_out(engine, long)
        await asyncio.sleep(0.05)
        os.kill(core.pid, signal.SIGSTOP)
        added = [asyncio.ensure_future(_run(engine, p, ops)) for p, ops in ((prompts[2], ()), (prompts[3], steered))]
        capture = asyncio.ensure_future(engine.hidden_states([prompts[4]], [3]))
        stats = asyncio.ensure_future(engine.stats())
        await asyncio.sleep(1.0)  # all sent; the core holds them unread
        assert not any(f.done() for f in (decoding, prefill, *added, capture, stats))
        supervisor.start()
        os.kill(core.pid, signal.SIGKILL)
        ends = [await _ends_503(f) for f in (decoding, prefill, *added, capture, stats)]
        assert ends[:2] == ["failed", "failed"], ends
        assert ends[4:] == ["refused", "dead"], ends
        for _ in range(600):
            if supervisor.restarts == 1 and await engine.health():
                break
            await asyncio.sleep(0.5)
        assert supervisor.restarts == 1
        assert _tokens(await _run(engine, prompts[0])) == before
        assert (await engine.stats())["gate_rows"] == 0  # nothing the dead requests held is still held
    finally:
        await supervisor.stop()
