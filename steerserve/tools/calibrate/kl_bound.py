"""The KL-bounded steering strength (ASC's ``gamma_max``): directional derivatives of the logits by JVPs.

For a unit direction ``u`` added at layer ``l`` (the output of decoder block ``l``) at the last position,
``f(t) = logits(h_l + t u)`` at that position. ``f'(0) = J u`` and ``f''(0) = H[u, u]`` come from one
nested forward-mode pass (``torch.func.jvp`` of a ``jvp``) through blocks ``l+1 .. N-1``, the final norm
and the head; nothing is differentiated w.r.t. the weights. The prompt's prefix runs once with a KV cache
(it does not depend on ``t``: the shift is at the last position only), so each evaluation of ``f`` is a
one-token step for the whole batch of states (left-padded).

Forward-mode AD needs every op to have a forward derivative: SDPA has none on CPU (so the model must use
eager attention) and ``silu``'s own derivative has none (so, for the nested pass only, SiLU runs as
``x * sigmoid(x)``, the same function).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import jvp

from steerserve.runtime.hooks import _hidden, _replace


def solve_gamma(a: float, curvature: float, eps: float) -> tuple[float, float]:
    """``(gamma_raw, gamma_max)`` for ``a = ||J u||`` and ``L = ||H[u, u]||`` (METHODS.md, CoT compression).

    ``gamma_raw = (a / L) x`` with ``x > 0`` solving ``x^3 + x^2 = 4 eps L^2 / a^4`` is the exact positive
    root of ``a^2 g^2 / 4 + a L g^3 / 4 = eps``; ``gamma_max = max(0, (1 - L gamma_raw / (4 a)) gamma_raw)``
    shrinks it by ``1 - x / 4``. Both tend to ``2 sqrt(eps) / a`` as ``L -> 0``.
    """
    if not (a > 0 and eps > 0 and curvature >= 0):
        raise ValueError(f"need a > 0, eps > 0, L >= 0; got a={a}, eps={eps}, L={curvature}")
    if curvature == 0:
        g = 2 * math.sqrt(eps) / a
        return g, g
    c = 4 * eps * curvature**2 / a**4
    x = min(math.sqrt(c), c ** (1 / 3))  # f(x) = x^3 + x^2 - c >= 0 here: Newton from the right, monotone
    for _ in range(200):
        step = (x**3 + x**2 - c) / (3 * x**2 + 2 * x)
        x -= step
        if abs(step) <= 1e-16 * x:
            break
    raw = a / curvature * x
    return raw, max(0.0, (1 - curvature * raw / (4 * a)) * raw)


class _SiLU(nn.Module):
    """SiLU written with ``sigmoid``, whose derivatives have forward-mode formulas at every order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


@contextlib.contextmanager
def twice_differentiable(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Swap each block's SiLU for ``_SiLU`` for the nested JVP, and put the originals back."""
    saved = []
    for block in layers:
        mlp = getattr(block, "mlp", None)
        act = getattr(mlp, "act_fn", None)
        if act is not None and type(act).__name__ in ("SiLU", "SiLUActivation"):
            saved.append((mlp, act))
            setattr(mlp, "act_fn", _SiLU())  # noqa: B010  (mlp is untyped here)
    try:
        yield
    finally:
        for mlp, act in saved:
            setattr(mlp, "act_fn", act)  # noqa: B010


@dataclass(frozen=True)
class States:
    """A batch of prompts, left-padded, with their prefixes (all but the last token) already in a cache."""

    last: torch.Tensor  # [B, 1] each prompt's last token
    mask: torch.Tensor  # [B, S] 1 = real token
    positions: torch.Tensor  # [B, 1] the last token's position (0-based, padding not counted)
    cache: Any  # the prefix's KV cache; copied for each evaluation, never written


def prepare_states(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int) -> States:
    """Run the prefixes of ``prompts`` once (eager attention, left padding, true positions)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])  # [B, S]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]: each prompt counts from 0 at its first real token
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], use_cache=True)
    return States(ids[:, -1:], mask, pos[:, -1:], out.past_key_values)


def shifted_logits(model: nn.Module, layers: Sequence[nn.Module], states: States, layer: int,
                   u: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t -> [B, vocab]`` logits of the last tokens with ``t * u`` added to layer ``layer``'s output there."""

    def f(t: torch.Tensor) -> torch.Tensor:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return _replace(output, _hidden(output) + t * u)  # [B, 1, H]: only the last tokens run here

        handle = layers[layer].register_forward_hook(hook)
        try:
            out = model(input_ids=states.last, attention_mask=states.mask, position_ids=states.positions,
                        past_key_values=copy.deepcopy(states.cache), use_cache=True)
        finally:
            handle.remove()
        return out.logits[:, -1].float()

    return f


def derivatives(f: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(f(0), f'(0), f''(0))`` of ``f: scalar -> [B, V]`` by one nested forward-mode pass."""
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    with torch.no_grad():
        # the outer pass differentiates the inner (f, f') pair: primals (f, f'), tangents (f', f'')
        out = jvp(lambda t: jvp(f, (t,), (one,)), (zero,), (one,))
    primals, tangents = out[0], out[1]
    return primals[0], primals[1], tangents[1]


def kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row, in nats, of two ``[B, V]`` logit tensors."""
    lp, lq = torch.log_softmax(logits_p.double(), -1), torch.log_softmax(logits_q.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)
