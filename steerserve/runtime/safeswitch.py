"""SafeSwitch (Han et al. 2502.01042): the probes and the refusal head, as the runtime uses them.

- A *probe* is ``Linear(H, 64) - ReLU - Linear(64, 2)`` on the **post-final-norm** hidden state (the state
  the output head reads); ``p = softmax(.)[1]`` is the probability of the positive class. Stage 1 (intent)
  reads the last prompt token (positive = a harmful request); stage 2 (compliance) reads the state after
  ``PILOT_TOKENS`` greedy pilot tokens (positive = the pilot continuation complies with a harmful request).
  A request is *unsafe* when both fire (``p >= threshold``); stage 2 runs only when stage 1 fired.
- The *refusal head* replaces the output head for a flagged request: the model's own head (tied to the
  embeddings on the default model) plus a trained low-rank delta, ``logits = h W^T + (h A^T) B^T`` with
  ``A [r, H]``, ``B [V, r]``. The paper fine-tunes a full untied copy (28M parameters here); a rank-``r``
  delta of the same copy is what ships (a full copy is ~110 MB per artifact), trained the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

PILOT_TOKENS = 3
PROBE_WIDTH = 64


@dataclass(frozen=True, eq=False)
class Probe:
    """``w1 [64, H]``, ``b1 [64]``, ``w2 [2, 64]``, ``b2 [2]`` (fp32, CPU)."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def __post_init__(self) -> None:
        d, h = self.w1.shape
        if self.b1.shape != (d,) or self.w2.shape != (2, d) or self.b2.shape != (2,):
            raise ValueError("probe shapes disagree: w1 [D, H], b1 [D], w2 [2, D], b2 [2]")


def _key(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True, eq=False)
class ProbePair:
    """Stage 1 (intent) and stage 2 (compliance) probes of one ``probe`` artifact."""

    stage1: Probe
    stage2: Probe

    @property
    def key(self) -> str:
        """Content hash: requests naming the same probes share one slot on the device."""
        return _key(*(getattr(p, n) for p in (self.stage1, self.stage2) for n in ("w1", "b1", "w2", "b2")))


def probe_prob(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``x [R, H]`` post-final-norm states -> ``[R]`` probability of the positive class. The trainer and the
    device op both call this (same arithmetic)."""
    logits = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1, b1)), w2, b2)  # [R, 2]
    return torch.softmax(logits, dim=-1)[:, 1]


@dataclass(frozen=True, eq=False)
class HeadDelta:
    """The refusal head's low-rank delta on the model's output head: ``a [r, H]``, ``b [V, r]`` (fp32, CPU)."""

    a: torch.Tensor
    b: torch.Tensor

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError("head delta shapes disagree: a [r, H], b [V, r]")

    @property
    def key(self) -> str:
        """Content hash: requests naming the same head share one slot on the device."""
        return _key(self.a, self.b)


def head_logits(h: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h [R, H]`` post-final-norm states -> ``[R, V]`` refusal-head logits: ``h base^T + (h a^T) b^T``."""
    return torch.nn.functional.linear(h, base) + torch.nn.functional.linear(torch.nn.functional.linear(h, a), b)


@dataclass(frozen=True, eq=False)
class SafeSwitchSpec:
    """What a request's ``safeswitch`` intervention asks: its probes, the head a flagged request switches
    to, and the probability both stages must reach."""

    probes: ProbePair
    head: HeadDelta
    threshold: float
