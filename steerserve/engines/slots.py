"""Admission of closed-loop requests by register slots, in the front end, for every engine.

Each closed-loop request holds one register slot in the engine for its lifetime (``runtime.registers``).
The engines have ``Settings.loop_slots`` of them; the front end lets at most that many closed-loop
requests be in flight, so an engine never runs out. A request is in flight from its first output
iteration (before it is queued) until its outputs are closed (after the engine was told it finished or
was aborted), as for ``vllm.gate.BankGate``. Beyond the limit the request is refused with 429 before it
is queued: it would otherwise wait behind requests of unbounded length.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TypeVar

from steerserve.errors import SteerError

T = TypeVar("T")


class LoopSlots:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: set[str] = set()

    @property
    def in_use(self) -> int:
        return len(self._held)

    def check(self) -> None:
        """Raise a 429 naming ``steering`` when every slot is taken."""
        if len(self._held) >= self.capacity:
            raise SteerError(f"all {self.capacity} closed-loop slots of the server are in use; retry shortly",
                             field="steering", status=429, code="loop_slots_full")

    async def holding(self, request_id: str, outputs: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """``outputs`` with a slot held for ``request_id`` while they are consumed. Nothing is held (and
        nothing queued) by an iterator that is never started."""
        self.check()  # again: another request may have taken the last slot since ``check``
        self._held.add(request_id)
        try:
            async for out in outputs:
                yield out
        finally:
            await outputs.aclose()
            self._held.discard(request_id)
