"""The steering op applied at each decoder-layer output. Pure tensor code: no host sync, no Python per
request, no data-dependent shapes. The same function runs in the hf engine and inside vLLM's graph.

Shapes: ``h [T, H]`` (all tokens of the step, flattened), ``bank [R, H]`` (row 0 all zeros),
``add_rows/add_scales [T, Ka]``, ``abl_rows/abl_scales [T, Kb]``. Unsteered tokens read row 0 with
scale 0 in every slot, which leaves ``h`` unchanged: ``h - (0 * p) * 0 == h`` and ``h + 0 * 0 == h``.

The engines call ``steer_guarded_``: a token whose steered residual stream is non-finite, or so large
that the next RMSNorm's sum of squares overflows (it would turn into NaN one layer later, inside vLLM's
kernels, and from there into the KV cache), keeps its unsteered value and is marked in ``bad [T]``; the
engine then fails that token's request alone. Non-finite values never leave the op.
"""

from __future__ import annotations

import torch

# Why a request whose steering the op refused is ended (both engines say the same; the API answers 400).
NON_FINITE = ("its steering made the residual stream non-finite (it would overflow float32): lower the "
              "coefficient or check the vector's norms")
NON_FINITE_CODE = "steering_non_finite"


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


def clamp_delta(x: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What sets each clamped SAE feature to its target: ``x [T, H]`` the stream, ``rows, targets [T, Kc]``
    (a clamp op's first bank row, 0 where a slot is unused; the target activation) -> ``[T, H]``.

    Per slot: ``pre = enc . x + offset`` (``offset = b_enc[i] - enc . b_dec`` for an encoder that reads
    ``x - b_dec``), the feature's activation ``a = pre if pre > threshold else 0`` (ReLU: threshold 0;
    JumpReLU: its own; TopK: read as ReLU, the top-k cut needs the whole dictionary), and the addition
    ``(target - a) * dec``: what makes the SAE read ``target`` while its reconstruction error is kept.
    Every slot reads the stream as the layer produced it. An unused slot gives exactly 0 (a ``where`` on
    ``rows > 0``), so unclamped tokens stay bit-identical. Fixed shapes, no host sync.
    """
    xf = x.float()
    delta = torch.zeros_like(xf)  # [T, H]
    for k in range(rows.shape[1]):
        first = rows[:, k]  # [T]
        enc, dec = bank.index_select(0, first).float(), bank.index_select(0, first + 1).float()  # [T, H]
        prm = bank.index_select(0, first + 2)[:, :2].float()  # [T, 2]: offset, threshold
        pre = (xf * enc).sum(dim=-1) + prm[:, 0]  # [T]
        act = torch.where(pre > prm[:, 1], pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        coef = torch.where(first > 0, targets[:, k].float() - act, torch.zeros((), dtype=pre.dtype,
                                                                               device=pre.device))
        delta.add_(dec.mul_(coef[:, None]))
    return delta.to(x.dtype)


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


# A per-step addition is refused beyond this norm per layer: any finite vector within it, added at every
# layer of even a very deep model to a finite stream, keeps the stream's sum of squares finite in fp32
# (1e3 layers x 1e16 = 1e19 < sqrt(3.4e38)). Vetted uploads at the coefficient cap stay below 1e7.
MAX_DELTA_NORM = 1e16


def vetted_delta(bank: torch.Tensor, rows: torch.Tensor, scales: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``add_delta`` for all layers of a step at once (``rows, scales [L, T, K]`` -> ``[L, T, H]``), with
    every token whose addition at any layer is non-finite or over ``MAX_DELTA_NORM`` set to exactly 0
    (unsteered) and OR-ed into ``bad [T]``. One check per step, so the per-layer op can just add it."""
    delta = add_delta(bank, rows, scales)  # [L, T, H]
    ok = (delta.square().sum(dim=-1) <= MAX_DELTA_NORM**2).all(dim=0)  # [T]; NaN compares False
    bad.logical_or_(~ok)
    return torch.where(ok[None, :, None], delta, torch.zeros((), dtype=delta.dtype))


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``[T, H] -> [T]`` bool: the row's sum of squares is finite in fp32 (what an RMSNorm computes)."""
    return torch.isfinite(x.float().square().sum(dim=-1))


def keep_finite_(h: torch.Tensor, new: torch.Tensor, stream: torch.Tensor, bad: torch.Tensor) -> None:
    """``h = new`` for the tokens whose steered ``stream [T, H]`` passes ``finite_rows``; the others keep
    ``h`` and are OR-ed into ``bad [T]``. Fixed shapes, no host sync (a ``torch.where``)."""
    ok = finite_rows(stream)  # [T]
    bad.logical_or_(~ok)
    h.copy_(torch.where(ok.unsqueeze(-1), new, h))


def steer_guarded_(
    h: torch.Tensor,
    bank: torch.Tensor,
    add_rows: torch.Tensor,
    add_scales: torch.Tensor,
    abl_rows: torch.Tensor,
    abl_scales: torch.Tensor,
    bad: torch.Tensor,
    delta: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    clamp: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """``steer_`` on the residual stream ``h (+ residual)``, writing into ``h``, keeping the old value of
    any token whose steered stream would not be finite, and OR-ing those tokens into ``bad [T]`` (bool).

    ``residual [T, H]``: vLLM's layers return the stream split in two (``h + residual``); additions go to
    ``h`` alone (bit-exact ``h + delta``), ablations project the sum. Fixed shapes, no host sync: a
    ``torch.where`` per call, so it is valid under graph capture. Tokens that pass are bit-identical to
    ``steer_``'s result (unsteered tokens: to ``h``).

    ``delta``: this layer's slice of a ``vetted_delta`` (already checked for the whole step); with no
    ablation or clamp to do, it is simply added. ``clamp``: the layer's clamp ``(rows, targets)`` ``[T, Kc]``
    (``clamp_delta``, read from the stream before this layer's other ops), added with the additions.
    """
    if delta is not None and not abl_rows.shape[1] and clamp is None:
        h.add_(delta)
        return
    x0 = h if residual is None else h + residual  # [T, H] the stream: projections and clamps read the sum
    clamped = None if clamp is None else clamp_delta(x0, bank, *clamp)
    if abl_rows.shape[1]:
        x = x0.clone()
        steer_(x, bank, add_rows, add_scales, abl_rows, abl_scales, delta)
        if clamped is not None:
            x.add_(clamped)
        new = x if residual is None else h + (x - x0)
        stream = x
    else:
        if delta is None and add_rows.shape[1]:
            delta = add_delta(bank, add_rows, add_scales)
        total = clamped if delta is None else delta if clamped is None else delta + clamped
        new = h if total is None else h + total  # [T, H]
        stream = new if residual is None else new + residual
    keep_finite_(h, new, stream, bad)
