"""The router point as both engines run it: this step's mask rows from the ``ROUTE`` table, the masked routing
written over the router's own result, and a capture of the routing for tests and tools.

Per MoE layer and step, ``route_rows`` gathers each token's mask row (``route_op``'s encoding) from the
vector bank through ``StepTables.rows[ROUTE]`` (slot 0: the method merges a request's masks into one op per
layer). Tokens without a ROUTE op read bank row 0, which is all zeros, so ``route_op.merge`` keeps the
router's stock result for them bit for bit. A step with no ROUTE op at all returns None before any tensor
work: unmasked steps cost one dictionary read per MoE layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from steerserve.runtime.capture import Read
from steerserve.runtime.plan import OpKind
from steerserve.runtime.route_op import masked_routing, merge
from steerserve.runtime.tables import StepTables


def route_rows(tables: StepTables, bank: torch.Tensor, layer: int, num_tokens: int,
               num_experts: int) -> torch.Tensor | None:
    """``[n, 2E]`` mask rows of the step's first ``n = min(num_tokens, tables.num_tokens)`` tokens at decoder
    layer ``layer``, or None when no request of this step has a ROUTE op (on any layer)."""
    if not tables.width[OpKind.ROUTE]:
        return None
    n = min(num_tokens, tables.num_tokens)
    rows = tables.rows[OpKind.ROUTE][layer, :n, 0]  # [n] bank rows (0: the all-zero row)
    return bank.index_select(0, rows)[:, : 2 * num_experts]


def route_(weights: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor,
           renormalize: bool) -> None:
    """In place on the router's result ``weights, ids [T, k]``: the masked routing (from ``logits [T, E]``)
    for the first ``len(rows)`` tokens whose row is non-zero; every other token keeps its values."""
    n = rows.shape[0]
    if n == 0:
        return
    w, i = weights[:n], ids[:n]
    ours = masked_routing(logits[:n], rows.float(), weights.shape[1], renormalize)
    mw, mi = merge(rows, ours, (w, i))
    w.copy_(mw)
    i.copy_(mi)


class RouteCapture:
    """Each request's routing per MoE layer and position, after masking: ``(ids, weights)`` sorted by expert id
    (vLLM's top-k is unsorted, transformers' is sorted by weight: sorting makes the engines comparable).

    The engine says which requests own which tokens of the step (``begin``, ``capture.Read`` segments), the
    router point records each MoE layer's result (``record``), the test or tool takes a request's (``take``).
    Host-side and synchronous: for tests and offline tools, never on by default.
    """

    def __init__(self, limit: int = 256) -> None:
        self.on = False
        self.limit = limit
        self._step: list[Read] = []
        self._data: dict[str, dict[int, dict[int, tuple[list[int], list[float]]]]] = {}

    def begin(self, reads: Sequence[Read]) -> None:
        self._step = list(reads)

    def record(self, layer: int, weights: torch.Tensor, ids: torch.Tensor) -> None:
        """``weights, ids [T, k]``: this step's routing at decoder layer ``layer``."""
        if not self._step:
            return
        order = ids.argsort(dim=-1)
        ids_l = ids.gather(1, order).tolist()
        w_l = weights.float().gather(1, order).tolist()
        for r in self._step:
            per = self._data.setdefault(r.request, {}).setdefault(layer, {})
            for t in range(r.count):
                if r.offset + t < len(ids_l):
                    per[r.first + t] = (ids_l[r.offset + t], w_l[r.offset + t])
        while len(self._data) > self.limit:
            del self._data[next(iter(self._data))]

    def requests(self) -> list[str]:
        """Requests with recorded routing."""
        return list(self._data)

    def take(self, request: str) -> dict[str, Any] | None:
        """``{"ids": {layer: [[e, ...] per position]}, "weights": {layer: [[w, ...]]}}``, then forgotten."""
        data = self._data.pop(request, None)
        if data is None:
            return None
        return {"ids": {layer: [per[p][0] for p in sorted(per)] for layer, per in data.items()},
                "weights": {layer: [per[p][1] for p in sorted(per)] for layer, per in data.items()}}
