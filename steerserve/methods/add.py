"""``add``: vector addition (CAA-style). ``h_l[t] += coeff * v_l`` at the chosen layers and positions.

Positions are absolute token positions of the whole templated sequence (chat template included):
- ``"all"``: every prompt token and every generated token;
- ``"prompt"``: prompt tokens ``0 .. P-1`` only (the last one's state produces the first new token);
- ``"generated"``: tokens at positions ``>= P``, i.e. each generated token once it is fed back. The first
  generated token is therefore unaffected; the steering acts from the second one on.

``vector`` may name a ``direction`` (``store.directions``): a unit vector chosen at one layer. Then
``layers`` defaults to that layer and may name no other (a 400 on ``layers``), and the added vector is
``coeff x scale x unit``, ``scale`` being the layer's mean residual norm recorded in the direction: ``coeff``
is in units of a typical state's length there (the response reports ``scale``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from steerserve.errors import SteerError
from steerserve.methods.base import Compiled, check_keys, coeff, layer_list, string
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.spec import PromptInfo, ResolveContext
from steerserve.store.artifacts import STEERING_KINDS, StoredVector

POSITIONS = ("all", "prompt", "generated")


def position_window(value: Any, prompt_len: int, f: str) -> tuple[int, int | None]:
    """``[start, stop)`` absolute positions for a ``positions`` rule."""
    if value == "all":
        return 0, None
    if value == "prompt":
        return 0, prompt_len
    if value == "generated":
        return prompt_len, None
    raise SteerError(f"must be one of {list(POSITIONS)}, got {value!r}", field=f)


class Add:
    name = "add"

    async def compile(
        self, params: Mapping[str, Any], prompt: PromptInfo, ctx: ResolveContext, where: str
    ) -> Compiled:
        check_keys(params, ("vector", "layers", "coeff", "positions"), where)
        c = coeff(params, ctx, where)
        stored = ctx.store.load_vector(string(params, "vector", where), field=f"{where}.vector", kinds=STEERING_KINDS)
        layers = layer_list(params.get("layers"), ctx, f"{where}.layers", default=tuple(sorted(stored.tensors)))
        missing = [layer for layer in layers if layer not in stored.tensors]
        if missing:
            what = "direction was chosen at (and only applies to)" if stored.is_direction else "vector has entries for"
            raise SteerError(f"layer(s) {missing} not available: {stored.meta.kind} {stored.meta.ref()!r} has no entry "
                             f"for them; the {what} {sorted(stored.tensors)}", field=f"{where}.layers")
        vectors = _scaled(stored)
        start, stop = position_window(params.get("positions", "all"), len(prompt.token_ids), f"{where}.positions")
        ops = tuple(SteerOp(OpKind.ADD, layer, VectorRef.of(vectors[layer]), c, start, stop) for layer in layers)
        detail = {"layers": list(layers), "coeff": c, "positions": params.get("positions", "all")}
        if stored.is_direction:
            detail["scale"] = stored.scale()
        return Compiled(ops, (stored.meta.ref(),), detail)


def _scaled(stored: StoredVector) -> dict[int, torch.Tensor]:
    """The vectors ``coeff`` multiplies: a vector's own, a direction's unit vector x its ``scale``."""
    if not stored.is_direction:
        return dict(stored.tensors)
    return {layer: u * stored.scale() for layer, u in stored.tensors.items()}
