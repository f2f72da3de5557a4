"""CUDA-graph capture of a steered step with registers (needs a GPU; skipped elsewhere).

One step of the default model with the hf engine's hooks, a gain op whose scale the register file
multiplies on the device, and the sampler-side entropy step, captured in a CUDA graph: replaying it gives
the eager step's logits and registers exactly, and a replay after the host rewrites the tables and the
registers follows the new values (the graph reads the fixed buffers, it did not bake them in).
"""

from __future__ import annotations

import pytest
import torch

from steerserve.model import load_hf, prepare_default_model
from steerserve.runtime.bank import VectorBank
from steerserve.runtime.graphs import capture_step
from steerserve.runtime.hooks import SteeringHooks
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.pins import Pin
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.registers import Registers, entropy_step_
from steerserve.runtime.tables import Segment, StepTables
from tests.paths import models_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS, TOKENS = 4, 16  # a step of 4 sequences of 16 tokens, laid out row-major as the tables expect


def test_steered_step_with_registers_replays_as_eager() -> None:
    dev = torch.device("cuda")
    model, _, info = load_hf(prepare_default_model(models_dir()))
    model.to(dev)
    layers = model.model.layers
    bank = VectorBank(8, info.hidden_size, device=dev)
    tables = StepTables(info.num_layers, ROWS * TOKENS, 4, device=dev)
    regs = Registers(4, device=dev)
    hooks = SteeringHooks(layers, bank, tables)
    g = torch.Generator().manual_seed(0)
    v = VectorRef.of(torch.nn.functional.normalize(torch.randn(info.hidden_size, generator=g), dim=0) * 40)
    ops = (SteerOp(OpKind.ADD, 12, v, 1.0, 0, gain=True), SteerOp(OpKind.ADD, 5, v, 0.5, 0))
    pin = Pin.acquire(bank, ops, tables.slots)
    assert pin is not None
    place = pin.placement(bank)
    opened = [regs.open(LoopSpec(0.5, initial=g0)) for g0 in (0.75, -0.5)]
    cells = [c for c in opened if c is not None]
    ids = torch.randint(0, info.vocab_size, (ROWS, TOKENS), generator=g).to(dev)

    def lay_out() -> None:  # rows 0 and 2 are closed-loop requests, row 1 open loop, row 3 unsteered
        segs = [Segment(0, 0, TOKENS, place, cell=cells[0]), Segment(TOKENS, 0, TOKENS, place),
                Segment(2 * TOKENS, 0, TOKENS, place, cell=cells[1])]
        tables.fill(ROWS * TOKENS, segs, None, regs.gain)

    row_cells = torch.tensor([cells[0], regs.sink, cells[1], regs.sink], device=dev)

    def step() -> torch.Tensor:
        logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
        entropy_step_(regs, logits[:, -1], row_cells)
        return logits

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: getattr(regs, k).clone() for k in ("gain", "integral", "entropy", "entropy_sum", "steps")}

    def restore(s: dict[str, torch.Tensor]) -> None:
        for k, t in s.items():
            getattr(regs, k).copy_(t)

    with torch.no_grad():
        start = snapshot()
        lay_out()
        eager = step().clone()
        eager_regs = snapshot()
        graph, out = capture_step(step, reset=lambda: restore(start))
        restore(start)
        lay_out()  # the gain multiply happens in fill, on the device, before the step reads the scales
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        for k, t in eager_regs.items():
            assert torch.equal(getattr(regs, k), t), k
        # the next step: the host lays out again (the gains moved), the graph reads the new scales
        lay_out()
        second_eager_start = snapshot()
        graph.replay()
        replayed = out.clone()
        replayed_regs = snapshot()
        restore(second_eager_start)
        lay_out()
        again = step()
        assert torch.equal(replayed, again) and not torch.equal(replayed, eager)
        for k, t in snapshot().items():
            assert torch.equal(replayed_regs[k], t), k
    hooks.remove()
