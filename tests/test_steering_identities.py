"""Exact tensor identities of the runtime ops on the real default model (fp32).

The hooks under test are the ones the engine uses (``SteeringHooks`` reading ``StepTables`` and a
``VectorBank``); the reference runs use no steerserve code at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from steerserve.model import load_hf, prepare_default_model
from steerserve.runtime.bank import VectorBank
from steerserve.runtime.hooks import Capture, SteeringHooks
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.tables import Placement, Segment, StepTables
from tests.paths import models_dir

PROMPT = "The quick brown fox jumps over the lazy dog because"


class Rig:
    """The model with the engine's hooks attached, and a way to run one steered forward pass."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.layers = model.model.layers
        self.n = len(self.layers)
        self.bank = VectorBank(64, model.config.hidden_size)
        self.tables = StepTables(self.n, 64, 4)
        self.ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])

    @torch.inference_mode()
    def run(self, ops: Sequence[SteerOp] = (), hooks: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits ``[T, V]`` and every layer's output ``{l: [T, H]}``; ``hooks=False``: no steerserve code."""
        handle = SteeringHooks(self.layers, self.bank, self.tables) if hooks else None
        try:
            rows = self.bank.acquire(op.vector for op in ops) or {}
            t = self.ids.shape[1]
            self.tables.fill(t, [Segment(0, 0, t, Placement.build(ops, rows, self.tables.slots))])
            with Capture(self.layers, range(self.n)) as cap:
                logits = self.model(input_ids=self.ids).logits[0]
            self.bank.release(rows)
            return logits, {k: v[0] for k, v in cap.outputs.items()}
        finally:
            if handle is not None:
                handle.remove()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    model, tokenizer, _ = load_hf(prepare_default_model(models_dir()))
    yield Rig(model, tokenizer)


def _vec(seed: int, hidden: int = 576) -> torch.Tensor:
    return torch.randn(hidden, generator=torch.Generator().manual_seed(seed))


def test_coefficient_zero_is_bit_identical(rig: Rig) -> None:
    ref_logits, ref_h = rig.run(hooks=False)
    v = VectorRef.of(_vec(1))
    logits, h = rig.run([SteerOp(OpKind.ADD, layer, v, 0.0) for layer in range(rig.n)])
    assert rig.tables.active  # the steered path really ran
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(h[k], ref_h[k]) for k in range(rig.n))


def test_v_minus_v_is_bit_identical(rig: Rig) -> None:
    ref_logits, _ = rig.run(hooks=False)
    v = _vec(2)
    ops = [SteerOp(OpKind.ADD, layer, VectorRef.of(v), 4.0) for layer in range(rig.n)]
    ops += [SteerOp(OpKind.ADD, layer, VectorRef.of(-v), 4.0) for layer in range(rig.n)]
    logits, _ = rig.run(ops)
    assert torch.equal(logits, ref_logits)


def test_patched_layer_is_orig_plus_cv_and_no_other_layer_is_touched(rig: Rig) -> None:
    layer, c, v = 10, 3.0, _vec(3)
    ref_logits, ref_h = rig.run(hooks=False)
    logits, h = rig.run([SteerOp(OpKind.ADD, layer, VectorRef.of(v), c)])
    for k in range(layer):
        assert torch.equal(h[k], ref_h[k]), f"layer {k} before the patch changed"
    assert torch.equal(h[layer], ref_h[layer] + c * v)
    assert not torch.equal(logits, ref_logits)
    # Every later layer must be exactly what the unmodified blocks compute from the patched stream:
    # the same edit made by a plain hook (no steerserve code) reproduces all layers bit for bit.
    handle = rig.layers[layer].register_forward_hook(lambda m, a, out: out + c * v)
    try:
        manual_logits, manual_h = rig.run(hooks=False)
    finally:
        handle.remove()
    assert torch.equal(logits, manual_logits)
    assert all(torch.equal(h[k], manual_h[k]) for k in range(rig.n))


def test_positions_window_only_touches_its_tokens(rig: Rig) -> None:
    v = _vec(4)
    _, ref_h = rig.run(hooks=False)
    _, h = rig.run([SteerOp(OpKind.ADD, 0, VectorRef.of(v), 2.0, start=3, stop=5)])
    assert torch.equal(h[0][:3], ref_h[0][:3])
    assert torch.equal(h[0][3:5], ref_h[0][3:5] + 2.0 * v)
    # layer 0's output at position 5 is computed from the embeddings, before the edit: untouched
    assert torch.equal(h[0][5], ref_h[0][5])
    assert not torch.equal(h[1][5], ref_h[1][5])  # ...but layer 1 attends to the edited positions 3-4

def test_ablation_zeroes_the_projection_at_ablated_layers(rig: Rig) -> None:
    r = _vec(5)
    r = r / r.norm()
    layers = [4, 5, 6, 20]
    _, ref_h = rig.run(hooks=False)
    _, h = rig.run([SteerOp(OpKind.ABLATE, layer, VectorRef.of(r), 1.0) for layer in layers])
    for layer in layers:
        assert (ref_h[layer] @ r).abs().max() > 0.1  # there was something to remove
        assert (h[layer] @ r).abs().max() < 1e-4, f"layer {layer} still has a component along r"
    assert torch.equal(h[3], ref_h[3])
