"""The router point (MoTE expert masking): per-token changes to an MoE layer's expert choice, from mask rows.

A request's mask for one MoE layer is one row of the vector bank (``[H]``, so bank sharing, pinning, the
front end's admission and the vLLM wire carry it unchanged), read through the ``ROUTE`` table like any op:

    row[e]     = -1  expert e is off in "mask" mode (never selected; the next expert takes the slot)
               = +1  expert e is forced (always selected; it keeps its own, masked-softmax weight)
               =  0  untouched
    row[E + e] =  1  expert e is dropped in "zero" mode (selected as usual, weight 0, the rest rescaled
                     so that the top-k mass is unchanged: 1 for renormalising routers)
    row[2E:]   =  0  (needs ``2 E <= H``)

``masked_routing`` gives the routing of the masked tokens from the router logits; ``merge`` keeps the
engine's own (stock) result for every token whose row is all zero, so unmasked tokens are bit-identical
to no masking whatever the engine's formula. Both engines call these two functions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

FORCE_MARGIN = 2.0  # added to a forced expert's probability (<= 1) for the selection: it always wins


def encode_row(hidden: int, num_experts: int, off: Iterable[int] = (), drop: Iterable[int] = (),
               forced: Iterable[int] = ()) -> torch.Tensor:
    """``[hidden]`` fp32 mask row (see the module docstring); the caller has validated the ids."""
    e = num_experts
    if 2 * e > hidden:
        raise ValueError(f"a mask row needs 2 x {e} experts <= hidden size {hidden}")
    row = torch.zeros(hidden, dtype=torch.float32)
    for i in off:
        row[i] = -1.0
    for i in forced:
        row[i] = 1.0
    for i in drop:
        row[e + i] = 1.0
    return row


def masked_routing(logits: torch.Tensor, rows: torch.Tensor, top_k: int,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [T, E]``, ``rows [T, >= 2E]`` -> ``(weights [T, k] fp32, ids [T, k] int64)`` of the masked
    routing (an all-zero row gives the plain softmax-top-k routing)."""
    e = logits.shape[-1]
    off, forced, drop = rows[:, :e] < 0, rows[:, :e] > 0, rows[:, e : 2 * e] > 0
    probs = torch.softmax(logits.float().masked_fill(off, float("-inf")), dim=-1)  # off experts leave the sum
    score = (probs + FORCE_MARGIN * forced).masked_fill(off, float("-inf"))
    ids = torch.topk(score, top_k, dim=-1).indices
    w = probs.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    # "zero": dropped slots get 0 and the survivors are scaled to the same top-k mass, without a host branch
    # (with nothing dropped, ``mass / left`` is exactly 1: the same sum of the same values); all dropped -> 0.
    kept = w.masked_fill(drop.gather(1, ids), 0.0)
    mass, left = w.sum(dim=-1, keepdim=True), kept.sum(dim=-1, keepdim=True)
    w = kept * (mass / left.clamp_min(torch.finfo(w.dtype).tiny))
    return w, ids


def merge(rows: torch.Tensor, ours: tuple[torch.Tensor, torch.Tensor],
          stock: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the masked routing where its row is non-zero, else the engine's own (bit for bit)."""
    active = (rows != 0).any(dim=-1, keepdim=True)  # [T, 1]
    (w, ids), (sw, sids) = ours, stock
    return torch.where(active, w.to(sw.dtype), sw), torch.where(active, ids.to(sids.dtype), sids)
