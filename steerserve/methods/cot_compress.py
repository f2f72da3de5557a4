"""``cot_compress``: chain-of-thought compression (ASC, Azizi et al., 2507.04742).

``h_l[t] += gamma * v`` at the last prompt token and every generated token (``t >= P - 1``), where ``v``
is a stored one-layer vector (``steerserve extract asc``: concise minus verbose answers, unnormalised)
and ``l`` its layer. ``gamma: "auto"`` uses the KL-bounded strength ``gamma_max`` that ``steerserve
calibrate`` stored in the artifact (in units of the stored vector), which must be for the same layer.

``{"method": "cot_compress", "vector": "asc", "gamma": 1.5}`` or ``{..., "gamma": "auto"}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from steerserve.errors import SteerError
from steerserve.methods.base import Compiled, check_keys, coeff_value, string, vector_layer
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.spec import PromptInfo, ResolveContext
from steerserve.store.artifacts import StoredVector


def auto_gamma(stored: StoredVector, layer: int, f: str) -> float:
    """The stored ``gamma_max`` for ``layer``; a 400 naming ``f`` if the artifact has none for it."""
    cal = stored.calibration()
    ref = stored.meta.ref()
    if cal is None:
        raise SteerError(f"vector {ref!r} is not calibrated: run `steerserve calibrate` on it, or give a number",
                         field=f)
    value = cal.get("gamma_max")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SteerError(f"vector {ref!r} has no valid calibrated gamma_max", field=f)
    if cal.get("layer") != layer:
        raise SteerError(f"vector {ref!r} is calibrated at layer {cal.get('layer')}, not {layer}", field=f)
    return float(value)


class CotCompress:
    name = "cot_compress"

    async def compile(
        self, params: Mapping[str, Any], prompt: PromptInfo, ctx: ResolveContext, where: str
    ) -> Compiled:
        check_keys(params, ("vector", "gamma", "layer"), where)
        stored = ctx.store.load_vector(string(params, "vector", where), field=f"{where}.vector")
        layer = vector_layer(stored, params, ctx, where)
        raw, f = params.get("gamma"), f"{where}.gamma"
        if raw is None:
            raise SteerError("is required (a number, or \"auto\" for the calibrated gamma_max)", field=f)
        if raw == "auto":
            gamma = coeff_value(auto_gamma(stored, layer, f), ctx.settings.max_coeff, f)
        elif isinstance(raw, str):
            raise SteerError(f"must be a number or \"auto\", got {raw!r}", field=f)
        else:
            gamma = coeff_value(raw, ctx.settings.max_coeff, f)
        start = len(prompt.token_ids) - 1  # the last prompt token decides the first generated one
        op = SteerOp(OpKind.ADD, layer, VectorRef.of(stored.tensors[layer]), gamma, start, None)
        detail = {"layer": layer, "gamma": gamma, "auto": raw == "auto", "start": start}
        return Compiled((op,), (stored.meta.ref(),), detail)
