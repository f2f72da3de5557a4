"""The steering op applied at each decoder-layer output. Pure tensor code: no host sync, no Python per
request, no data-dependent shapes. The same function runs in the hf engine and inside vLLM's graph.

Shapes: ``h [T, H]`` (all tokens of the step, flattened), ``bank [R, H]`` (row 0 all zeros),
``add_rows/add_scales [T, Ka]``, ``abl_rows/abl_scales [T, Kb]``. Unsteered tokens read row 0 with
scale 0 in every slot, which leaves ``h`` unchanged: ``h - (0 * p) * 0 == h`` and ``h + 0 * 0 == h``.
"""

from __future__ import annotations

import torch


def steer_(
    h: torch.Tensor,
    bank: torch.Tensor,
    add_rows: torch.Tensor,
    add_scales: torch.Tensor,
    abl_rows: torch.Tensor,
    abl_scales: torch.Tensor,
) -> None:
    """In place: ablate, ``h -= s_k (h . r_k) r_k`` per ablation slot, then add, ``h += c_k v_k`` per slot.

    Ka, Kb are small fixed table widths (unrolled at trace time); a slot costs a row gather
    (``index_select``), a scale and an in-place update.
    """
    for k in range(abl_rows.shape[1]):
        r = bank.index_select(0, abl_rows[:, k])  # [T, H] unit directions (zeros where unused)
        proj = (h * r).sum(dim=-1, keepdim=True)  # [T, 1]
        h.sub_((abl_scales[:, k : k + 1] * proj) * r)
    if add_rows.shape[1]:
        # The slots are summed first, then added once: so v and -v in two slots cancel exactly (0), and
        # coefficient 0 adds exactly 0, leaving h bit-identical.
        delta = bank.index_select(0, add_rows[:, 0]).mul_(add_scales[:, 0:1])  # [T, H] c_0 v_0
        for k in range(1, add_rows.shape[1]):
            delta.add_(bank.index_select(0, add_rows[:, k]).mul_(add_scales[:, k : k + 1]))
        h.add_(delta)


def steer(
    h: torch.Tensor,
    bank: torch.Tensor,
    add_rows: torch.Tensor,
    add_scales: torch.Tensor,
    abl_rows: torch.Tensor,
    abl_scales: torch.Tensor,
) -> torch.Tensor:
    """``steer_`` on a copy: returns the steered ``h``, leaves the argument as it is."""
    out = h.clone()
    steer_(out, bank, add_rows, add_scales, abl_rows, abl_scales)
    return out
