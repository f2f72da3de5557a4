"""Closed-loop steering: what a request asks of its device registers.

A request whose spec has a closed-loop method (``entropic`` with ``target_entropy``) carries one
``LoopSpec``. The engine gives it a register slot for its lifetime; every step the sampler-side op
(``registers.entropy_step_``) measures the entropy of the request's next-token distribution and moves the
request's ``gain`` toward the target with a bounded proportional-integral rule; the ``gain`` ops of the
request (``SteerOp.gain``) are scaled by it from the next step on. Nothing here is read by the host
inside a step.

With ``options`` (a few one-token answers, e.g. " A" and " B") the loop controls the *choice* entropy:
the entropy of the next-token distribution renormalised over the options, measured only at *decision
steps*, those where the options hold at least ``gate`` of the probability. Other steps (the words
between decisions) neither move the gain nor count in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_OPTIONS = 8  # option tokens a loop may measure over (a fixed register width)


@dataclass(frozen=True)
class LoopSpec:
    """Drive the request's gain so that its next-token entropy (bits) tracks ``target``.

    The gain starts at ``initial`` and stays in ``[low, high]``. ``kp``/``ki`` are per bit of error: the
    gain after step ``t`` is ``clip(initial + kp * e_t + ki * sum_{s<=t} e_s, low, high)`` with
    ``e = target - entropy``; the integral is clamped so that it alone cannot push past the bounds
    (no wind-up). Positive gain raises the entropy for a vector that raises it (EAST), negative lowers it.
    """

    target: float  # bits
    initial: float = 0.0
    low: float = -1.0
    high: float = 1.0
    kp: float = 0.5
    ki: float = 0.25
    options: tuple[int, ...] = ()  # token ids; () = the full vocabulary at every step
    gate: float = 0.5  # with options: a step is a decision when they hold at least this probability

    def __post_init__(self) -> None:
        values = (self.target, self.initial, self.low, self.high, self.kp, self.ki, self.gate)
        if not all(math.isfinite(v) for v in values):
            raise ValueError("loop parameters must be finite")
        if not self.low <= self.initial <= self.high:
            raise ValueError("the initial gain must lie in [low, high]")
        if len(self.options) > MAX_OPTIONS or len(set(self.options)) != len(self.options):
            raise ValueError(f"at most {MAX_OPTIONS} distinct option tokens")
        if not 0.0 < self.gate <= 1.0:
            raise ValueError("the gate is a probability in (0, 1]")
