"""Per-step token tables: for every layer and every token of the step, which bank rows to read and with
what scale. The host fills a staging copy after the batch is laid out, then one copy moves it to the
device buffers, which are allocated once and never move.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from steerserve.runtime.plan import OpKind, SteerOp


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive tokens of the step (flat index ``offset``..) at absolute positions ``first``.."""

    offset: int
    first: int
    count: int
    ops: Sequence[SteerOp]
    rows: Mapping[str, int]  # vector key -> first bank row (from VectorBank.acquire)


class StepTables:
    """Device tables ``[layers, max_tokens, slots]`` plus their host staging arrays."""

    def __init__(self, num_layers: int, max_tokens: int, slots: int, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, max_tokens, slots)
        self.slots = slots
        self._rows = {k: np.zeros(shape, dtype=np.int64) for k in OpKind}
        self._scales = {k: np.zeros(shape, dtype=np.float32) for k in OpKind}
        self.rows = {k: torch.zeros(shape, dtype=torch.int64, device=device) for k in OpKind}
        self.scales = {k: torch.zeros(shape, dtype=torch.float32, device=device) for k in OpKind}
        self.num_tokens = 0
        self.width = {k: 0 for k in OpKind}  # slots used this step; the hf engine slices to this
        self.active = False

    @property
    def max_tokens(self) -> int:
        return int(self._rows[OpKind.ADD].shape[1])

    def fill(self, num_tokens: int, segments: Sequence[Segment]) -> None:
        """Lay out the step. Tokens not covered by any segment (padding) stay neutral: row 0, scale 0."""
        if num_tokens > self.max_tokens:
            raise ValueError(f"step has {num_tokens} tokens; tables hold {self.max_tokens}")
        # Clear what the last step wrote too, and copy that span below: consumers that keep fixed shapes
        # (graph capture reads all max_tokens rows) must see padding as neutral, never stale rows.
        dirty = max(num_tokens, self.num_tokens)
        for kind in OpKind:
            self._rows[kind][:, :dirty] = 0
            self._scales[kind][:, :dirty] = 0
        width = {k: 0 for k in OpKind}
        for seg in segments:
            used: dict[tuple[OpKind, int], int] = {}  # (kind, layer) -> next free slot for this request
            for op in seg.ops:
                span = op.covers(seg.first, seg.first + seg.count)
                if span is None:
                    continue
                slot = used.get((op.kind, op.layer), 0)
                if slot >= self.slots:
                    raise ValueError(f"more than {self.slots} {op.kind.value} ops on layer {op.layer}")
                used[(op.kind, op.layer)] = slot + 1
                width[op.kind] = max(width[op.kind], slot + 1)
                a, b = span
                t0, t1 = seg.offset + a - seg.first, seg.offset + b - seg.first
                base = seg.rows[op.vector.key]
                rows = self._rows[op.kind][op.layer, t0:t1, slot]
                rows[:] = base + np.arange(a - op.start, b - op.start) if op.positional else base
                self._scales[op.kind][op.layer, t0:t1, slot] = op.scale
        self.num_tokens = num_tokens
        self.width = width
        self.active = any(width.values())
        for kind in OpKind:  # one copy per table
            self.rows[kind][:, :dirty].copy_(torch.from_numpy(self._rows[kind][:, :dirty]))
            self.scales[kind][:, :dirty].copy_(torch.from_numpy(self._scales[kind][:, :dirty]))

    def layer(self, layer: int, sliced: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(add_rows, add_scales, abl_rows, abl_scales)`` for one layer, ``[T, K]`` each.

        ``sliced`` trims to this step's tokens and used slot widths (eager engines); graph-captured engines
        pass ``sliced=False`` and keep the fixed shapes.
        """
        t = self.num_tokens if sliced else self.max_tokens
        ka = self.width[OpKind.ADD] if sliced else self.slots
        kb = self.width[OpKind.ABLATE] if sliced else self.slots
        a, s = self.rows[OpKind.ADD][layer, :t, :ka], self.scales[OpKind.ADD][layer, :t, :ka]
        ar, as_ = self.rows[OpKind.ABLATE][layer, :t, :kb], self.scales[OpKind.ABLATE][layer, :t, :kb]
        return a, s, ar, as_
