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

from steerserve.runtime.loop import MAX_OPTIONS, LoopSpec

_LN2 = math.log(2.0)
# The scalar registers (rows of ``Registers.file``) and their neutral values. The first ``_WRITTEN`` are
# the ones ``entropy_step_`` moves, in this order; ``gate`` is 0 for a full-vocabulary loop (every step
# is a decision: any mass >= 0).
_ROWS = {"gain": 1.0, "integral": 0.0, "entropy": 0.0, "entropy_sum": 0.0, "steps": 0.0,
         "target": math.nan, "initial": 0.0, "kp": 0.0, "ki": 0.0, "low": 1.0, "high": 1.0, "i_low": 0.0,
         "i_high": 0.0, "gate": 0.0}
_WRITTEN = 5


class Registers:
    """``gain``, ``target``, ``entropy`` and the PI state, one cell per slot (``[S + 2]`` each); the per-layer
    gains ``layer_gain [S + 2, N]`` and the controller scale ``ctrl_score [S + 2]`` that a refusal controller's
    read op writes (``runtime.controller``)."""

    def __init__(self, slots: int, num_layers: int = 1, device: torch.device | str = "cpu") -> None:
        if slots < 1:
            raise ValueError("the register file needs at least one slot")
        self.slots = slots
        self.sink = slots + 1
        n = slots + 2

        def full(value: float) -> torch.Tensor:
            return torch.full((n,), value, dtype=torch.float32, device=device)

        # The loop's scalar registers are rows of one file ``[len(_ROWS), S + 2]`` (each name below is a
        # contiguous row view of it), so the sampler-side op gathers them all with one ``index_select``
        # and writes back the ones it moves (the first ``_WRITTEN`` rows) with one ``index_copy_``.
        neutral = torch.tensor(list(_ROWS.values()), dtype=torch.float32)[:, None]  # [rows, 1]
        self.file = neutral.expand(-1, n).contiguous().to(device)
        (self.gain,  # multiplies the scale of the slot's gain ops; cell 0 stays exactly 1
         self.integral,  # sum of errors (bits), clamped to [i_low, i_high]
         self.entropy,  # bits, of the last next-token distribution the sampler saw
         self.entropy_sum, self.steps,  # what a finished request's report says
         self.target,  # bits; NaN = no loop on this cell
         self.initial, self.kp, self.ki, self.low, self.high, self.i_low, self.i_high,
         self.gate) = self.file.unbind(0)  # in _ROWS order
        # Choice loops: the option token ids of each cell ([S + 2, K], padded) and which are real.
        self.option_ids = torch.zeros((n, MAX_OPTIONS), dtype=torch.int64, device=device)
        self.option_on = torch.zeros((n, MAX_OPTIONS), dtype=torch.bool, device=device)
        # A gain op at layer l is scaled by gain[cell] * layer_gain[cell, l]. 1 everywhere except in a
        # controlled request's cell, which starts at 0 (no patch before its controller has decided) and
        # takes s * w_l at its last prompt token; x * 1.0 == x, so other requests stay bit-identical.
        self.layer_gain = torch.ones((n, num_layers), dtype=torch.float32, device=device)
        self.ctrl_score = full(math.nan)  # the controller's s (NaN: not controlled, or not decided yet)
        # SafeSwitch: each stage's probe probability (NaN until that stage's probe has read its token).
        self.probe = torch.full((n, 2), math.nan, dtype=torch.float32, device=device)
        self._free = list(range(slots - 1, -1, -1))  # host-side free list of slots

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)

    def open(self, loop: LoopSpec | None, controlled: bool = False) -> int | None:
        """Take a slot for a request with ``loop`` (None: gain 1, no loop) and/or a controller; returns its
        cell, or None when every slot is taken."""
        if not self._free:
            return None
        cell = self._free.pop() + 1
        self.layer_gain[cell] = 0.0 if controlled else 1.0
        self.ctrl_score[cell] = math.nan
        self.probe[cell] = math.nan
        if loop is None:
            return cell  # gain 1, target NaN: the cell's neutral values, as ``close`` left them
        # Integral bounds: the integral term alone can reach but not pass the gain bounds (no wind-up).
        i_low = (loop.low - loop.initial) / loop.ki if loop.ki > 0 else 0.0
        i_high = (loop.high - loop.initial) / loop.ki if loop.ki > 0 else 0.0
        values = {"gain": loop.initial, "target": loop.target, "entropy": 0.0, "integral": 0.0,
                  "initial": loop.initial, "kp": loop.kp, "ki": loop.ki, "low": loop.low, "high": loop.high,
                  "i_low": i_low, "i_high": i_high, "entropy_sum": 0.0, "steps": 0.0}
        values["gate"] = loop.gate if loop.options else 0.0
        for name, value in values.items():
            getattr(self, name)[cell] = value  # one small write per register, at admission only
        k = len(loop.options)
        self.option_ids[cell] = 0
        self.option_ids[cell, :k] = torch.tensor(loop.options, dtype=torch.int64)
        self.option_on[cell] = torch.arange(MAX_OPTIONS) < k
        return cell

    def report(self, cell: int) -> dict[str, float | None]:
        """What the request's response reports: mean measured entropy, steps, final gain, and the
        controller's scale if it has one (a host read, between steps)."""
        score = float(self.ctrl_score[cell])
        ctrl: dict[str, float | None] = {} if math.isnan(score) else {"controller_scale": score}
        for stage, p in enumerate(self.probe[cell].tolist()):
            if not math.isnan(p):
                ctrl[f"probe_stage{stage + 1}"] = p
        if math.isnan(float(self.target[cell])):
            return ctrl
        steps = float(self.steps[cell])
        return {**ctrl, "mean_entropy_bits": float(self.entropy_sum[cell]) / steps if steps else None,
                "loop_steps": steps, "final_gain": float(self.gain[cell]),
                "target_entropy_bits": float(self.target[cell])}

    def close(self, cell: int) -> None:
        """Free the slot; its cells go back to neutral (a later holder starts clean in ``open``)."""
        self.gain[cell] = 1.0
        self.target[cell] = math.nan
        self.layer_gain[cell] = 1.0
        self.ctrl_score[cell] = math.nan
        self._free.append(cell - 1)


