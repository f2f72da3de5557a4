"""``sae_feature``: steering by a sparse autoencoder's features (``store.sae``).

``{"method": "sae_feature", "sae": NAME, "features": {"1234": 4.0, "77": -2.0}, "mode": "add"|"clamp",
"positions": "all"}``, at the dictionary's layer, on the positions ``add`` takes (``all``, ``prompt``,
``generated``):

- ``add``: ``h[t] += sum_i s_i * W_dec[i]``. A strength is in the feature's own activation units: adding
  ``s * W_dec[i]`` is what raising the feature's activation by ``s`` adds to the SAE's reconstruction. One
  feature is one ``ADD`` op with its decoder row (bit-identical to ``add`` of that row at coefficient ``s``);
  several are summed into one row, so any number of them takes one table slot.
- ``clamp``: the feature reads ``s`` on every covered token: per token, on the device, the feature's
  activation ``a`` from its encoder row (offset and threshold included) and ``h[t] += (s - a) * W_dec[i]``
  (``runtime.ops.clamp_delta``), what replacing the activation in the reconstruction does while the SAE's
  error term is kept. One ``CLAMP`` op per feature, so at most the server's ``max_interventions`` of them;
  each reads the stream as the layer produced it. A TopK dictionary's feature is read as ReLU of its
  pre-activation (whether it made the top k needs the whole dictionary).

Strengths and targets are capped like every coefficient (``max_coeff``, and a policy's cap for
``sae_feature``, naming ``features.<i>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from steerserve.errors import SteerError
from steerserve.methods.add import position_window
from steerserve.methods.base import Compiled, check_keys, string
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.spec import PromptInfo, ResolveContext
from steerserve.store.sae import feature_strengths

MODES = ("add", "clamp")


class SaeFeature:
    name = "sae_feature"

    async def compile(
        self, params: Mapping[str, Any], prompt: PromptInfo, ctx: ResolveContext, where: str
    ) -> Compiled:
        check_keys(params, ("sae", "features", "mode", "positions"), where)
        mode = params.get("mode", "add")
        if mode not in MODES:
            raise SteerError(f"must be one of {list(MODES)}, got {mode!r}", field=f"{where}.mode")
        sae = ctx.store.open_sae(string(params, "sae", where), field=f"{where}.sae")
        strengths = feature_strengths(params.get("features"), sae.d_sae, ctx.settings.max_coeff, f"{where}.features")
        ids = sorted(strengths)
        start, stop = position_window(params.get("positions", "all"), len(prompt.token_ids), f"{where}.positions")
        if mode == "clamp":
            slots = ctx.settings.max_interventions  # a clamp op per feature: one table slot each at the layer
            if len(ids) > slots:
                raise SteerError(f"clamp sets at most {slots} features at once on this server, got {len(ids)}",
                                 field=f"{where}.features")
            rows = sae.clamp_rows(ids)  # [n, 3, H]: encoder, decoder, offset/threshold
            ops = tuple(SteerOp(OpKind.CLAMP, sae.layer, VectorRef.of(rows[j]), strengths[i], start, stop)
                        for j, i in enumerate(ids))
        else:
            dec = sae.rows(ids)  # [n, H]: the named rows only
            if len(ids) == 1:
                vec, scale = dec[0], strengths[ids[0]]
            else:
                vec, scale = (dec * torch.tensor([strengths[i] for i in ids])[:, None]).sum(dim=0), 1.0
            ops = (SteerOp(OpKind.ADD, sae.layer, VectorRef.of(vec), scale, start, stop),)
        detail = {"layer": sae.layer, "mode": mode, "features": {str(i): strengths[i] for i in ids},
                  "positions": params.get("positions", "all")}
        return Compiled(ops, (sae.meta.ref(),), detail)
