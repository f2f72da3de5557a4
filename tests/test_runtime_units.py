"""Runtime pieces on their own: the op, the bank, the tables, the detokenizer."""

from __future__ import annotations

import torch

from steerserve.engines.sampling import Detokenizer
from steerserve.runtime.bank import VectorBank
from steerserve.runtime.ops import add_delta, steer, steer_, steer_guarded_, vetted_delta
from steerserve.runtime.pins import Pin
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.tables import Placement, Segment, StepTables, slot_numbers


def _ref(seed: int, rows: int = 1, hidden: int = 8) -> VectorRef:
    return VectorRef.of(torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed)))


def test_steer_neutral_rows_are_bit_identical() -> None:
    h = torch.randn(5, 8)
    bank = torch.randn(4, 8)
    bank[0] = 0
    zeros = torch.zeros(5, 2, dtype=torch.long)
    out = steer(h, bank, zeros, torch.zeros(5, 2), zeros, torch.zeros(5, 2))
    assert torch.equal(out, h)


def test_steer_add_and_ablate_math() -> None:
    h = torch.randn(3, 8)
    r = torch.randn(8)
    r = r / r.norm()
    v = torch.randn(8)
    bank = torch.stack([torch.zeros(8), v, r])
    add_rows = torch.tensor([[1], [0], [1]])
    add_scales = torch.tensor([[2.0], [0.0], [-1.0]])
    abl_rows = torch.tensor([[0], [2], [2]])
    abl_scales = torch.tensor([[0.0], [1.0], [1.0]])
    out = steer(h, bank, add_rows, add_scales, abl_rows, abl_scales)
    assert torch.equal(out[0], h[0] + 2.0 * v)
    assert abs(float(out[1] @ r)) < 1e-5
    expected = h[2] - (h[2] @ r) * r - v
    assert torch.allclose(out[2], expected, atol=1e-6)


def test_guarded_steer_refuses_only_overflowing_tokens() -> None:
    """Tokens whose steered stream overflows keep their value and are flagged; every other token equals
    ``steer`` bit for bit (unsteered ones equal ``h``), with the stream split (vLLM) or whole (hf)."""
    h, residual = torch.randn(5, 8), torch.randn(5, 8)
    r = torch.randn(8)
    bank = torch.stack([torch.zeros(8), torch.randn(8), torch.full((8,), 3e38), torch.full((8,), float("nan")),
                        r / r.norm()])
    add_rows = torch.tensor([[1], [2], [0], [0], [1]])
    add_scales = torch.tensor([[2.0], [10.0], [0.0], [0.0], [-1.0]])
    for abl_row in (0, 4):  # additions only, then with an ablation on some tokens
        abl_rows = torch.tensor([[0], [0], [3], [0], [abl_row]])
        abl_scales = torch.tensor([[0.0], [0.0], [1.0], [0.0], [1.0 if abl_row else 0.0]])
        if not abl_row:
            abl_rows, abl_scales = abl_rows[:, :0], abl_scales[:, :0]
        for split in (None, residual):
            out, bad = h.clone(), torch.zeros(5, dtype=torch.bool)
            steer_guarded_(out, bank, add_rows, add_scales, abl_rows, abl_scales, bad, residual=split)
            # additions alone go to h (h + delta, exactly); ablations are of the whole stream h + residual
            stream = h if split is None or not abl_rows.shape[1] else h + split
            want = steer(stream, bank, add_rows, add_scales, abl_rows, abl_scales)
            refused = [1, 2] if abl_rows.shape[1] else [1]
            assert bad.tolist() == [i in refused for i in range(5)]
            assert torch.equal(out[refused], h[refused])  # kept as they were
            kept = [i for i in range(5) if i not in refused]
            if split is None or not abl_rows.shape[1]:
                assert torch.equal(out[kept], want[kept])
            else:
                assert torch.allclose(out[kept] + split[kept], want[kept], atol=1e-5)
            assert torch.equal(out[3], h[3])  # unsteered: bit-identical
            assert bool(torch.isfinite(out).all())


def test_vetted_delta_zeroes_and_flags_only_bad_tokens() -> None:
    bank = torch.stack([torch.zeros(8), torch.randn(8), torch.full((8,), 3e38), torch.full((8,), float("nan"))])
    rows = torch.tensor([[[1], [2], [0], [1]], [[0], [0], [3], [1]]])  # [L=2, T=4, K=1]
    scales = torch.tensor([[[2.0], [10.0], [0.0], [1.0]], [[0.0], [0.0], [1.0], [-1.0]]])
    bad = torch.zeros(4, dtype=torch.bool)
    got = vetted_delta(bank, rows, scales, bad)
    assert bad.tolist() == [False, True, True, False]  # overflow on layer 0, NaN on layer 1
    assert torch.equal(got[:, [0, 3]], add_delta(bank, rows, scales)[:, [0, 3]])
    assert torch.equal(got[:, [1, 2]], torch.zeros(2, 2, 8))


