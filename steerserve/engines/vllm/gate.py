"""Admission by vector-bank capacity, in the front end: a steered request enters vLLM only when the
distinct bank rows of the requests in flight plus its own fit; otherwise it waits (first come, first
served among the waiting ones), and never fails.

Why this is exact: the worker pins a request's rows when the request is first scheduled and releases
them when it is finished or aborted; a request is "in flight" here from before ``add_request`` until
after its last output (or its abort) has been sent, so the worker's pinned set is always a subset of
the in-flight set here (vLLM handles a finish/abort before any request added after it). And the bank
compacts rather than fail on fragmentation (``runtime.bank``). So the worker's acquire cannot fail.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Mapping


class BankGate:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._refs: Counter[str] = Counter()  # vector key -> requests in flight using it
        self._rows: dict[str, int] = {}  # vector key -> rows
        self._held: dict[str, tuple[str, ...]] = {}  # request id -> its keys
        self._tickets = itertools.count()
        self._queue: list[int] = []  # tickets of waiting requests, in arrival order
        self._cond: asyncio.Condition | None = None  # made on first use, in the serving loop

    @property
    def used(self) -> int:
        """Distinct rows pinned (or about to be) by requests in flight."""
        return sum(self._rows[k] for k in self._refs)

    def stats(self) -> dict[str, int]:
        """``gate_rows`` (distinct rows held by requests in flight), ``gate_requests`` (requests in flight
        through the gate), ``gate_waiting`` (requests queued for rows): a leak here would otherwise be
        invisible."""
        return {"gate_rows": self.used, "gate_requests": len(self._held), "gate_waiting": len(self._queue)}

    def _need(self, vectors: Mapping[str, int]) -> int:
        return sum(rows for key, rows in vectors.items() if key not in self._refs)

    async def enter(self, request_id: str, vectors: Mapping[str, int]) -> None:
        """Wait until ``vectors`` (key -> rows) fit, then hold them for ``request_id``."""
        if sum(vectors.values()) > self.capacity:
            raise ValueError(f"needs {sum(vectors.values())} bank rows; the bank holds {self.capacity}")
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            if self._need(vectors) and (self._queue or self.used + self._need(vectors) > self.capacity):
                ticket = next(self._tickets)
                self._queue.append(ticket)
                try:
                    await self._cond.wait_for(
                        lambda: self._queue[0] == ticket and self.used + self._need(vectors) <= self.capacity)
                finally:
                    self._queue.remove(ticket)
                    self._cond.notify_all()  # the next in line may fit too
            for key, rows in vectors.items():
                self._refs[key] += 1
                self._rows[key] = rows
            self._held[request_id] = tuple(vectors)

    async def leave(self, request_id: str) -> None:
        """Release ``request_id``'s vectors (after vLLM has been told it finished or was aborted)."""
        keys = self._held.pop(request_id, ())
        for key in keys:
            self._refs[key] -= 1
            if self._refs[key] <= 0:
                del self._refs[key]
                del self._rows[key]
        if keys and self._cond is not None:
            async with self._cond:
                self._cond.notify_all()
