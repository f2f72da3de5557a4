"""The hf engine's continuous batch: distinct specs share forward passes and still get their own tokens."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from steerserve.config import Settings
from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.model import load_hf, prepare_default_model
from steerserve.prompts import PromptRenderer
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from tests.paths import models_dir

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits.",
           "Who are you?", "Explain gravity in one sentence."]


@pytest.fixture(scope="module")
def engine(hf_engine: HFEngine) -> HFEngine:
    return hf_engine


async def _run(engine: HFEngine, req: GenerationRequest) -> tuple[list[int], str, str | None]:
    ids: list[int] = []
    text, reason = "", None
    async for out in engine.generate(req):
        ids += out.token_ids
        text += out.text
        reason = out.finish_reason
    return ids, text, reason


def _requests(engine: HFEngine, max_tokens: int = 16) -> list[GenerationRequest]:
    render = PromptRenderer(engine.tokenizer, 512).render
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(576, generator=g) for _ in range(4)]
    r = v[3] / v[3].norm()
    n = engine.info.num_layers
    specs: list[tuple[SteerOp, ...]] = [
        (),  # unsteered
        tuple(SteerOp(OpKind.ADD, layer, VectorRef.of(v[0]), 1.5) for layer in range(n)),
        (SteerOp(OpKind.ADD, 6, VectorRef.of(torch.randn(4, 576, generator=g)), 4.0, 24, 28, positional=True),),
        tuple(SteerOp(OpKind.ABLATE, layer, VectorRef.of(r), 1.0) for layer in range(n))
        + (SteerOp(OpKind.ADD, 12, VectorRef.of(v[1]), 3.0, start=30),),
        tuple(SteerOp(OpKind.ADD, layer, VectorRef.of(v[2]), -2.0) for layer in range(0, n, 2)),
    ]
    return [GenerationRequest(f"r{i}", render(messages=[{"role": "user", "content": p}]).token_ids,
                              SamplingParams(max_tokens=max_tokens, temperature=0.0), ops)
            for i, (p, ops) in enumerate(zip(PROMPTS, specs, strict=True))]


async def test_mixed_batch_matches_each_request_alone(engine: HFEngine) -> None:
    reqs = _requests(engine)
    alone = [await _run(engine, r) for r in reqs]
    together = await asyncio.gather(*[_run(engine, r) for r in reqs])
    assert [a[0] for a in alone] == [t[0] for t in together]
    # the specs really differ: steered requests do not all produce the unsteered text
    unsteered_same_prompt = await _run(engine, replace(reqs[1], ops=()))
    assert unsteered_same_prompt[0] != alone[1][0]


async def test_requests_join_while_others_decode(engine: HFEngine) -> None:
    reqs = _requests(engine, max_tokens=12)
    alone = [await _run(engine, r) for r in reqs[:3]]

    async def late(req: GenerationRequest, delay: float) -> tuple[list[int], str, str | None]:
        await asyncio.sleep(delay)
        return await _run(engine, req)

    staggered = await asyncio.gather(late(reqs[0], 0), late(reqs[1], 0.3), late(reqs[2], 0.6))
    assert [s[0] for s in staggered] == [a[0] for a in alone]


async def test_abort_releases_bank_rows(engine: HFEngine) -> None:
    req = _requests(engine, max_tokens=200)[1]
    gen = engine.generate(req)
    first = await gen.__anext__()
    assert first.finish_reason is None
    key = req.ops[0].vector.key
    await gen.aclose()  # a client disconnecting
    await asyncio.wrap_future(engine.call(lambda: None))  # the engine has processed the abort
    entry = engine.bank._entries[key]
    assert entry.refs == 0


async def test_full_bank_makes_requests_wait_not_fail() -> None:
    model, tokenizer, info = load_hf(prepare_default_model(models_dir()))
    eng = HFEngine(model, tokenizer, info, Settings(max_batch=8, bank_slots=3))  # 2 usable rows
    await eng.start()
    try:
        ids = tuple(PromptRenderer(tokenizer, 512).render(prompt="Once upon a time").token_ids)
        reqs = [GenerationRequest(f"b{i}", ids, SamplingParams(max_tokens=4, temperature=0.0),
                                  (SteerOp(OpKind.ADD, 3, VectorRef.of(torch.full((2, 576), float(i + 1))),
                                           0.01, 0, 2, positional=True),))
                for i in range(3)]  # each needs both rows: they must run one after another
        results = await asyncio.wait_for(asyncio.gather(*[_run(eng, r) for r in reqs]), timeout=120)
        assert all(r[2] == "length" and len(r[0]) == 4 for r in results)
    finally:
        await eng.stop()