def test_tables_report_flagged_segments() -> None:
    t = StepTables(2, 16, 2)
    p = Placement.build([SteerOp(OpKind.ADD, 0, _ref(1), 1.0)], {_ref(1).key: 1}, 2)
    segments = [Segment(0, 0, 3, p), Segment(3, 5, 4, p), Segment(7, 9, 2, p)]
    t.fill(9, segments)
    assert t.flagged(segments) == []
    t.bad[4] = True
    assert t.flagged(segments) == [1]
    t.fill(9, segments)  # the next step starts clean
    assert t.flagged(segments) == []


def test_bank_shares_content_evicts_lru_and_is_all_or_nothing() -> None:
    bank = VectorBank(slots=5, hidden=8)  # 4 usable rows
    a, b, c = _ref(1), _ref(2, rows=2), _ref(3)
    rows = bank.acquire([a, b])
    assert rows is not None and rows[a.key] != rows[b.key]
    assert torch.equal(bank.weight[rows[b.key] : rows[b.key] + 2], b.data)
    assert torch.equal(bank.weight[0], torch.zeros(8))
    again = bank.acquire([a])  # same content: same row, no new load
    assert again == {a.key: rows[a.key]} and bank.used_rows() == 3
    big = _ref(4, rows=3)
    assert bank.acquire([big]) is None  # in use: cannot evict -> the request waits
    assert bank.used_rows() == 3
    bank.release([a.key])
    bank.release([a.key, b.key])
    assert bank.acquire([c]) is not None  # fits in the free row, nothing evicted
    assert a.key in bank and b.key in bank
    bank.release([c.key])
    got = bank.acquire([big])  # now evicts least recently used until 3 contiguous rows are free
    assert got is not None and torch.equal(bank.weight[got[big.key] : got[big.key] + 3], big.data)


def test_tables_positional_and_windows() -> None:
    tables = StepTables(num_layers=3, max_tokens=8, slots=2)
    pos = _ref(1, rows=3)
    const = _ref(2)
    ops = [
        SteerOp(OpKind.ADD, 1, pos, 2.0, start=2, stop=5, positional=True),
        SteerOp(OpKind.ADD, 1, const, 0.5, start=4),
        SteerOp(OpKind.ABLATE, 2, const, 1.0),
    ]
    rows = {pos.key: 10, const.key: 20}
    placement = Placement.build(ops, rows, tables.slots)
    tables.fill(6, [Segment(offset=1, first=0, count=5, placement=placement)])  # flat token 0 is padding
    add_rows, add_scales, abl_rows, abl_scales = tables.layer(1)
    assert add_rows[:, 0].tolist() == [0, 0, 0, 10, 11, 12]
    assert add_scales[:, 0].tolist() == [0, 0, 0, 2.0, 2.0, 2.0]
    assert add_rows[:, 1].tolist() == [0, 0, 0, 0, 0, 20]
    assert tables.layer(2)[2][:, 0].tolist() == [0, 20, 20, 20, 20, 20]
    assert tables.layer(0)[1].abs().sum() == 0
    # the next step is laid out from scratch: nothing from the last one leaks
    tables.fill(2, [Segment(offset=0, first=7, count=1, placement=placement)])
    # (a request's slots are fixed: the positional op is out of its window, its slot 0 reads row 0)
    assert tables.layer(1)[0].tolist() == [[0, 20], [0, 0]]
    assert tables.layer(2)[2].tolist() == [[20], [0]]
    # fixed-shape readers (graph capture) see the rows the last step used as neutral, not stale
    full = tables.layer(1, sliced=False)
    assert full[0][2:].abs().sum() == 0 and full[1][2:].abs().sum() == 0


def test_detokenizer_cuts_stop_strings_without_leaking() -> None:
    vocab = {1: "Hello", 2: " wor", 3: "ld", 4: " END", 5: " more"}

    def decode(ids: list[int]) -> str:
        return "".join(vocab[i] for i in ids)

    d = Detokenizer(decode, stop=["world"])
    pieces = [d.push(i) for i in (1, 2, 3)]
    assert "".join(pieces) == "Hello " and d.stopped
    d = Detokenizer(decode, stop=[" END"])
    pieces = [d.push(i) for i in (1, 2, 3, 5)]
    assert "".join(pieces) + d.flush() == "Hello world more"


