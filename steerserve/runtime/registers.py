"""Per-request device registers for closed-loop steering, and the sampler-side op that updates them.

Registers are indexed by *cell*: cell ``0`` is the neutral cell (gain exactly 1, no target) read by every
op and row that has no slot; cells ``1..S`` belong to request slots ``0..S-1``; cell ``S+1`` is a sink
that padded or discarded rows write into and nobody reads. So every gather and scatter has a fixed shape
and needs no mask: a step's tables just say which cell each token or row uses.

The buffers are allocated once and never resized or moved (valid under CUDA-graph capture). The host
writes a slot's cells only when a request is admitted (``open``), and reads them only after the step in
which the request finished (``report``): never to decide a step.
"""

from __future__ import annotations

import math

import torch

from steerserve.runtime.loop import LoopSpec

_LN2 = math.log(2.0)


class Registers:
    """``gain``, ``target``, ``entropy`` and the PI state, one cell per slot (``[S + 2]`` each)."""

    def __init__(self, slots: int, device: torch.device | str = "cpu") -> None:
        if slots < 1:
            raise ValueError("the register file needs at least one slot")
        self.slots = slots
        self.sink = slots + 1
        n = slots + 2

        def full(value: float) -> torch.Tensor:
            return torch.full((n,), value, dtype=torch.float32, device=device)

        self.gain = full(1.0)  # multiplies the scale of the slot's gain ops; cell 0 stays exactly 1
        self.target = full(math.nan)  # bits; NaN = no loop on this cell
        self.entropy = full(0.0)  # bits, of the last next-token distribution the sampler saw
        self.integral = full(0.0)  # sum of errors (bits), clamped to [i_low, i_high]
        self.initial, self.kp, self.ki = full(0.0), full(0.0), full(0.0)
        self.low, self.high, self.i_low, self.i_high = full(1.0), full(1.0), full(0.0), full(0.0)
        self.entropy_sum, self.steps = full(0.0), full(0.0)  # what a finished request's report says
        self._free = list(range(slots - 1, -1, -1))  # host-side free list of slots

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)

    def open(self, loop: LoopSpec) -> int | None:
        """Take a slot for a request with ``loop``; returns its cell, or None when every slot is taken."""
        if not self._free:
            return None
        cell = self._free.pop() + 1
        # Integral bounds: the integral term alone can reach but not pass the gain bounds (no wind-up).
        i_low = (loop.low - loop.initial) / loop.ki if loop.ki > 0 else 0.0
        i_high = (loop.high - loop.initial) / loop.ki if loop.ki > 0 else 0.0
        values = {"gain": loop.initial, "target": loop.target, "entropy": 0.0, "integral": 0.0,
                  "initial": loop.initial, "kp": loop.kp, "ki": loop.ki, "low": loop.low, "high": loop.high,
                  "i_low": i_low, "i_high": i_high, "entropy_sum": 0.0, "steps": 0.0}
        for name, value in values.items():
            getattr(self, name)[cell] = value  # one small write per register, at admission only
        return cell

    def report(self, cell: int) -> dict[str, float | None]:
        """What the request's response reports: mean measured entropy, steps, final gain (a host read)."""
        steps = float(self.steps[cell])
        return {"mean_entropy_bits": float(self.entropy_sum[cell]) / steps if steps else None,
                "loop_steps": steps, "final_gain": float(self.gain[cell]),
                "target_entropy_bits": float(self.target[cell])}

    def close(self, cell: int) -> None:
        """Free the slot; its cells go back to neutral (a later holder starts clean in ``open``)."""
        self.gain[cell] = 1.0
        self.target[cell] = math.nan
        self._free.append(cell - 1)


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` entropy in bits of ``softmax(logits)`` (fp32; p = 0 contributes 0)."""
    p = torch.softmax(logits.float(), dim=-1)
    return torch.special.entr(p).sum(dim=-1) / _LN2


def entropy_step_(regs: Registers, logits: torch.Tensor, cells: torch.Tensor) -> None:
    """The sampler-side op: measure each row's next-token entropy and move its gain toward its target.

    ``logits [B, V]`` (the rows the sampler samples from), ``cells [B]`` int64 (the row's slot cell, or the
    sink). For a cell with a target: ``e = target - H``, ``I = clamp(I + e, i_low, i_high)``,
    ``gain = clamp(initial + kp * e + ki * I, low, high)``; cells without a target keep their gain. Fixed
    shapes, no host sync: runs inside a step, and its result scales the request's ops from the next step on.
    """
    h = entropy_bits(logits)  # [B]
    r = regs
    target = r.target.index_select(0, cells)
    looped = torch.isfinite(target)  # [B]
    err = torch.where(looped, target - h, torch.zeros((), device=h.device))
    integral = torch.minimum(torch.maximum(r.integral.index_select(0, cells) + err, r.i_low.index_select(0, cells)),
                             r.i_high.index_select(0, cells))
    raw = r.initial.index_select(0, cells) + r.kp.index_select(0, cells) * err + r.ki.index_select(0, cells) * integral
    gain = torch.minimum(torch.maximum(raw, r.low.index_select(0, cells)), r.high.index_select(0, cells))
    gain = torch.where(looped, gain, r.gain.index_select(0, cells))
    r.gain.index_copy_(0, cells, gain)
    r.integral.index_copy_(0, cells, integral)
    r.entropy.index_copy_(0, cells, h)
    r.entropy_sum.index_add_(0, cells, h)
    r.steps.index_add_(0, cells, torch.ones_like(h))
