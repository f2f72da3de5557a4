"""``sae_feature``: steering by a sparse autoencoder's features (``store.sae``).

``{"method": "sae_feature", "sae": NAME, "features": {"1234": 4.0, "77": -2.0}, "mode": "add",
"positions": "all"}``: at the dictionary's layer, for each feature ``i`` with strength ``s``,
``h[t] += s * W_dec[i]`` at the positions ``add`` takes (``all``, ``prompt``, ``generated``). A strength is
in the feature's own activation units: adding ``s * W_dec[i]`` is what raising the feature's activation by
``s`` adds to the SAE's reconstruction. Each feature is one ``ADD`` op with its decoder row as the vector,
through the same bank gather as every vector; only the rows a request names are read from the file.

Strengths are capped like every coefficient (``max_coeff``, and a policy's cap for ``sae_feature``,
naming ``features.<i>``). ``mode: "clamp"`` (set a feature to a target on every token, read from the encoder
in the step) is not served yet: it is refused with a 400 naming ``mode``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerserve.errors import SteerError
from steerserve.methods.add import position_window
from steerserve.methods.base import Compiled, check_keys, string
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.spec import PromptInfo, ResolveContext
from steerserve.store.sae import feature_strengths


class SaeFeature:
    name = "sae_feature"

    async def compile(
        self, params: Mapping[str, Any], prompt: PromptInfo, ctx: ResolveContext, where: str
    ) -> Compiled:
        check_keys(params, ("sae", "features", "mode", "positions"), where)
        mode = params.get("mode", "add")
        if mode == "clamp":
            raise SteerError("clamp is not served yet; use 'add'", field=f"{where}.mode")
        if mode != "add":
            raise SteerError(f"must be 'add', got {mode!r}", field=f"{where}.mode")
        sae = ctx.store.open_sae(string(params, "sae", where), field=f"{where}.sae")
        strengths = feature_strengths(params.get("features"), sae.d_sae, ctx.settings.max_coeff, f"{where}.features")
        ids = sorted(strengths)
        rows = sae.rows(ids)  # [n, H]: the named rows only
        start, stop = position_window(params.get("positions", "all"), len(prompt.token_ids), f"{where}.positions")
        ops = tuple(SteerOp(OpKind.ADD, sae.layer, VectorRef.of(rows[j]), strengths[i], start, stop)
                    for j, i in enumerate(ids))
        detail = {"layer": sae.layer, "mode": mode, "features": {str(i): strengths[i] for i in ids},
                  "positions": params.get("positions", "all")}
        return Compiled(ops, (sae.meta.ref(),), detail)