def test_bank_compacts_when_fragmented_and_pins_follow() -> None:
    """Free rows in total but no run long enough: the bank moves vectors down instead of refusing."""
    bank = VectorBank(slots=7, hidden=8)  # 6 usable rows
    refs = [_ref(i) for i in range(6)]
    pins = [Pin.acquire(bank, [SteerOp(OpKind.ADD, 0, r, 1.0)], 1) for r in refs]  # rows 1..6
    for pin in pins[1::2]:  # free rows 2, 4, 6: three free rows, no two adjacent
        assert pin is not None
        pin.release(bank)
    before = bank.generation
    big = _ref(7, rows=3)
    got = bank.acquire([big])  # 3 contiguous rows: only compaction can make them
    assert got is not None and bank.generation == before + 1
    assert torch.equal(bank.weight[got[big.key] : got[big.key] + 3], big.data)
    for pin, ref in zip(pins[::2], refs[::2], strict=True):  # pinned vectors moved; placements follow
        assert pin is not None
        row = int(pin.placement(bank).ints[0, 3])
        assert torch.equal(bank.weight[row], ref.data[0])
    assert bank.acquire([_ref(8)]) is None  # 3 + 3 pinned: full, waits, nothing moved
    assert bank.pinned_rows() == 6 and bank.generation == before + 1


def test_fill_matches_a_per_op_reference() -> None:
    """The vectorised scatter against the obvious loop, on random ops, segments and positions."""
    g = torch.Generator().manual_seed(0)
    tables = StepTables(num_layers=4, max_tokens=64, slots=3)
    refs = [_ref(i, rows=1 + i % 3) for i in range(6)]
    segments, offset, expect = [], 0, {}
    for req in range(5):
        ops = []
        for _ in range(4):
            ref = refs[int(torch.randint(0, 6, (1,), generator=g))]
            start = int(torch.randint(0, 12, (1,), generator=g))
            positional = ref.rows > 1
            stop = start + ref.rows if positional else (None if req % 2 else start + 5)
            kind = OpKind.ABLATE if req == 3 else OpKind.ADD
            ops.append(SteerOp(kind, int(torch.randint(0, 4, (1,), generator=g)), ref, 0.5 + req, start, stop,
                               positional))
        rows = {r.key: 1 + 10 * i for i, r in enumerate(refs)}
        count, first = 1 + 3 * req, int(torch.randint(0, 8, (1,), generator=g))
        slots = slot_numbers(ops, tables.slots)
        segments.append(Segment(offset, first, count, Placement.build(ops, rows, tables.slots)))
        for op, slot in zip(ops, slots, strict=True):
            for t in range(count):
                p = first + t
                if op.covers(p, p + 1):
                    row = rows[op.vector.key] + (p - op.start if op.positional else 0)
                    expect[(op.kind, op.layer, offset + t, slot)] = (row, 0.5 + req)
        offset += count + 1  # a padding token between requests
    tables.fill(offset, segments)
    for kind in OpKind:
        for layer in range(4):
            for t in range(offset):
                for slot in range(tables.slots):
                    row, scale = expect.get((kind, layer, t, slot), (0, 0.0))
                    assert int(tables.rows[kind][layer, t, slot]) == row
                    assert float(tables.scales[kind][layer, t, slot]) == scale


def test_step_delta_equals_the_per_layer_addition_bit_for_bit() -> None:
    """``fill(..., bank)`` gathers every layer's addition at once; the op must not notice the difference."""
    bank = VectorBank(slots=16, hidden=8)
    refs = [_ref(i) for i in range(4)]
    ops = [SteerOp(OpKind.ADD, layer, refs[(layer + j) % 4], 0.3 + j, start=j) for layer in range(3) for j in range(2)]
    ops.append(SteerOp(OpKind.ABLATE, 1, VectorRef.of(refs[0].data / refs[0].data.norm()), 1.0))
    pin = Pin.acquire(bank, ops, 2)
    assert pin is not None
    tables = StepTables(num_layers=3, max_tokens=8, slots=2)
    tables.fill(5, [Segment(0, 0, 5, pin.placement(bank))], bank.weight)
    h = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    for layer in range(3):
        delta = tables.delta(layer)
        assert delta is not None
        with_delta, without = h.clone(), h.clone()
        steer_(with_delta, bank.weight, *tables.layer(layer), delta)
        steer_(without, bank.weight, *tables.layer(layer))
        assert torch.equal(with_delta, without) and not torch.equal(with_delta, h)
    tables.fill(5, [Segment(0, 0, 5, pin.placement(bank))])  # no bank: per-layer path
    assert tables.delta(0) is None
