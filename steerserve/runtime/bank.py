"""The vector bank: one fixed ``[slots, hidden]`` buffer that never moves. Row 0 is all zeros.

Vectors enter by content hash (``VectorRef.key``) into a contiguous run of rows (positional ActAdd
vectors need ``n`` rows), are shared by every request that uses the same content, stay while any request
holds them, and are evicted least-recently-used when space is needed. ``acquire`` is all-or-nothing:
when the bank cannot fit a request's vectors it returns None and the request waits.

A request fits whenever the rows pinned by others plus its own are at most ``capacity``: if no free run
is long enough, the bank compacts (moves every cached vector down, evicting unpinned ones) and bumps
``generation``; holders of row numbers re-read them with ``rows_of`` when the generation changed. So a
front end that admits requests by counting distinct pinned rows never sees an acquire fail.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from steerserve.runtime.plan import VectorRef


@dataclass
class _Entry:
    start: int
    rows: int
    refs: int = 0


class VectorBank:
    def __init__(self, slots: int, hidden: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if slots < 2:
            raise ValueError("the bank needs at least 2 slots (row 0 is reserved)")
        self.weight = torch.zeros(slots, hidden, dtype=dtype, device=device)  # [slots, hidden]
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: oldest first
        self._free: list[tuple[int, int]] = [(1, slots - 1)]  # (start, rows), sorted by start
        self.generation = 0  # bumped whenever cached vectors move to other rows (compaction)

    @property
    def slots(self) -> int:
        return int(self.weight.shape[0])

    @property
    def capacity(self) -> int:
        """Usable rows (row 0 is the neutral zero row)."""
        return self.slots - 1

    def pinned_rows(self) -> int:
        return sum(e.rows for e in self._entries.values() if e.refs > 0)

    def stats(self) -> dict[str, int]:
        return {"pinned_rows": self.pinned_rows(), "cached_rows": self.used_rows(), "capacity": self.capacity,
                "compactions": self.generation}

    def rows_of(self, keys: Iterable[str]) -> dict[str, int]:
        """Current first row of each cached vector (they move only when ``generation`` changes)."""
        return {k: self._entries[k].start for k in keys}

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def used_rows(self) -> int:
        return sum(e.rows for e in self._entries.values())

    def acquire(self, refs: Iterable[VectorRef]) -> dict[str, int] | None:
        """Pin every vector (loading missing ones); return key -> first row, or None if they cannot fit."""
        wanted = {r.key: r for r in refs}
        missing = [r for k, r in wanted.items() if k not in self._entries]
        if not self._place(missing, set(wanted)):
            kept = sum(e.rows for k, e in self._entries.items() if e.refs > 0 or k in wanted)
            if kept + sum(r.rows for r in missing) > self.capacity:
                return None
            self._compact(keep=set(wanted))  # enough rows in total, but fragmented
            if not self._place(missing, set(wanted)):
                raise AssertionError("vector bank: no room after compaction")
        out = {}
        for key in wanted:
            entry = self._entries[key]
            entry.refs += 1
            self._entries.move_to_end(key)
            out[key] = entry.start
        return out

    def _place(self, refs: list[VectorRef], protect: set[str]) -> bool:
        placed: list[str] = []
        for ref in refs:
            start = self._allocate(ref.rows, protect)
            if start is None:
                for key in placed:  # roll back: all or nothing
                    self._drop(key)
                return False
            self.weight[start : start + ref.rows].copy_(ref.data.to(self.weight.dtype))
            self._entries[ref.key] = _Entry(start, ref.rows)
            placed.append(ref.key)
        return True

    def _compact(self, keep: set[str]) -> None:
        """Evict unpinned vectors not in ``keep``; move the rest down to rows 1.. in row order."""
        for key in [k for k, e in self._entries.items() if e.refs == 0 and k not in keep]:
            self._drop(key)
        end = 1
        for entry in sorted(self._entries.values(), key=lambda e: e.start):
            if entry.start != end:  # destination below the source: copy in row order is safe
                src = self.weight[entry.start : entry.start + entry.rows].clone()
                self.weight[entry.start : entry.start + entry.rows].zero_()
                self.weight[end : end + entry.rows].copy_(src)
                entry.start = end
            end += entry.rows
        self._free = [(end, self.slots - end)] if end < self.slots else []
        self.generation += 1

    def release(self, keys: Iterable[str]) -> None:
        """Unpin; the rows stay cached until evicted."""
        for key in set(keys):
            entry = self._entries.get(key)
            if entry is not None and entry.refs > 0:
                entry.refs -= 1

    def _allocate(self, rows: int, protect: set[str]) -> int | None:
        while True:
            for i, (start, size) in enumerate(self._free):
                if size >= rows:
                    self._free[i] = (start + rows, size - rows)
                    if size == rows:
                        del self._free[i]
                    return start
            victim = next((k for k, e in self._entries.items() if e.refs == 0 and k not in protect), None)
            if victim is None:
                return None
            self._drop(victim)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.weight[entry.start : entry.start + entry.rows].zero_()
        self._free.append((entry.start, entry.rows))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, size in self._free:  # coalesce neighbours so long runs stay available
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        self._free = merged
