"""The steering op applied at each decoder-layer output. Pure tensor code: no host sync, no Python per
request, no data-dependent shapes. The same function runs in the hf engine and inside vLLM's graph.

Shapes: ``h [T, H]`` (all tokens of the step, flattened), ``bank [R, H]`` (row 0 all zeros),
``add_rows/add_scales [T, Ka]``, ``abl_rows/abl_scales [T, Kb]``. Unsteered tokens read row 0 with
scale 0 in every slot, which leaves ``h`` unchanged: ``h - (0 * p) * 0 == h`` and ``h + 0 * 0 == h``.
"""

from __future__ import annotations

import torch


def add_delta(bank: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``sum_k scales[..., k] * bank[rows[..., k]]``: ``rows, scales [..., K]`` -> ``[..., H]``.

    The slots are summed first and added to ``h`` once: so ``v`` and ``-v`` in two slots cancel exactly,
    and coefficient 0 adds exactly 0, leaving ``h`` bit-identical. Works on one layer's ``[T, K]`` or on
    all layers' ``[L, T, K]`` at once (same arithmetic, element for element).
    """
    shape = (*rows.shape[:-1], bank.shape[1])
    delta = bank.index_select(0, rows[..., 0].reshape(-1)).view(shape).mul_(scales[..., 0:1])
    for k in range(1, rows.shape[-1]):
        delta.add_(bank.index_select(0, rows[..., k].reshape(-1)).view(shape).mul_(scales[..., k : k + 1]))
    return delta


def steer_(
    h: torch.Tensor,
    bank: torch.Tensor,
    add_rows: torch.Tensor,
    add_scales: torch.Tensor,
    abl_rows: torch.Tensor,
    abl_scales: torch.Tensor,
    delta: torch.Tensor | None = None,
) -> None:
    """In place: ablate, ``h -= s_k (h . r_k) r_k`` per ablation slot, then add ``add_delta(...)``.

    Ka, Kb are small fixed table widths (unrolled at trace time). ``delta [T, H]``: the addition, if
    the caller computed it already for all layers of the step at once (``StepTables.delta``).
    """
    for k in range(abl_rows.shape[1]):
        r = bank.index_select(0, abl_rows[:, k])  # [T, H] unit directions (zeros where unused)
        proj = (h * r).sum(dim=-1, keepdim=True)  # [T, 1]
        h.sub_((abl_scales[:, k : k + 1] * proj) * r)
    if delta is not None:
        h.add_(delta)
    elif add_rows.shape[1]:
        h.add_(add_delta(bank, add_rows, add_scales))


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
