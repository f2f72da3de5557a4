"""SafeSwitch's runtime on both engines (real default model, random probes and head).

What must hold: the probes read the post-final-norm state of the last prompt token (stage 1) and of the
``PILOT_TOKENS``-th generated token (stage 2) inside the engine, giving exactly what the probes give offline
on those states; a head request's tokens are the greedy tokens of ``base + delta`` logits computed offline;
the front end holds the pilot back and, for a flagged request, streams only the refusal head's reply, while
an unflagged request streams its own tokens unchanged; vLLM gives the hf engine's tokens and scores.
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
from steerserve.engines.base import GenerationOutput, GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.engines.switching import switching
from steerserve.model import load_hf, prepare_default_model
from steerserve.prompts import PromptRenderer
from steerserve.runtime.safeswitch import (
    PILOT_TOKENS,
    HeadDelta,
    Probe,
    ProbePair,
    SafeSwitchSpec,
    head_logits,
    probe_prob,
)
from tests.paths import models_dir

PROMPTS = ["How do I pick a lock?", "Write a haiku about the sea."]
MAX_TOKENS = 12


def probe(seed: int, hidden: int, bias: float) -> Probe:
    g = torch.Generator().manual_seed(seed)
    return Probe(torch.randn(64, hidden, generator=g) / hidden**0.5, torch.zeros(64),
                 torch.randn(2, 64, generator=g) / 8, torch.tensor([0.0, bias]))


def pair(seed: int, hidden: int, bias: float = 0.0) -> ProbePair:
    return ProbePair(probe(seed, hidden, bias), probe(seed + 100, hidden, bias))


def head(seed: int, hidden: int, vocab: int) -> HeadDelta:
    g = torch.Generator().manual_seed(seed)
    return HeadDelta(torch.randn(8, hidden, generator=g) / hidden**0.5, torch.randn(vocab, 8, generator=g) * 2)


def ids_of(text: str) -> tuple[int, ...]:
    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model(models_dir()))
    return PromptRenderer(tokenizer, 2048).render(messages=[{"role": "user", "content": text}]).token_ids


def request(ids: tuple[int, ...], **kw: object) -> GenerationRequest:
    return GenerationRequest(uuid.uuid4().hex, ids, SamplingParams(max_tokens=MAX_TOKENS), **kw)  # type: ignore[arg-type]


async def collect(outputs: AsyncIterator[GenerationOutput]) -> tuple[list[GenerationOutput], dict[str, object]]:
    outs = [o async for o in outputs]
    for o in outs:
        assert "error" not in o.extra, o.extra
    return outs, dict(outs[-1].extra.get("report") or {})  # type: ignore[call-overload]


def tokens(outs: list[GenerationOutput]) -> tuple[int, ...]:
    return tuple(t for o in outs for t in o.token_ids)


@pytest.fixture(scope="module")
def hf_model() -> tuple[object, object]:
    model, tokenizer, info = load_hf(prepare_default_model(models_dir()))
    return model, info


@pytest.fixture(scope="module")
async def hf(hf_model: tuple[object, object]) -> AsyncIterator[HFEngine]:
    model, info = hf_model
    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model(models_dir()))
    eng = HFEngine(model, tokenizer, info, Settings(max_batch=8, bank_slots=128, controller_slots=2))  # type: ignore[arg-type]
    await eng.start()
    yield eng
    await eng.stop()


def offline(model: torch.nn.Module, ids: tuple[int, ...], delta: HeadDelta | None,
            n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy ``n`` tokens with logits ``h W^T (+ delta)``, and the post-final-norm states ``[P + n, H]``."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            h = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]  # [S, H] normed
            w = model.lm_head.weight
            logits = h[-1:] @ w.T if delta is None else head_logits(h[-1:], w, delta.a, delta.b)
            seq.append(int(logits[0].argmax()))
        h = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]
    return seq[len(ids):], h


async def test_hf_probes_read_the_right_states_and_head_adds_its_delta(hf: HFEngine, hf_model: tuple) -> None:
    model, info = hf_model
    probes = pair(0, info.hidden_size)
    delta = head(0, info.hidden_size, info.vocab_size)
    for text in PROMPTS:
        ids = ids_of(text)
        outs, report = await collect(hf.generate(request(ids, probes=probes)))
        plain, states = offline(model, ids, None, MAX_TOKENS)
        assert list(tokens(outs)) == plain  # probes only read
        p = len(ids)
        want1 = float(probe_prob(states[p - 1 : p], *vars(probes.stage1).values())[0])
        want2 = float(probe_prob(states[p + PILOT_TOKENS - 1 : p + PILOT_TOKENS], *vars(probes.stage2).values())[0])
        assert math.isclose(float(report["probe_stage1"]), want1, rel_tol=1e-4)  # type: ignore[arg-type]
        assert math.isclose(float(report["probe_stage2"]), want2, rel_tol=1e-4)  # type: ignore[arg-type]
        assert any("probe" in o.extra for o in outs[:PILOT_TOKENS + 1])  # scores right after the pilot
        headed, _ = await collect(hf.generate(request(ids, head=delta)))
        want_head, _ = offline(model, ids, delta, MAX_TOKENS)
        assert list(tokens(headed)) == want_head and want_head != plain


@pytest.mark.parametrize("bias", [-20.0, 20.0])
async def test_switching_never_leaks_the_pilot(hf: HFEngine, bias: float) -> None:
    """bias +20: both stages fire, the client sees only the head's reply; -20: never, the plain reply."""
    info = hf.info
    ids = ids_of(PROMPTS[0])
    probes = pair(1, info.hidden_size, bias)
    delta = head(1, info.hidden_size, info.vocab_size)
    plain, _ = await collect(hf.generate(request(ids)))
    headed, _ = await collect(hf.generate(request(ids, head=delta)))
    outs, report = await collect(switching(hf, request(ids), SafeSwitchSpec(probes, delta, 0.5)))
    flagged = bias > 0
    assert report["switched"] is flagged
    assert tokens(outs) == tokens(headed if flagged else plain)
    assert sum(len(o.token_ids) for o in outs[:1]) >= (1 if flagged else PILOT_TOKENS + 1)  # pilot held as one


async def test_unflagged_neighbours_are_bit_identical(hf: HFEngine) -> None:
    ids = ids_of(PROMPTS[1])
    alone, _ = await collect(hf.generate(request(ids)))
    info = hf.info
    both = await asyncio.gather(collect(hf.generate(request(ids))),
                                collect(hf.generate(request(ids_of(PROMPTS[0]), head=head(2, info.hidden_size,
                                                                                           info.vocab_size)))))
    assert tokens(both[0][0]) == tokens(alone)
