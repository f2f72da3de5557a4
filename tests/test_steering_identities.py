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


def _clamp_rows(seed: int, offset: float, threshold: float, hidden: int = 576) -> torch.Tensor:
    """A clamp op's vector ``[3, H]``: a unit encoder direction, a decoder row, ``[offset, threshold]``."""
    enc, dec = _vec(seed), _vec(seed + 1)
    prm = torch.zeros(hidden)
    prm[0], prm[1] = offset, threshold
    return torch.stack([enc / enc.norm(), dec / dec.norm(), prm])


def test_clamp_sets_the_feature_on_its_tokens_only(rig: Rig) -> None:
    """A clamp op at layer 8 over positions 2..5: those tokens' stream becomes ``x + (target - a) * dec`` with
    ``a`` the feature's JumpReLU activation read from ``x`` (``pre > threshold``), the tokens outside the
    window and every layer below are untouched bit for bit, and a second feature in the same step reads the
    stream as the layer produced it (its own patch is the same alone and beside the first)."""
    layer, target = 8, 3.0
    _, ref_h = rig.run(hooks=False)
    x = ref_h[layer]  # [T, H]
    first = _clamp_rows(10, 0.0, 0.0)
    pre = x @ first[0]  # [T]
    threshold = float(pre[2:6].median())  # some tokens fire, some do not
    rows = _clamp_rows(10, 0.25, threshold)
    pre = x @ rows[0] + 0.25
    act = torch.where(pre > threshold, pre, torch.zeros(()))
    assert bool((act[2:6] == 0).any()) and bool((act[2:6] > 0).any())
    ops = [SteerOp(OpKind.CLAMP, layer, VectorRef.of(rows), target, start=2, stop=6)]
    _, h = rig.run(ops)
    for k in range(layer):
        assert torch.equal(h[k], ref_h[k])
    assert torch.equal(h[layer][:2], x[:2]) and torch.equal(h[layer][6:], x[6:])
    want = x[2:6] + (target - act[2:6])[:, None] * rows[1]
    assert torch.allclose(h[layer][2:6], want, atol=1e-5, rtol=0)
    other = _clamp_rows(20, 0.0, 0.0)
    _, both = rig.run([*ops, SteerOp(OpKind.CLAMP, layer, VectorRef.of(other), -1.0, start=2, stop=6)])
    a2 = (x[2:6] @ other[0]).clamp_min(0)
    assert torch.allclose(both[layer][2:6], want + (-1.0 - a2)[:, None] * other[1], atol=1e-5, rtol=0)


def test_clamp_to_the_current_activation_is_bit_identical(rig: Rig) -> None:
    """An encoder that reads a constant (direction 0, offset 2) and a target of 2: ``target - a == 0``, so the
    stream and the logits are bit-identical to the unsteered run."""
    ref_logits, ref_h = rig.run(hooks=False)
    rows = torch.stack([torch.zeros(576), _vec(5), torch.zeros(576)])
    rows[2, 0] = 2.0
    logits, h = rig.run([SteerOp(OpKind.CLAMP, layer, VectorRef.of(rows), 2.0) for layer in (3, 17)])
    assert rig.tables.active
    assert torch.equal(logits, ref_logits) and all(torch.equal(h[k], ref_h[k]) for k in range(rig.n))
