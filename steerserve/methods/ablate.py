"""``ablate``: directional ablation. ``h -= (h . r) r`` with unit ``r``, at every position of the chosen layers.

The stored vector is normalised per layer before it enters the bank, so the op sees a unit direction.
A vector with a single layer is used as the direction for every ablated layer (the refusal-direction
recipe); a multi-layer vector supplies its own direction per layer. A ``direction`` artifact
(``store.directions``) is ablated at **every** layer unless ``layers`` says otherwise, as the refusal-direction
paper does (its own layer is only where it was read).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from steerserve.errors import SteerError
from steerserve.methods.base import Compiled, check_keys, layer_list, string
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.spec import PromptInfo, ResolveContext
from steerserve.store.artifacts import STEERING_KINDS


class Ablate:
    name = "ablate"

    async def compile(
        self, params: Mapping[str, Any], prompt: PromptInfo, ctx: ResolveContext, where: str
    ) -> Compiled:
        check_keys(params, ("vector", "layers"), where)
        stored = ctx.store.load_vector(string(params, "vector", where), field=f"{where}.vector", kinds=STEERING_KINDS)
        layers = layer_list(params.get("layers", "all"), ctx, f"{where}.layers", default=tuple(sorted(stored.tensors)))
        single = len(stored.tensors) == 1
        ops = []
        for layer in layers:
            if single:
                v = next(iter(stored.tensors.values()))
            elif layer in stored.tensors:
                v = stored.tensors[layer]
            else:
                raise SteerError(
                    f"vector {stored.meta.ref()!r} has no direction for layer {layer}", field=f"{where}.layers"
                )
            norm = float(v.norm())
            if not math.isfinite(norm) or norm < 1e-12:  # a zero direction has no unit vector: never divide
                raise SteerError(f"vector {stored.meta.ref()!r} has a zero or non-finite direction at layer {layer}",
                                 field=f"{where}.vector")
            ops.append(SteerOp(OpKind.ABLATE, layer, VectorRef.of(v / norm), 1.0))
        return Compiled(tuple(ops), (stored.meta.ref(),), {"layers": list(layers)})
