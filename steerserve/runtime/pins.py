"""A request's hold on the bank: its vectors pinned, and its ops laid out as a ``Placement``.

Both engines keep one ``Pin`` per steered request in flight: acquired when the request is admitted
(``Pin.acquire`` returns None when the bank is full: the request waits), read every step
(``placement``, rebuilt only if the bank has compacted since), released when the request ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from steerserve.runtime.bank import VectorBank
from steerserve.runtime.plan import SteerOp
from steerserve.runtime.tables import EMPTY, Placement, slot_numbers


@dataclass
class Pin:
    ops: tuple[SteerOp, ...]
    keys: tuple[str, ...]  # distinct vector keys, pinned once each
    slots: int
    _placement: Placement
    _generation: int

    @classmethod
    def acquire(cls, bank: VectorBank, ops: Sequence[SteerOp], slots: int) -> Pin | None:
        """Pin ``ops``' vectors (all or nothing). Raises ValueError if the ops need more than ``slots``."""
        ops = tuple(ops)
        if not ops:
            return cls((), (), slots, EMPTY, bank.generation)
        slot_numbers(ops, slots)  # refuse before pinning anything
        rows = bank.acquire(op.vector for op in ops)
        if rows is None:
            return None
        return cls(ops, tuple(rows), slots, Placement.build(ops, rows, slots), bank.generation)

    def placement(self, bank: VectorBank) -> Placement:
        if self.keys and bank.generation != self._generation:  # the bank compacted: rows moved
            self._placement = Placement.build(self.ops, bank.rows_of(self.keys), self.slots)
            self._generation = bank.generation
        return self._placement

    def release(self, bank: VectorBank) -> None:
        bank.release(self.keys)
        self.keys = ()
