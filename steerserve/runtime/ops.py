"""The steering op applied at each decoder-layer output. Pure tensor code: no host sync, no Python per
request, no data-dependent shapes. The same function runs in the hf engine and inside vLLM's graph.

Shapes: ``h [T, H]`` (all tokens of the step, flattened), ``bank [R, H]`` (row 0 all zeros),
``add_rows/add_scales [T, Ka]``, ``abl_rows/abl_scales [T, Kb]``. Unsteered tokens read row 0 with
scale 0 in every slot, which leaves ``h`` bit-identical: ``h - 0 * x * 0 == h`` and ``h + 0 == h``.
"""

from __future__ import annotations

import torch


def steer(
    h: torch.Tensor,
    bank: torch.Tensor,
    add_rows: torch.Tensor,
    add_scales: torch.Tensor,
    abl_rows: torch.Tensor,
    abl_scales: torch.Tensor,
) -> torch.Tensor:
    """Ablate then add: ``h -= s_k (h . r_k) r_k`` for each ablation slot, then ``h += sum_k c_k v_k``."""
    for k in range(abl_rows.shape[1]):  # Kb is a fixed, small table width: unrolled at trace time
        r = bank[abl_rows[:, k]]  # [T, H] unit directions (zeros where unused)
        proj = (h * r).sum(dim=-1, keepdim=True)  # [T, 1]
        h = h - (abl_scales[:, k : k + 1] * proj) * r
    if add_rows.shape[1]:
        delta = (add_scales.unsqueeze(-1) * bank[add_rows]).sum(dim=1)  # [T, Ka, H] -> [T, H]
        h = h + delta
    return h
