"""Per-step token tables: for every layer and every token of the step, which bank rows to read and with
what scale. The host fills a staging copy after the batch is laid out, then one copy per table moves
it to the device buffers, which are allocated once and never move (on CUDA through pinned, double-buffered
host memory, enqueued without blocking the host: ``runtime.staging``).

The host work per step is a fixed number of numpy calls, whatever the number of requests or ops: each
request's ops are turned into a ``Placement`` (flat arrays) once, when its vectors are pinned, and a step
concatenates the placements of its segments and scatters them in one go.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from steerserve.runtime.ops import vetted_delta
from steerserve.runtime.plan import OpKind, SteerOp
from steerserve.runtime.staging import HostStaging, cuda_fence

KINDS = tuple(OpKind)
STEERING = (OpKind.ADD, OpKind.ABLATE, OpKind.CLAMP)  # the kinds the steering op applies (ROUTE: the router's)
DELTA_MAX_ELEMENTS = 1 << 22  # 16 MiB in fp32: steps up to a few hundred tokens (decode) gather all layers at once
_NO_STOP = np.iinfo(np.int64).max
# columns of Placement.ints
_KIND, _LAYER, _SLOT, _ROW, _START, _STOP, _POSITIONAL, _GAIN = range(8)
_COLUMNS = 8


def slot_numbers(ops: Sequence[SteerOp], slots: int) -> list[int]:
    """Each op's slot: ops on the same (kind, layer) take slots 0, 1, ... in order. Raises ValueError
    when a layer needs more than ``slots``."""
    used: dict[tuple[OpKind, int], int] = {}
    out = []
    for op in ops:
        slot = used.get((op.kind, op.layer), 0)
        if slot >= slots:
            raise ValueError(f"more than {slots} {op.kind.value} ops on layer {op.layer}")
        used[(op.kind, op.layer)] = slot + 1
        out.append(slot)
    return out


@dataclass(frozen=True, eq=False)
class Placement:
    """One request's ops as arrays: ``ints [n_ops, 8]`` (kind, layer, slot, first bank row, start, stop,
    positional, gain) and ``scales [n_ops]``. Slots are numbered per (kind, layer) in op order."""

    ints: np.ndarray
    scales: np.ndarray

    @classmethod
    def build(cls, ops: Sequence[SteerOp], rows: Mapping[str, int], slots: int) -> Placement:
        """``rows``: vector key -> first bank row (from ``VectorBank.acquire``)."""
        ints = np.zeros((len(ops), _COLUMNS), dtype=np.int64)
        for i, (op, slot) in enumerate(zip(ops, slot_numbers(ops, slots), strict=True)):
            stop = _NO_STOP if op.stop is None else op.stop
            ints[i] = (KINDS.index(op.kind), op.layer, slot, rows[op.vector.key], op.start, stop, op.positional,
                       op.gain)
        return cls(ints, np.array([op.scale for op in ops], dtype=np.float32))

    def __len__(self) -> int:
        return int(self.ints.shape[0])


EMPTY = Placement(np.zeros((0, _COLUMNS), dtype=np.int64), np.zeros(0, dtype=np.float32))


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive tokens of the step (flat index ``offset``..) at absolute positions ``first``..;
    ``cell``: the request's register cell (``runtime.registers``), read by its ``gain`` ops (0: gain 1)."""

    offset: int
    first: int
    count: int
    placement: Placement
    cell: int = 0


