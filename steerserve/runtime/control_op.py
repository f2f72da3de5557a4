"""The controller read op: refusal controllers run inside the step, on the device (``runtime.controller``).

Device state (allocated once, never moved): ``C`` controller slots of weights (``w1 [C, D, 4H]``,
``b1 [C, D]``, ``w2 [C, 1 + N, D]``, ``b2 [C, 1 + N]``, ``read [C, 4]`` the layers each reads), and per
register cell the states of its last prompt token at every layer, ``inp [cells, N, H]``. Per step the host
writes a read table of ``R`` rows: the flat index of each controlled request's last prompt token in this
step, its register cell and its controller slot (padding: token 0, the sink cell, slot 0). At every layer
the op copies those tokens' states into ``inp``; after the last layer it runs every slot's MLP on every
row and writes the row's own slot's ``s * w`` into ``Registers.layer_gain`` and ``s`` into
``Registers.ctrl_score``. Fixed shapes, no host sync; a smaller ``D`` is zero-padded (exact: the padded
units are ``relu(0) = 0`` and their output weights 0).

Host side, ``ControllerSlots`` gives each distinct controller in flight a slot (by content key) and says
when its weights must be (re)loaded; a slot is reused only when no request in flight holds it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from steerserve.runtime.controller import READ_LAYERS, ControllerWeights, controller_outputs, layer_gains
from steerserve.runtime.registers import Registers

WIDTH = 1024  # hidden units of the paper's controller: the widest this unit holds


class RowTable:
    """A per-step table of ``width`` int64 columns over at most ``rows`` rows (host staging + device copy)."""

    def __init__(self, width: int, rows: int, pad: Sequence[int], device: torch.device | str) -> None:
        self._host = np.zeros((width, rows), dtype=np.int64)
        self._pad = np.array(pad, dtype=np.int64)[:, None]
        self.device = torch.zeros((width, rows), dtype=torch.int64, device=device)
        self.count = 0

    def fill(self, rows: Sequence[Sequence[int]]) -> None:
        n = len(rows)
        if n > self._host.shape[1]:
            raise ValueError(f"{n} rows in one step; the table holds {self._host.shape[1]}")
        dirty = max(n, self.count)
        self._host[:, :dirty] = self._pad
        if n:
            self._host[:, :n] = np.array(rows, dtype=np.int64).T
        self.device[:, :dirty].copy_(torch.from_numpy(self._host[:, :dirty]))
        self.count = n

    def columns(self) -> tuple[torch.Tensor, ...]:
        """This step's rows, one ``[n]`` tensor per column."""
        return tuple(self.device[:, : self.count].unbind(0))


