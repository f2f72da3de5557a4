"""Pinned, double-buffered staging of the per-step tables (``runtime.staging``), checked on CPU.

On CPU the tables are unstaged by default; here they are staged on purpose (unpinned: CPU has no pinned
allocator) and must come out bit-identical to the unstaged ones, step after step, with the two buffer
sets taking turns; and a buffer set is written again only after the fence of its last copies was waited on.
"""

from __future__ import annotations

import numpy as np
import torch

from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.staging import HostStaging
from steerserve.runtime.tables import Placement, Segment, StepTables

L, T, K, H = 4, 32, 3, 8


def _steps(seed: int) -> list[tuple[int, list[Segment]]]:
    rng = np.random.default_rng(seed)
    v = VectorRef.of(torch.ones(H))
    out = []
    for _ in range(12):
        segs, offset = [], 0
        for _ in range(int(rng.integers(0, 4))):
            count = int(rng.integers(1, 6))
            ops = [SteerOp(OpKind.ADD if rng.random() < 0.7 else OpKind.ABLATE, int(rng.integers(L)), v,
                           float(rng.normal()), int(rng.integers(0, 4)), None, False, bool(rng.random() < 0.3))
                   for _ in range(int(rng.integers(1, 4)))]
            place = Placement.build(ops, {v.key: int(rng.integers(1, 6))}, K)
            segs.append(Segment(offset, int(rng.integers(0, 10)), count, place, cell=int(rng.integers(0, 3))))
            offset += count
        out.append((offset + int(rng.integers(0, 3)), segs))
    return out


def _tables(t: StepTables) -> list[torch.Tensor]:
    return [x.clone() for k in OpKind for x in (t.rows[k], t.scales[k], t.cells[k])]


def test_staged_tables_equal_unstaged_and_alternate_buffers() -> None:
    plain, staged = StepTables(L, T, K), StepTables(L, T, K, staged=True)
    assert plain.staging is None and staged.staging is not None  # CPU: unstaged unless asked
    gain = torch.tensor([1.0, 0.5, 2.0])
    turns, gained = [], 0
    for n, segs in _steps(0):
        plain.fill(n, segs, gain=gain)
        staged.fill(n, segs, gain=gain)
        turns.append(staged.staging.index)
        gained += int(plain.active)
        assert all(torch.equal(a, b) for a, b in zip(_tables(plain), _tables(staged), strict=True))
        assert plain.width == staged.width
    assert gained >= 6  # most steps were steered: the comparison compared something
    assert turns == [(i + 1) % 2 for i in range(len(turns))]  # (the constructor's empty fill took set 0)


class _Fence:
    log: list[tuple[str, int]] = []

    def __init__(self) -> None:
        self.id = len([e for e in _Fence.log if e[0] == "record"])

    def record(self) -> None:
        _Fence.log.append(("record", self.id))

    def synchronize(self) -> None:
        _Fence.log.append(("wait", self.id))


def test_a_buffer_set_is_rewritten_only_after_its_fence() -> None:
    _Fence.log = []
    staging = HostStaging({"x": (16, torch.float32)}, pin=False, fence=_Fence)
    dst = torch.zeros(2, 4)
    for step in range(5):
        before = len(_Fence.log)
        b = staging.begin()
        assert b == step % 2
        waits = [e for e in _Fence.log[before:] if e[0] == "wait"]
        # step s reuses the set of step s - 2: it waits on exactly that step's fence, never on step s - 1's
        assert waits == ([("wait", step - 2)] if step >= 2 else [])
        src = np.full((2, 4), float(step), dtype=np.float32)
        staging.copy("x", src[:, :], dst)
        assert torch.equal(dst, torch.from_numpy(src))
        assert torch.equal(staging.buffer(b, "x")[:8], torch.full((8,), float(step)))
        if step >= 1:  # the other set still holds the previous step's values: not overwritten
            assert torch.equal(staging.buffer(1 - b, "x")[:8], torch.full((8,), float(step - 1)))
        staging.end()
    assert [e for e in _Fence.log if e[0] == "record"] == [("record", i) for i in range(5)]