class StepTables:
    """Device tables ``[layers, max_tokens, slots]`` plus their host staging arrays."""

    def __init__(self, num_layers: int, max_tokens: int, slots: int, device: torch.device | str = "cpu",
                 staged: bool | None = None) -> None:
        """``staged``: copy the tables through pinned, double-buffered host memory (``runtime.staging``);
        default: on CUDA only. Unstaged (CPU), the device tables are filled straight from the numpy arrays."""
        shape = (num_layers, max_tokens, slots)
        self.slots = slots
        self._rows = {k: np.zeros(shape, dtype=np.int64) for k in OpKind}
        self._scales = {k: np.zeros(shape, dtype=np.float32) for k in OpKind}
        self._cells = {k: np.zeros(shape, dtype=np.int64) for k in OpKind}  # register cell of gain ops, else 0
        self.rows = {k: torch.zeros(shape, dtype=torch.int64, device=device) for k in OpKind}
        # The scales the op reads: the host's, times the gain register of the op's cell for gain ops
        # (exactly 1 for the others: cell 0), multiplied on the device in ``fill``.
        self.scales = {k: torch.zeros(shape, dtype=torch.float32, device=device) for k in OpKind}
        self.cells = {k: torch.zeros(shape, dtype=torch.int64, device=device) for k in OpKind}
        self._gained: set[OpKind] = set()  # the kinds with a gain op this step
        # Tokens whose steering the op refused this step (non-finite result): written by the op on the device,
        # read by the host after the step (``flagged``), cleared by ``fill``.
        self.bad = torch.zeros(max_tokens, dtype=torch.bool, device=device)
        self.num_tokens = 0
        self.width = {k: 0 for k in OpKind}  # slots used this step; eager readers slice to this
        self.active = False
        # [L] layers with an ADD, ABLATE or CLAMP op this step: an eager op skips the others (all of whose rows read
        # row 0 with scale 0: steering them would leave them bit-identical), e.g. a closed loop's one layer.
        self._steers = [False] * num_layers
        self._views: list[tuple[torch.Tensor, ...]] = []  # this step's sliced per-layer views
        self._clamps: list[tuple[torch.Tensor, torch.Tensor]] = []  # and its CLAMP ops', [T, Kc] each
        self._delta: list[torch.Tensor | None] | None = None  # this step's per-layer additions, when gathered
        self._layer_gain: torch.Tensor | None = None  # [cells, L] read by the op this step, if given
        cuda = torch.device(device).type == "cuda"
        self.staging: HostStaging | None = None
        if cuda if staged is None else staged:
            n = num_layers * max_tokens * slots
            dtypes = {"rows": torch.int64, "scales": torch.float32, "cells": torch.int64}
            sizes: dict[Hashable, tuple[int, torch.dtype]] = {
                (name, k): (n, dtype) for name, dtype in dtypes.items() for k in OpKind}
            self.staging = HostStaging(sizes, pin=cuda, fence=cuda_fence if cuda else None)
        self.fill(0, [])

    @property
    def steering(self) -> bool:
        """This step has ADD, ABLATE or CLAMP ops (ROUTE ops are read by the router point alone, never steered)."""
        return any(self.width[k] for k in STEERING)

    def steers(self, layer: int) -> bool:
        """This step has an ADD, ABLATE or CLAMP op at ``layer`` (eager callers skip the other layers)."""
        return self._steers[layer]

    @property
    def max_tokens(self) -> int:
        return int(self._rows[OpKind.ADD].shape[1])

    def fill(self, num_tokens: int, segments: Sequence[Segment], bank: torch.Tensor | None = None,
             gain: torch.Tensor | None = None, layer_gain: torch.Tensor | None = None) -> None:
        """Lay out the step. Tokens not covered by any segment (padding) stay neutral: row 0, scale 0.

        ``gain`` (``Registers.gain``, ``[cells]``): when the step has ``gain`` ops, their scales are multiplied
        by their request's gain on the device, here, before any op reads them: the value the sampler-side op
        wrote at the previous step (stream order; the host never reads it). ``layer_gain`` (``Registers.
        layer_gain``, ``[cells, L]``): and by the request's per-layer gain, which a controller's read op wrote.

        With ``bank``, small steps (decode) also get every layer's addition ``[L, T, H]`` gathered at
        once (``delta``): one gather per step instead of one per layer, and vetted once per step
        (``ops.vetted_delta``) instead of once per layer.
        """
        if num_tokens > self.max_tokens:
            raise ValueError(f"step has {num_tokens} tokens; tables hold {self.max_tokens}")
        # Clear what the last step wrote too, and copy that span below: consumers that keep fixed shapes
        # (graph capture reads all max_tokens rows) must see padding as neutral, never stale rows.
        dirty = max(num_tokens, self.num_tokens)
        for kind in OpKind:
            self._rows[kind][:, :dirty] = 0
            self._scales[kind][:, :dirty] = 0
            if kind in self._gained:
                self._cells[kind][:, :dirty] = 0
        self.width = {k: 0 for k in OpKind}
        self._steers = [False] * len(self._steers)
        gained, self._gained = self._gained, set()
        segments = [s for s in segments if len(s.placement) and s.count > 0]
        if segments:
            self._scatter(segments)
        self.num_tokens = num_tokens
        self.active = any(self.width.values())
        self.bad[:dirty].zero_()
        if self.staging is not None:
            self.staging.begin()
        for kind in OpKind:  # one copy per table
            self._to_device("rows", kind, dirty)
            self._to_device("scales", kind, dirty)
            if kind in self._gained or kind in gained:  # (this step's gain ops, or clearing the last step's)
                self._to_device("cells", kind, dirty)
                if kind in self._gained and gain is not None:
                    scales = self.scales[kind][:, :dirty]  # [L, T, K]
                    cells = self.cells[kind][:, :dirty]
                    scales.mul_(gain.index_select(0, cells.reshape(-1)).view_as(scales))
        if self.staging is not None:
            self.staging.end()
        # Per-layer gains are read by the op itself (``layer``), not here: a controller may write them in the
        # middle of this very forward pass, for the layers above the one where it decides.
        self._layer_gain = layer_gain if self._gained else None
        # Slice once per step, not once per layer: the op then only picks its layer's views.
        ka, kb = self.width[OpKind.ADD], self.width[OpKind.ABLATE]
        add_rows = self.rows[OpKind.ADD][:, :num_tokens, :ka]  # [L, T, Ka]
        add_scales = self.scales[OpKind.ADD][:, :num_tokens, :ka]
        self._delta = None
        # Only the layers with ops: the others' additions are exactly 0 and the op skips them (``steers``).
        layers = [i for i, on in enumerate(self._steers) if on]
        small = bank is not None and len(layers) * num_tokens * bank.shape[1] <= DELTA_MAX_ELEMENTS
        if bank is not None and ka and small and self._layer_gain is None:
            rows, scales = add_rows, add_scales
            if len(layers) < len(self._steers):  # (a few ints to the device; no copy when every layer has ops)
                at = torch.tensor(layers, device=add_rows.device)
                rows, scales = add_rows.index_select(0, at), add_scales.index_select(0, at)
            gathered = vetted_delta(bank, rows, scales, self.bad[:num_tokens])  # [len(layers), T, H]
            self._delta = [None] * len(self._steers)
            for layer, d in zip(layers, gathered.unbind(0), strict=True):
                self._delta[layer] = d
        self._views = list(zip(add_rows.unbind(0), add_scales.unbind(0),
                               self.rows[OpKind.ABLATE][:, :num_tokens, :kb].unbind(0),
                               self.scales[OpKind.ABLATE][:, :num_tokens, :kb].unbind(0), strict=True))
        kc = self.width[OpKind.CLAMP]
        self._clamps = list(zip(self.rows[OpKind.CLAMP][:, :num_tokens, :kc].unbind(0),
                                self.scales[OpKind.CLAMP][:, :num_tokens, :kc].unbind(0), strict=True))

    def _to_device(self, name: str, kind: OpKind, dirty: int) -> None:
        """Host table ``name`` of ``kind`` (``[L, dirty, K]``, the step's span) to its device table."""
        hosts: dict[str, dict[OpKind, np.ndarray]] = {"rows": self._rows, "scales": self._scales,
                                                      "cells": self._cells}
        devices: dict[str, dict[OpKind, torch.Tensor]] = {"rows": self.rows, "scales": self.scales,
                                                          "cells": self.cells}
        host, dst = hosts[name][kind][:, :dirty], devices[name][kind][:, :dirty]
        if self.staging is None:
            dst.copy_(torch.from_numpy(host))
        else:
            self.staging.copy((name, kind), host, dst)

    def _scatter(self, segments: Sequence[Segment]) -> None:
        """Every (token, op) pair of the step at once: expand each op over its segment's tokens."""
        ints = np.concatenate([s.placement.ints for s in segments])  # [N, 7] all ops of the step
        scales = np.concatenate([s.placement.scales for s in segments])  # [N]
        n_ops = np.array([len(s.placement) for s in segments])
        count = np.repeat([s.count for s in segments], n_ops)  # [N] tokens of each op's segment
        first = np.repeat([s.first for s in segments], n_ops)
        offset = np.repeat([s.offset for s in segments], n_ops)
        cell = np.repeat([s.cell for s in segments], n_ops)
        op = np.repeat(np.arange(len(ints)), count)  # [E] op of each (token, op) entry
        i = np.arange(len(op)) - np.repeat(np.cumsum(count) - count, count)  # [E] token index in segment
        pos = first[op] + i  # [E] absolute position
        e = ints[op]  # [E, 7]
        keep = (pos >= e[:, _START]) & (pos < e[:, _STOP])
        op, pos, e = op[keep], pos[keep], e[keep]
        token = offset[op] + pos - first[op]  # [E'] flat index in the step
        row = e[:, _ROW] + np.where(e[:, _POSITIONAL] > 0, pos - e[:, _START], 0)
        for k, kind in enumerate(KINDS):
            m = e[:, _KIND] == k
            if not m.any():
                continue
            at = (e[m, _LAYER], token[m], e[m, _SLOT])
            self._rows[kind][at] = row[m]
            self._scales[kind][at] = scales[op[m]]
            gained = e[m, _GAIN] > 0
            if gained.any():
                self._cells[kind][at] = np.where(gained, cell[op[m]], 0)
                self._gained.add(kind)
            self.width[kind] = int(e[m, _SLOT].max()) + 1
            if kind in STEERING:
                for layer in np.unique(e[m, _LAYER]).tolist():
                    self._steers[layer] = True

    def flagged(self, segments: Sequence[Segment]) -> list[int]:
        """Indices of ``segments`` (this step's, as given to ``fill``) with a token the op refused.

        Call after the step's forward pass. One device-to-host copy of ``bad`` (a sync on GPU), so only on
        steered steps (``active``); unsteered steps are never refused.
        """
        if not self.active or not segments:
            return []
        bad = self.bad[: self.num_tokens].cpu().numpy()
        if not bad.any():
            return []
        return [i for i, s in enumerate(segments) if bad[s.offset : s.offset + s.count].any()]

    def delta(self, layer: int) -> torch.Tensor | None:
        """This step's addition at ``layer`` (``[T, H]``) if ``fill`` gathered it, else None (also for a
        layer without ops: ``steers``)."""
        return None if self._delta is None else self._delta[layer]

    def clamp(self, layer: int, sliced: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, targets)`` ``[T, Kc]`` of the CLAMP ops at ``layer`` (``ops.clamp_delta``), or None on a step
        without any (eager). ``sliced=False`` (graph capture): the full fixed-shape tables, always."""
        if not sliced:
            return self.rows[OpKind.CLAMP][layer], self.scales[OpKind.CLAMP][layer]
        return self._clamps[layer] if self.width[OpKind.CLAMP] else None

    def layer(self, layer: int, sliced: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(add_rows, add_scales, abl_rows, abl_scales)`` for one layer, ``[T, K]`` each.

        ``sliced`` trims to this step's tokens and used slot widths (eager engines); graph-captured engines
        pass ``sliced=False`` and keep the fixed shapes. With per-layer gains this step (``fill``'s
        ``layer_gain``), the scales are multiplied by them here, when the op asks: their current values.
        """
        add, abl = OpKind.ADD, OpKind.ABLATE
        if sliced:
            a, s, ar, as_ = self._views[layer]
        else:
            a, s = self.rows[add][layer], self.scales[add][layer]
            ar, as_ = self.rows[abl][layer], self.scales[abl][layer]
        lg = self._layer_gain
        if lg is None:
            return a, s, ar, as_
        own = lg[:, layer]  # [cells]: each cell's gain at this layer (1 for cell 0 and open-loop ops)
        n = s.shape[0]
        s = s * own.index_select(0, self.cells[add][layer, :n, : s.shape[1]].reshape(-1)).view_as(s)
        as_ = as_ * own.index_select(0, self.cells[abl][layer, :n, : as_.shape[1]].reshape(-1)).view_as(as_)
        return a, s, ar, as_