class ControllerUnit:
    """``C`` controller slots, the per-cell input states and this step's read table (see the module doc)."""

    def __init__(self, slots: int, cells: int, num_layers: int, hidden: int, max_rows: int,
                 device: torch.device | str = "cpu", width: int = WIDTH) -> None:
        c, n, h, d = slots, num_layers, hidden, width
        self.slots, self.num_layers, self.width, self.sink = slots, num_layers, width, cells - 1

        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.w1, self.b1 = zeros(c, d, READ_LAYERS * h), zeros(c, d)
        self.w2, self.b2 = zeros(c, 1 + n, d), zeros(c, 1 + n)
        self.read = zeros(c, READ_LAYERS, dtype=torch.int64)
        self.decide_at = [-1] * c  # host copy of each slot's last read layer: where its rows are decided
        self.inp = zeros(cells, n, h)  # [cells, N, H]: last prompt token's state at every layer
        self.keys: list[str | None] = [None] * c  # what each slot holds
        self.rows = RowTable(3, max_rows, (0, self.sink, 0), device)  # token, cell, slot

    def load(self, slot: int, weights: ControllerWeights) -> None:
        """Copy ``weights`` into ``slot`` (between steps: no request in flight reads that slot)."""
        d = weights.w1.shape[0]
        if d > self.width or weights.num_layers != self.num_layers:
            raise ValueError(f"controller of width {d} and {weights.num_layers} layers does not fit this unit "
                             f"(width <= {self.width}, {self.num_layers} layers)")
        for dest in (self.w1, self.b1, self.w2):
            dest[slot].zero_()  # the padded units stay exactly 0
        self.w1[slot, :d].copy_(weights.w1)
        self.b1[slot, :d].copy_(weights.b1)
        self.w2[slot, :, :d].copy_(weights.w2)
        self.b2[slot].copy_(weights.b2)
        self.read[slot].copy_(torch.tensor(weights.read_layers, dtype=torch.int64))
        self.decide_at[slot] = weights.read_layers[-1]
        self.keys[slot] = weights.key

    @property
    def active(self) -> bool:
        """Some token is read this step."""
        return bool(self.rows.count)

    def fill(self, reads: Sequence[tuple[int, int, int]]) -> None:
        """This step's reads: ``(flat token index, register cell, controller slot)`` each."""
        self.rows.fill(reads)

    def read_layer(self, layer: int, stream: torch.Tensor, regs: Registers, static: bool = False) -> None:
        """The op's part at ``layer``: copy the read tokens of ``stream [T, H]``; at a controller's last read
        layer, decide its rows: the layers above take the new gains in this same forward pass.

        ``static`` (graph capture): every row of the table, read or padding, with no branch on the data."""
        table = self.rows.device  # [3, R]
        r = table.shape[1] if static else self.rows.count
        tokens, cells, which = table[0, :r], table[1, :r], table[2, :r]
        self.inp[:, layer].index_copy_(0, cells, stream.index_select(0, tokens).to(self.inp.dtype))
        if not static and layer not in self.decide_at:
            return
        states = self.inp.index_select(0, cells)  # [r, N, H]
        pick = self.read.index_select(0, which)  # [r, 4]: each row's controller's read layers
        x = states.gather(1, pick[:, :, None].expand(-1, -1, states.shape[2])).reshape(r, -1)  # [r, 4H]
        outs = torch.stack([controller_outputs(x, self.w1[c], self.b1[c], self.w2[c], self.b2[c])
                            for c in range(self.slots)])  # [C, r, 1 + N]
        out = outs.gather(0, which[None, :, None].expand(1, -1, outs.shape[2]))[0]  # [r, 1 + N]: own slot's
        now = (pick[:, -1] == layer)[:, None]  # [r, 1]: rows whose controller decides at this layer
        old_gain, old_score = regs.layer_gain.index_select(0, cells), regs.ctrl_score.index_select(0, cells)
        regs.layer_gain.index_copy_(0, cells, torch.where(now, layer_gains(out), old_gain))
        regs.ctrl_score.index_copy_(0, cells, torch.where(now[:, 0], out[:, 0], old_score))


class ControllerSlots:
    """Host-side slot assignment by content key, with counts of the requests in flight holding each slot."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slot: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recently used first
        self._refs: dict[str, int] = {}

    def acquire(self, key: str) -> tuple[int, bool] | None:
        """``(slot, load)`` for ``key`` (``load``: its weights must be copied in first), or None when
        every slot is held by requests in flight."""
        if key in self._slot:
            self._slot.move_to_end(key)
            self._refs[key] = self._refs.get(key, 0) + 1
            return self._slot[key], False
        used = set(self._slot.values())
        free = [s for s in range(self.capacity) if s not in used]
        if not free:
            idle = next((k for k in self._slot if not self._refs.get(k)), None)
            if idle is None:
                return None
            free = [self._slot.pop(idle)]
            self._refs.pop(idle, None)
        self._slot[key] = free[0]
        self._refs[key] = 1
        return free[0], True

    def release(self, key: str) -> None:
        if self._refs.get(key, 0) > 0:
            self._refs[key] -= 1

    def forget(self, key: str) -> None:
        """Drop ``key``'s slot (its load failed): the next request for it loads it again."""
        self._slot.pop(key, None)
        self._refs.pop(key, None)
