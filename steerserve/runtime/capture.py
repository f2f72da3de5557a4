"""The read op and the capture buffer: hidden states read inside the serving engine's own forward pass.

A *read* gathers chosen rows of a layer's residual stream and writes them somewhere fixed: here into a
capture buffer ``[layers, C + 1, H]`` (row ``C`` is a sink). Per step the host writes ``index [T]``: the
buffer row for each token of the step that is read, the sink for all others (so the op has a fixed shape
and no mask). After the step the host copies the rows out. This is how ActAdd pairs, extraction and
calibration read states through the engine that serves (a prompt-only *capture request*), instead of a
second copy of the model in the front end.

Shapes: ``stream [T, H]`` (the flat step), ``buf [L, C + 1, H]`` fp32, ``index [max_tokens]`` int64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def read_(dest: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``dest[index[t]] = rows[t]`` for every ``t`` (``dest [R, H]``, ``index [T]``, ``rows [T, H]``).

    Indices may repeat only on a sink row that nobody reads. Fixed shapes, no host sync."""
    dest.index_copy_(0, index, rows.to(dest.dtype))


@dataclass(frozen=True)
class Read:
    """``count`` tokens of the step, flat index ``offset``.., absolute positions ``first``.., of ``request``."""

    request: str
    offset: int
    first: int
    count: int


class CaptureBuffer:
    """The capture buffer and its per-step index table (allocated once, never moved)."""

    def __init__(self, num_layers: int, rows: int, hidden: int, max_tokens: int,
                 device: torch.device | str = "cpu") -> None:
        self.rows = rows  # usable rows per step; row ``rows`` is the sink
        self.buf = torch.zeros(num_layers, rows + 1, hidden, dtype=torch.float32, device=device)
        self._index = np.full(max_tokens, rows, dtype=np.int64)
        self.index = torch.full((max_tokens,), rows, dtype=torch.int64, device=device)
        self.active = False  # some token is read this step
        self.num_tokens = 0  # tokens in this step
        self._reads: list[tuple[Read, int]] = []  # this step's reads and their first buffer row
        self._dirty = 0

    def fill(self, num_tokens: int, reads: Sequence[Read]) -> list[Read]:
        """Lay out this step's reads (a step of ``num_tokens``); returns the ones that did not fit in the
        buffer (not read)."""
        self.num_tokens = num_tokens
        self._index[: self._dirty] = self.rows
        self._reads, used, dropped = [], 0, []
        for r in reads:
            if used + r.count > self.rows:
                dropped.append(r)
                continue
            self._index[r.offset : r.offset + r.count] = np.arange(used, used + r.count)
            self._reads.append((r, used))
            used += r.count
        dirty = max(self._dirty, max((r.offset + r.count for r, _ in self._reads), default=0))
        self.index[:dirty].copy_(torch.from_numpy(self._index[:dirty]))
        self._dirty = dirty if self._reads else 0
        self.active = bool(self._reads)
        return dropped

    def read_layer(self, layer: int, stream: torch.Tensor) -> None:
        """The op's part at ``layer``: copy the read tokens of ``stream [T, H]`` into the buffer."""
        n = stream.shape[0]
        read_(self.buf[layer], self.index[:n], stream)

    def collect(self) -> list[tuple[Read, torch.Tensor]]:
        """After the step: each read with its states ``[count, L, H]`` (CPU fp32), then nothing is active."""
        out = [(r, self.buf[:, row : row + r.count].transpose(0, 1).to("cpu", copy=True)) for r, row in self._reads]
        self._reads, self.active = [], False
        return out


class Captures:
    """Host-side assembly of each capture request's states over its steps (chunked prefill)."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._parts: dict[str, list[tuple[int, torch.Tensor]]] = {}

    def add(self, collected: Sequence[tuple[Read, torch.Tensor]]) -> None:
        for r, states in collected:
            self._parts.setdefault(r.request, []).append((r.first, states))
        while len(self._parts) > self.limit:  # never taken (the client went away): forget the oldest
            del self._parts[next(iter(self._parts))]

    def keys(self) -> list[str]:
        return list(self._parts)

    def take(self, request: str, layers: Sequence[int]) -> torch.Tensor | None:
        """The request's states ``[n, len(layers), H]`` in position order, then forgotten."""
        parts = self._parts.pop(request, None)
        if not parts:
            return None
        parts.sort(key=lambda p: p[0])
        return torch.cat([states for _, states in parts])[:, list(layers)].contiguous()