def _bits(p: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` probabilities -> ``[B]`` entropy in bits (p = 0 contributes 0); for a few options."""
    return torch.special.entr(p).sum(dim=-1) / _LN2


def _softmax_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, V]`` logits -> (``[B, V]`` ``softmax(logits)`` fp32, ``[B]`` its entropy in bits).

    ``H = log S - sum_i p_i s_i`` (nats) with ``s = z - max z`` and ``S = sum_i exp(s_i)``: one softmax and
    one dot product, no log per element (``entr`` took a log of each of the ``V`` probabilities: 3/4 of the
    cost). Both terms are >= 0, so nothing cancels: exact to fp32 rounding. ``log S`` is read off the
    softmax itself: at the maximum ``s = 0``, so ``p = exp(0) / S = 1 / S``. Two ``[B, V]`` temporaries
    (``s``, ``p``; the product reuses ``s``): on CPU, fresh large buffers cost page faults. Fixed shapes,
    no host sync.
    """
    z = logits.float()
    s = z - z.amax(dim=-1, keepdim=True)  # [B, V], <= 0 (NaN only for a row that is all -inf)
    # A masked token (logit -inf, e.g. a grammar's bitmask) gets p = 0; a finite s keeps its p * s at 0, not NaN.
    s.clamp_min_(torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1)  # [B, V]
    h = -torch.log(p.amax(dim=-1)) - s.mul_(p).sum(dim=-1)  # [B] nats (s is p * s from here on)
    return p, h / _LN2


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` entropy in bits of ``softmax(logits)`` (fp32)."""
    return _softmax_entropy(logits)[1]


def option_entropy(logits: torch.Tensor, ids: torch.Tensor, on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Choice entropy and option mass: ``logits [B, V]``, option ``ids [B, K]`` int64 with ``on [B, K]`` marking
    the real ones -> (``[B]`` entropy in bits of ``softmax(logits)`` renormalised over the options,
    ``[B]`` the options' total probability). A row without options gets its full-vocabulary entropy and
    mass 0. The scorer (``evaluation``) uses this same function, so the host and the device agree."""
    p, full_h = _softmax_entropy(logits)  # [B, V], [B]: one pass over the vocabulary
    po = p.gather(1, ids) * on  # [B, K]: the options' probabilities (0 for padding)
    mass = po.sum(dim=-1)  # [B]
    has = on.any(dim=-1)  # [B]
    q = po / mass.clamp_min(torch.finfo(po.dtype).tiny)[:, None]  # renormalised over the options
    choice_h = _bits(q)
    return torch.where(has, choice_h, full_h), mass


def entropy_step_(regs: Registers, logits: torch.Tensor, cells: torch.Tensor) -> None:
    """The sampler-side op: measure each row's entropy and move its gain toward its target.

    ``logits [B, V]`` (the rows the sampler samples from), ``cells [B]`` int64 (the row's slot cell, or the
    sink; a cell other than the sink appears at most once). ``H`` is the next-token entropy, or with
    options the choice entropy (``option_entropy``), and a step counts only if it is a *decision*: the
    options' mass >= the cell's gate (gate 0 without options).
    For a cell with a target, at a decision: ``e = target - H``, ``I = clamp(I + e, i_low, i_high)``,
    ``gain = clamp(initial + kp * e + ki * I, low, high)``; otherwise the cell keeps its gain and integral.
    Fixed shapes, no host sync: runs inside a step, and its result scales the request's ops from the next
    step on. One gather of the register file and one scatter back, whatever the batch.
    """
    r = regs
    h, mass = option_entropy(logits, r.option_ids.index_select(0, cells), r.option_on.index_select(0, cells))
    old = r.file.index_select(1, cells)  # [rows, B]: every scalar register of every row's cell
    gain, integral, _, entropy_sum, steps, target, initial, kp, ki, low, high, i_low, i_high, gate = old.unbind(0)
    decide = torch.isfinite(target) & (mass >= gate)  # [B]
    err = target - h
    integral = torch.minimum(torch.maximum(integral + err, i_low), i_high)
    gain = torch.minimum(torch.maximum(initial + kp * err + ki * integral, low), high)
    moved = torch.stack([gain, integral, h, entropy_sum + h, steps + 1.0])  # [_WRITTEN, B], in _ROWS order
    r.file[:_WRITTEN].index_copy_(1, cells, torch.where(decide, moved, old[:_WRITTEN]))
