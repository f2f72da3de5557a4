"""The runtime's second stage: register slots, the gain on the steer op, the sampler-side entropy step, the
read op / capture buffer; and a closed loop on the real default model in the hf engine.

(vLLM: ``test_vllm_engine.py`` holds the same loop to the hf engine's tokens and reports, and reads hidden
states through capture requests.)
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence

import pytest
import torch

from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.prompts import PromptRenderer
from steerserve.runtime.capture import CaptureBuffer, Captures, Read
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.registers import Registers, entropy_bits, entropy_step_, option_entropy
from steerserve.runtime.tables import Placement, Segment, StepTables

H = 8


def test_entropy_step_is_the_documented_bounded_pi_rule() -> None:
    regs = Registers(3)
    loop = LoopSpec(target=1.0, initial=0.25, low=-1.0, high=1.0, kp=0.5, ki=0.25)
    a, b = regs.open(loop), regs.open(LoopSpec(target=3.0))
    assert (a, b) == (1, 2) and regs.in_use == 2
    uniform4 = torch.zeros(1, 4)  # 2 bits exactly
    logits = torch.cat([uniform4, torch.tensor([[0.0, 0.0, -1e9, -1e9]]), uniform4])  # 2, 1, 2 bits
    cells = torch.tensor([a, b, regs.sink])
    assert torch.allclose(entropy_bits(logits), torch.tensor([2.0, 1.0, 2.0]))
    entropy_step_(regs, logits, cells)
    # a: e = 1 - 2 = -1, I = -1, gain = 0.25 + 0.5 * -1 + 0.25 * -1 = -0.5
    assert float(regs.gain[a]) == pytest.approx(-0.5) and float(regs.integral[a]) == pytest.approx(-1.0)
    # b: e = 3 - 1 = 2, I = 2, gain = clamp(0 + 1 + 0.5) = 1
    assert float(regs.gain[b]) == 1.0
    assert float(regs.gain[0]) == 1.0  # the neutral cell never moves
    for _ in range(50):  # a target it can never reach: the gain saturates, the integral stops at its bound
        entropy_step_(regs, logits, cells)
    assert float(regs.gain[a]) == -1.0 and float(regs.integral[a]) == pytest.approx((-1.0 - 0.25) / 0.25)
    report = regs.report(a)
    assert report["loop_steps"] == 51 and report["mean_entropy_bits"] == pytest.approx(2.0)
    regs.close(a)
    assert regs.in_use == 1 and float(regs.gain[a]) == 1.0 and math.isnan(float(regs.target[a]))
    assert regs.open(LoopSpec(0.5)) == a and float(regs.integral[a]) == 0.0  # reused clean
    assert regs.open(LoopSpec(0.5)) == 3 and regs.open(LoopSpec(0.5)) is None  # 3 slots, then full


def test_entropy_is_exact_to_fp32_rounding_on_vocabulary_sized_rows() -> None:
    """The one-softmax entropy against float64: peaked and flat rows, large offsets, masked (-inf) tokens."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 49152, generator=g) * 3  # [B, V], the default model's vocabulary
    z[::3] *= 6  # peaked: entropy ~1e-3 bits
    z[1::4] += 25  # large logits: nothing may cancel
    z[2, :1000] = -math.inf  # a grammar's mask
    want = torch.special.entr(torch.softmax(z.double(), dim=-1)).sum(dim=-1) / math.log(2.0)  # [B]
    got = entropy_bits(z)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), want, rtol=2e-4, atol=1e-5), (got, want)
    ids = z.topk(3, dim=-1).indices  # [B, 3] options that hold real mass; it comes out of the same softmax
    h, mass = option_entropy(z, ids, torch.ones(16, 3, dtype=torch.bool))
    p = torch.softmax(z.double(), dim=-1).gather(1, ids)  # [B, 3]
    assert torch.allclose(mass.double(), p.sum(dim=-1), rtol=1e-5, atol=1e-12)
    q = p / p.sum(dim=-1, keepdim=True)
    assert torch.allclose(h.double(), torch.special.entr(q).sum(dim=-1) / math.log(2.0), rtol=1e-4, atol=1e-5)


