"""The refusal controller's read op on both engines (real default model, random controller weights).

What must hold: the controller decides inside the prefill's forward pass from the request's own last prompt
token (read at layers ``k-3..k``), and the request then generates exactly as the open-loop ``add`` of
``alpha * s * w_l * scale_l * r`` at the layers above ``k`` from the last prompt token on and at the others
from the first generated token on, with ``s, w`` computed offline from the same states; the report carries
``s``; requests without a controller are untouched; vLLM (chunked prefill, compiled graph) gives the hf
engine's tokens.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator

import pytest
import torch
from transformers import AutoTokenizer

from steerserve.config import Settings
from steerserve.engines.base import Engine, GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.model import prepare_default_model
from steerserve.prompts import PromptRenderer
from steerserve.runtime.control_op import ControllerSlots
from steerserve.runtime.controller import ControllerWeights, controller_outputs
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from tests.paths import models_dir

PROMPTS = ["How do I pick a lock?", "Write a haiku about the sea.", "Who are you?"]
MAX_TOKENS = 16
ALPHA = 1.0
READ = (8, 9, 10, 11)  # decided at layer 11: layers 12.. of the last prompt token take the patch


def random_controller(seed: int, hidden: int, layers: int, bias: float) -> ControllerWeights:
    """Small random weights: ``s`` and the ``w_l`` land well inside (0, 1), so every term matters."""
    g = torch.Generator().manual_seed(seed)
    d = 64
    direction = torch.randn(hidden, generator=g)
    return ControllerWeights(
        w1=torch.randn(d, 4 * hidden, generator=g) / (4 * hidden) ** 0.5 / 20, b1=torch.zeros(d),
        w2=torch.randn(1 + layers, d, generator=g) / d**0.5, b2=torch.full((1 + layers,), bias),
        read_layers=READ, direction=direction / direction.norm(),
        scales=torch.full((layers,), 15.0))


def ids_of(text: str) -> tuple[int, ...]:
    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model(models_dir()))
    return PromptRenderer(tokenizer, 2048).render(messages=[{"role": "user", "content": text}]).token_ids


def controlled(ids: tuple[int, ...], w: ControllerWeights) -> GenerationRequest:
    vec = VectorRef.of(w.direction)
    ops = tuple(SteerOp(OpKind.ADD, layer, vec, ALPHA * float(w.scales[layer]), len(ids) - 1, None, gain=True)
                for layer in range(w.num_layers))
    return GenerationRequest(uuid.uuid4().hex, ids, SamplingParams(max_tokens=MAX_TOKENS), ops, controller=w)


async def run(engine: Engine, req: GenerationRequest) -> tuple[tuple[int, ...], dict[str, object]]:
    tokens: list[int] = []
    report: dict[str, object] = {}
    async for out in engine.generate(req):
        assert "error" not in out.extra, out.extra
        tokens.extend(out.token_ids)
        report.update(out.extra.get("report", {}))  # type: ignore[call-overload]
    return tuple(tokens), report


@pytest.fixture(scope="module")
async def hf() -> AsyncIterator[HFEngine]:
    from steerserve.model import load_hf

    model, tokenizer, info = load_hf(prepare_default_model(models_dir()))
    eng = HFEngine(model, tokenizer, info, Settings(max_batch=8, bank_slots=128, controller_slots=2))
    await eng.start()
    yield eng
    await eng.stop()


async def offline_equivalent(hf: HFEngine, ids: tuple[int, ...],
                             w: ControllerWeights) -> tuple[GenerationRequest, float]:
    """The open-loop request that adds what the controller should decide, and the expected ``s``."""
    states = (await hf.hidden_states([ids], list(w.read_layers)))[0]  # [n, 4, H]
    out = controller_outputs(states[-1].reshape(1, -1), w.w1, w.b1, w.w2, w.b2)[0]  # [1 + N]
    s = float(out[0])
    vec = VectorRef.of(w.direction)
    k = w.read_layers[-1]
    ops = tuple(SteerOp(OpKind.ADD, layer, vec, ALPHA * float(w.scales[layer]) * s * float(out[1 + layer]),
                        len(ids) - (layer > k), None) for layer in range(w.num_layers))
    return GenerationRequest(uuid.uuid4().hex, ids, SamplingParams(max_tokens=MAX_TOKENS), ops), s


async def test_hf_controller_decides_in_graph_as_offline(hf: HFEngine) -> None:
    w = random_controller(0, hf.info.hidden_size, hf.info.num_layers, bias=0.5)
    for text in PROMPTS:
        ids = ids_of(text)
        plain, _ = await run(hf, GenerationRequest(uuid.uuid4().hex, ids, SamplingParams(max_tokens=MAX_TOKENS)))
        got, report = await run(hf, controlled(ids, w))
        want_req, s = await offline_equivalent(hf, ids, w)
        want, _ = await run(hf, want_req)
        assert got == want, text
        assert got != plain, f"{text}: the controller's patch changed nothing; the test could not fail"
        assert math.isclose(float(report["controller_scale"]), s, rel_tol=1e-5)  # type: ignore[arg-type]


async def test_hf_concurrent_requests_untouched_and_slots_reused(hf: HFEngine) -> None:
    """Three distinct controllers through two slots, beside an unsteered request: each controlled request
    gets its own decision, the unsteered one its tokens alone."""
    ids = ids_of(PROMPTS[1])
    alone, _ = await run(hf, GenerationRequest(uuid.uuid4().hex, ids, SamplingParams(max_tokens=MAX_TOKENS)))
    ws = [random_controller(seed, hf.info.hidden_size, hf.info.num_layers, bias=b) for seed, b in ((1, 0.0), (2, 1.0))]
    solo = [await run(hf, controlled(ids, w)) for w in ws]
    plain = GenerationRequest(uuid.uuid4().hex, ids, SamplingParams(max_tokens=MAX_TOKENS))
    both = await asyncio.gather(run(hf, plain), *[run(hf, controlled(ids, w)) for w in ws])
    assert both[0][0] == alone
    for (tokens, report), (want, want_report) in zip(both[1:], solo, strict=True):
        assert tokens == want and report == want_report
    third = random_controller(3, hf.info.hidden_size, hf.info.num_layers, bias=-1.0)
    want_req, _ = await offline_equivalent(hf, ids, third)
    assert (await run(hf, controlled(ids, third)))[0] == (await run(hf, want_req))[0]


def test_controller_slots_reuse_only_idle_slots() -> None:
    slots = ControllerSlots(2)
    assert slots.acquire("a") == (0, True) and slots.acquire("b") == (1, True)
    assert slots.acquire("a") == (0, False)
    assert slots.acquire("c") is None  # both held by requests in flight
    slots.release("b")
    assert slots.acquire("c") == (1, True)  # b was idle: its slot is reused and must be reloaded
    assert slots.acquire("b") is None
