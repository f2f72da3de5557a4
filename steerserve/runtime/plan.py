"""Primitive steering ops: what methods compile a resolved spec into, and what engines lay out per step.

An op says: at decoder-layer output ``layer``, for every token whose absolute position ``p`` falls in
``[start, stop)``, either add ``scale * v`` or ablate direction ``v`` (``h -= scale * (h . v) v``).
``v`` is one row of ``vector.data`` (``[n, hidden]``): row 0 for a constant vector, row ``p - start``
for a positional one (ActAdd injects a different vector at each front position). A ``clamp`` op sets a
sparse-autoencoder feature to ``scale`` on each token it covers (``ops.clamp_delta``): its vector has three rows,
the feature's encoder direction, its decoder direction and ``[offset, threshold, 0, ...]``. A ``gain`` op's scale
is further multiplied, on the device, by its request's gain register (``runtime.loop``): 1 for
open-loop ops, so their results are bit-identical whatever else runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum

import torch

CLAMP_ROWS = 3  # a clamp op's vector: encoder row, decoder row, [offset, threshold, 0...]


class OpKind(str, Enum):
    ADD = "add"
    ABLATE = "ablate"
    CLAMP = "clamp"  # SAE feature clamp: rows (encoder, decoder, [offset, threshold]); scale = the target
    ROUTE = "route"  # MoE expert mask at decoder layer ``layer``'s router: the vector is a mask row (``route_op``)


@dataclass(frozen=True, eq=False)
class VectorRef:
    """Immutable vector content, keyed by its hash so that identical vectors share bank rows."""

    key: str
    data: torch.Tensor  # [n, hidden], float32, CPU

    @classmethod
    def of(cls, data: torch.Tensor) -> VectorRef:
        data = data.detach().to(dtype=torch.float32, device="cpu").contiguous()
        if data.dim() == 1:
            data = data.unsqueeze(0)
        digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()
        return cls(key=f"{tuple(data.shape)}:{digest}", data=data)

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])


@dataclass(frozen=True)
class SteerOp:
    kind: OpKind
    layer: int
    vector: VectorRef
    scale: float
    start: int = 0  # first absolute token position covered
    stop: int | None = None  # exclusive; None = through the end of generation
    positional: bool = False  # token p reads vector row p - start (else row 0)
    gain: bool = False  # closed loop: the scale is multiplied by the request's gain register (else by 1)

    def __post_init__(self) -> None:
        if self.kind is OpKind.CLAMP and (self.vector.rows != CLAMP_ROWS or self.positional or self.gain):
            raise ValueError(f"a clamp op reads {CLAMP_ROWS} rows (encoder, decoder, offset/threshold), not positional")
        # A positional op must never read past its vector's rows (they would be another vector's).
        if self.positional and (self.stop is None or self.stop - self.start > self.vector.rows):
            raise ValueError(f"positional op over [{self.start}, {self.stop}) needs <= {self.vector.rows} positions")

    def covers(self, lo: int, hi: int) -> tuple[int, int] | None:
        """The sub-range of positions ``[lo, hi)`` this op covers, or None."""
        a = max(lo, self.start)
        b = hi if self.stop is None else min(hi, self.stop)
        return (a, b) if a < b else None