def test_choice_loop_moves_only_at_decisions_and_reports_their_entropy() -> None:
    regs = Registers(2)
    cell = regs.open(LoopSpec(target=0.5, initial=0.0, kp=1.0, ki=0.0, options=(0, 1), gate=0.5))
    full = regs.open(LoopSpec(target=0.5, kp=1.0, ki=0.0))
    assert cell is not None and full is not None
    decision = torch.tensor([[0.0, 0.0, -9.0, -9.0]])  # options hold ~1: choice entropy 1 bit
    words = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # options hold ~1e-4: not a decision
    lopsided = torch.tensor([[math.log(3.0), 0.0, -30.0, -30.0]])  # p(A) = 3/4 among the options
    h, mass = option_entropy(torch.cat([decision, words]), torch.tensor([[0, 1], [0, 1]]),
                             torch.ones(2, 2, dtype=torch.bool))
    assert h[0] == pytest.approx(1.0, abs=1e-6) and mass[0] > 0.999 and mass[1] < 1e-3
    entropy_step_(regs, torch.cat([words, words]), torch.tensor([cell, full]))
    assert float(regs.gain[cell]) == 0.0 and float(regs.steps[cell]) == 0.0  # no decision: nothing moves
    assert float(regs.steps[full]) == 1.0  # the full-vocabulary loop: every step, the whole distribution
    assert float(regs.gain[full]) == pytest.approx(0.5 - float(entropy_bits(words)[0]))
    entropy_step_(regs, decision, torch.tensor([cell]))
    assert float(regs.gain[cell]) == pytest.approx(0.5 - 1.0)  # e = 0.5 - 1
    entropy_step_(regs, lopsided, torch.tensor([cell]))
    h34 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert float(regs.gain[cell]) == pytest.approx(0.5 - h34, abs=1e-5)
    report = regs.report(cell)
    assert report["loop_steps"] == 2 and report["mean_entropy_bits"] == pytest.approx((1.0 + h34) / 2, abs=1e-5)
    regs.close(cell)
    again = regs.open(LoopSpec(target=0.5))  # a full-vocabulary loop reusing the cell counts every step
    assert again == cell
    entropy_step_(regs, words, torch.tensor([cell]))
    assert float(regs.steps[cell]) == 1.0


def test_gain_multiplies_only_gain_ops_and_open_loop_scales_stay_exact() -> None:
    g = torch.Generator().manual_seed(0)
    bank = torch.cat([torch.zeros(1, H), torch.randn(3, H, generator=g)])
    v, w = VectorRef.of(bank[1]), VectorRef.of(bank[2])
    ops = (SteerOp(OpKind.ADD, 0, v, 0.7), SteerOp(OpKind.ADD, 0, w, 1.3, gain=True),
           SteerOp(OpKind.ADD, 1, w, -2.0, gain=True))
    place = Placement.build(ops, {v.key: 1, w.key: 2}, 4)
    gain = torch.tensor([1.0, 1.0, -0.375, 1.0, 1.0])  # cell 2 belongs to the request
    plain, looped = StepTables(2, 8, 4), StepTables(2, 8, 4)
    plain.fill(5, [Segment(1, 10, 3, Placement.build(ops, {v.key: 1, w.key: 2}, 4))], bank, gain)
    looped.fill(5, [Segment(1, 10, 3, place, cell=2), Segment(4, 3, 1, place)], bank, gain)
    s0 = looped.scales[OpKind.ADD]
    assert torch.equal(s0[0, 1:4, 0], torch.full((3,), 0.7))  # open-loop op: bit for bit
    f32 = torch.tensor  # the product as the device computes it: float32 times float32
    assert torch.equal(s0[0, 1:4, 1], (f32(1.3) * f32(-0.375)).expand(3))
    assert torch.equal(s0[1, 1:4, 0], (f32(-2.0) * f32(-0.375)).expand(3))
    assert torch.equal(s0[0, 4, :2], torch.tensor([0.7, 1.3]))  # a segment with no cell reads gain 1
    # no cell: the same layout gives the host's scales untouched
    assert torch.equal(plain.scales[OpKind.ADD][:, 1:4, :2], torch.tensor([[0.7, 1.3], [-2.0, 0.0]])[:, None]
                       .expand(2, 3, 2))
    looped.fill(2, [], bank, gain)  # the next step has no gain op: the cells are cleared with the rest
    assert int(looped.cells[OpKind.ADD][:, :5].abs().sum()) == 0 and not looped.active


def test_capture_buffer_reads_rows_in_place_and_assembles_chunks() -> None:
    buf = CaptureBuffer(num_layers=2, rows=6, hidden=H, max_tokens=16)
    stream = torch.arange(10 * H, dtype=torch.float32).view(10, H)
    dropped = buf.fill(10, [Read("a", 0, 0, 4), Read("b", 5, 7, 3)])
    assert dropped == [Read("b", 5, 7, 3)] and buf.active  # 4 + 3 rows exceed the 6 of the buffer
    for layer in range(2):
        buf.read_layer(layer, stream * (layer + 1))
    caps = Captures()
    caps.add(buf.collect())
    assert not buf.active
    buf.fill(3, [Read("a", 1, 4, 2)])  # the request's second chunk, next step
    for layer in range(2):
        buf.read_layer(layer, stream[:3] * (layer + 1))
    caps.add(buf.collect())
    got = caps.take("a", [1, 0])
    assert got is not None and got.shape == (6, 2, H)
    assert torch.equal(got[:4, 1], stream[:4]) and torch.equal(got[:4, 0], 2 * stream[:4])
    assert torch.equal(got[4:, 1], stream[1:3])
    assert caps.take("a", [0]) is None  # taken once
    assert int(buf.index[:10].ne(6).sum()) == 2  # only this step's rows point into the buffer


