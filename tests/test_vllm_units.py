"""Units of the vLLM engine that need only torch: the wire format and the in-place op on a split stream.

These run everywhere (vLLM itself is not imported); ``test_vllm_engine.py`` runs the real engine.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from steerserve.engines.vllm import ops as vops
from steerserve.engines.vllm.gate import BankGate
from steerserve.engines.vllm.wire import Wired, cache_salt, decode_ops, encode_ops, from_extra_args
from steerserve.runtime.bank import VectorBank
from steerserve.runtime.capture import CaptureBuffer
from steerserve.runtime.control_op import ControllerUnit
from steerserve.runtime.head_point import HeadPoint
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.ops import steer
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.registers import Registers
from steerserve.runtime.tables import Placement, Segment, StepTables

H = 16


def _ops() -> tuple[SteerOp, ...]:
    g = torch.Generator().manual_seed(1)
    v, r = torch.randn(H, generator=g), torch.randn(H, generator=g)
    return (SteerOp(OpKind.ADD, 0, VectorRef.of(v), 2.0),
            SteerOp(OpKind.ABLATE, 1, VectorRef.of(r / r.norm()), 1.0, start=2),
            SteerOp(OpKind.ADD, 1, VectorRef.of(torch.randn(3, H, generator=g)), -1.5, 1, 4, positional=True),
            SteerOp(OpKind.ADD, 1, VectorRef.of(v), 0.5, stop=5))


def _state(bank: VectorBank, tables: StepTables, static: bool = False) -> vops.SteerState:
    layers = tables.rows[OpKind.ADD].shape[0]
    capture = CaptureBuffer(layers, 8, H, tables.max_tokens)
    regs = Registers(4, layers)
    ctrl = ControllerUnit(2, regs.sink + 1, layers, H, 4)
    head = HeadPoint(2, H, 16, 4, regs.sink)
    return vops.SteerState(bank, tables, regs, capture, ctrl, head, static=static)


def test_wire_round_trip_keeps_ops_and_keys() -> None:
    ops = (*_ops(), SteerOp(OpKind.ADD, 3, _ops()[0].vector, 0.25, 4, gain=True))
    loop = LoopSpec(0.6, initial=0.1, low=-0.5, high=0.75, kp=0.3, ki=0.2)
    payload = encode_ops(ops, loop)
    assert len(payload["vectors"]) == 3  # the shared vector travels once
    back = decode_ops(payload)
    def fields(o: SteerOp) -> tuple[object, ...]:
        return o.kind, o.layer, o.vector.key, o.scale, o.start, o.stop, o.positional, o.gain

    assert [fields(o) for o in back.ops] == [fields(o) for o in ops]
    assert back.loop == loop and not back.capture
    choice = LoopSpec(0.6, options=(17, 4), gate=0.25)
    assert decode_ops(encode_ops(ops, choice)).loop == choice
    assert all(torch.equal(a.vector.data, b.vector.data) for a, b in zip(ops, back.ops, strict=True))
    assert from_extra_args(None) == Wired() and from_extra_args({"other": 1}) == Wired()
    assert decode_ops(encode_ops((), capture=True)) == Wired(capture=True)


def test_cache_salt_separates_specs() -> None:
    ops = _ops()
    assert cache_salt(()) is None
    assert cache_salt(ops) == cache_salt(decode_ops(encode_ops(ops)).ops)
    assert cache_salt(ops) != cache_salt(ops[:2]) != cache_salt(ops[:1])
    assert cache_salt(ops, LoopSpec(0.5)) not in (cache_salt(ops), cache_salt(ops, LoopSpec(0.6)),
                                                  cache_salt(ops, LoopSpec(0.5, options=(1, 2))))


def test_op_on_split_stream_equals_runtime_op_on_sum() -> None:
    """vLLM's layer output is (hidden, residual); the op steers their sum, writing into hidden."""
    ops = _ops()
    bank, tables = VectorBank(8, H), StepTables(2, 16, 4)
    rows = bank.acquire(op.vector for op in ops)
    assert rows is not None
    g = torch.Generator().manual_seed(2)
    hidden, residual = torch.randn(7, H, generator=g), torch.randn(7, H, generator=g)  # 6 real + 1 padding
    # one request at flat tokens 1..5 (positions 0..4) and an unsteered token at flat index 0
    tables.fill(6, [Segment(1, 0, 5, Placement.build(ops, rows, tables.slots))])
    vops.install(_state(bank, tables))
    try:
        for layer in range(2):
            x = hidden[:6] + residual[:6]
            want = steer(x, bank.weight, *tables.layer(layer))
            h = hidden.clone()
            torch.ops.steerserve.steer_(h, residual, layer)
            torch.testing.assert_close(h[:6] + residual[:6], want, rtol=1e-6, atol=1e-6)
            assert torch.equal(h[0], hidden[0]) and torch.equal(h[6], hidden[6])  # unsteered, padding: untouched
            hidden = h
        tables.fill(0, [])
        h = hidden.clone()
        torch.ops.steerserve.steer_(h, residual, 1)
        assert torch.equal(h, hidden)  # inactive tables: no-op
    finally:
        vops.install(None)


async def test_bank_gate_waits_in_order_and_never_overfills() -> None:
    """Requests whose vectors do not fit wait (first come, first served); shared vectors count once."""
    gate = BankGate(capacity=5)
    await gate.enter("a", {"v1": 2, "v2": 2})
    await gate.enter("b", {"v1": 2})  # shares v1: needs nothing new
    assert gate.used == 4
    big = asyncio.create_task(gate.enter("c", {"v3": 3}))
    await asyncio.sleep(0.01)
    assert not big.done()  # 4 + 3 > 5: waits
    small = asyncio.create_task(gate.enter("d", {"v4": 1}))
    await asyncio.sleep(0.01)
    assert not small.done()  # would fit, but "c" came first: no starvation of large requests
    await gate.leave("a")  # v1 still held by "b": only v2's rows come back
    await asyncio.sleep(0.01)
    assert big.done() and gate.used == 5 and not small.done()
    await gate.leave("b")
    await asyncio.sleep(0.01)
    assert small.done() and gate.used == 4
    with pytest.raises(ValueError, match="bank holds 5"):
        await gate.enter("e", {"v5": 6})
    cancelled = asyncio.create_task(gate.enter("f", {"v6": 2}))
    await asyncio.sleep(0.01)
    cancelled.cancel()  # a client that leaves while waiting takes nothing with it
    await asyncio.gather(cancelled, return_exceptions=True)
    await gate.leave("c")
    await gate.leave("d")
    assert gate.used == 0


def test_graph_safe_form_matches_the_eager_form() -> None:
    """``SteerState.static`` (what a CUDA-graph capture records): full fixed-shape tables, no branch on
    ``tables.active``; the same result as the eager form, bit for bit where nothing is ablated."""
    ops = _ops()
    adds = tuple(op for op in ops if op.kind == OpKind.ADD)
    g = torch.Generator().manual_seed(3)
    clamp = torch.randn(3, H, generator=g)
    clamp[2] = 0.0
    clamps = (*adds, SteerOp(OpKind.CLAMP, 1, VectorRef.of(clamp), 4.0, start=1),
              SteerOp(OpKind.CLAMP, 0, VectorRef.of(-clamp), -2.0, stop=3))  # a feature read at each layer
    bank, tables = VectorBank(16, H), StepTables(2, 16, 4)
    hidden, residual = torch.randn(7, H, generator=g), torch.randn(7, H, generator=g)
    for spec, exact in ((adds, True), (ops, False), (clamps, False)):
        rows = bank.acquire(op.vector for op in spec)
        assert rows is not None
        tables.fill(6, [Segment(1, 0, 5, Placement.build(spec, rows, tables.slots))])
        out = {}
        for static in (False, True):
            vops.install(_state(bank, tables, static))
            try:
                h = hidden.clone()
                for layer in range(2):
                    torch.ops.steerserve.steer_(h, residual, layer)
                out[static] = h
            finally:
                vops.install(None)
        assert torch.equal(out[True][0], hidden[0])  # unsteered token: untouched in both forms
        if exact:
            assert torch.equal(out[True], out[False])
        else:
            torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
        assert not torch.equal(out[True], hidden)