def _prompt(engine: HFEngine, text: str) -> tuple[int, ...]:
    return PromptRenderer(engine.tokenizer, 2048).render(messages=[{"role": "user", "content": text}]).token_ids


async def _run(engine: HFEngine, ids: Sequence[int], ops: tuple[SteerOp, ...], loop: LoopSpec | None = None,
               n: int = 24) -> tuple[list[int], dict[str, float] | None]:
    req = GenerationRequest(uuid.uuid4().hex, tuple(ids), SamplingParams(max_tokens=n), ops, loop)
    outs = [o async for o in engine.generate(req)]
    report = outs[-1].extra.get("report")
    return [t for o in outs for t in o.token_ids], report  # type: ignore[return-value]


@pytest.mark.slow
async def test_closed_loop_on_the_real_model(hf_engine: HFEngine) -> None:
    ids = _prompt(hf_engine, "Write a short story about a cat.")
    v = torch.nn.functional.normalize(torch.randn(576, generator=torch.Generator().manual_seed(3)), dim=0) * 40
    op = SteerOp(OpKind.ADD, 15, VectorRef.of(v), 1.0, len(ids) - 1, gain=True)
    plain, _ = await _run(hf_engine, ids, ())
    # gain pinned at 0: the op adds exactly 0, so the tokens are the unsteered ones, and the loop still measures
    frozen, report = await _run(hf_engine, ids, (op,), LoopSpec(1.0, kp=0.0, ki=0.0, low=0.0, high=0.0))
    assert frozen == plain and report is not None and report["loop_steps"] == 24
    unsteered_entropy = report["mean_entropy_bits"]
    assert 0 < unsteered_entropy < 8
    low, rep_low = await _run(hf_engine, ids, (op,), LoopSpec(0.0))
    high, rep_high = await _run(hf_engine, ids, (op,), LoopSpec(12.0))
    assert rep_low is not None and rep_high is not None
    assert rep_low["final_gain"] == -1.0 and rep_high["final_gain"] == 1.0  # pushed both ways, bounded
    assert low != plain and high != plain
    stats = await hf_engine.stats()
    assert stats["loop_slots"] == 0 and stats["steered"] == 0  # every slot freed at finish



@pytest.mark.slow
async def test_choice_loop_on_a_game_measures_what_the_scorer_measures(hf_engine: HFEngine) -> None:
    """A multi-decision game (``east.game_text``): the loop with options " A"/" B" counts the arm letters as
    decisions and, with its gain pinned at 0, reports exactly the scorer's teacher-forced decision entropy
    (``steerserve eval --metric decision_entropy``); free, the gain goes down for a target below what the
    model does and up for one above."""
    from steerserve.evaluation.metrics import DECISION_GATE
    from steerserve.evaluation.scoring import ScoreItem, Scorer
    from steerserve.spec import PromptInfo
    from steerserve.tools.extract.east import game_text, situations

    game = next(s for s in situations(1, 6, seed=5) if s.step == 5)
    prompt: PromptInfo = PromptRenderer(hf_engine.tokenizer, 4096).render(game_text(game))
    ids = prompt.token_ids
    options = tuple(hf_engine.tokenizer(o, add_special_tokens=False)["input_ids"][0] for o in (" A", " B"))
    v = torch.nn.functional.normalize(torch.randn(576, generator=torch.Generator().manual_seed(4)), dim=0) * 100
    op = SteerOp(OpKind.ADD, 18, VectorRef.of(v), 0.5, len(ids) - 1, gain=True)
    pinned = LoopSpec(0.5, kp=0.0, ki=0.0, low=0.0, high=0.0, options=options)
    tokens, report = await _run(hf_engine, ids, (op,), pinned, n=64)
    assert report is not None and tokens == (await _run(hf_engine, ids, (), n=64))[0]
    scorer = Scorer(hf_engine, None, option_ids=options)  # type: ignore[arg-type]  # no spec to resolve
    (scored,) = await scorer.score([ScoreItem(prompt, tuple(tokens), (), len(tokens))], kl=False)
    hs = [h for h, mass in scored.decisions if mass >= DECISION_GATE]
    assert len(hs) >= 3 and report["loop_steps"] == len(hs)
    assert report["mean_entropy_bits"] == pytest.approx(sum(hs) / len(hs), abs=1e-4)
    _, low = await _run(hf_engine, ids, (op,), LoopSpec(0.05, kp=1.0, ki=1.0, options=options), n=64)
    _, high = await _run(hf_engine, ids, (op,), LoopSpec(0.99, kp=1.0, ki=1.0, options=options), n=64)
    assert low is not None and high is not None and low["final_gain"] < 0 < high["final_gain"]
