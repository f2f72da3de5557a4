"""``expert_mask`` (MoTE): chosen experts of an MoE model turned off, or forced on, at the router, for every
token of the request (prompt and generated).

``{"method": "expert_mask", "experts": NAME | {"LAYER": [ids]}, "mode": "mask" | "zero", "force": NAME |
{"LAYER": [ids]}}``: ``experts`` names an ``expert_set`` artifact (``steerserve extract ftri``) or lists
expert ids per MoE layer (JSON keys are strings); ``force`` likewise; at least one of the two.

- ``"mode": "mask"`` (default): disabled experts are never selected; the next expert takes the slot;
- ``"mode": "zero"``: selection as usual; disabled experts' weights are set to 0 and the others rescaled to
  the same top-k mass (if all k are disabled the routed output is 0; Qwen2-MoE's shared expert still runs);
- ``force``: the experts are always selected and keep their own (masked-softmax) weight: force changes
  the selection only, it does not inflate the weight.

The method compiles to ``Pick``s (``Compiled.route``); ``resolve`` merges every ``expert_mask`` of the
request into one ROUTE op per layer (``methods.routing``). 400s naming the field: the method on a dense
model (``method``), a layer that is not an MoE layer (``experts.<L>``), an id out of range or repeated
(``experts.<L>[i]``), and the per-layer limits of ``routing.check``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerserve.errors import SteerError
from steerserve.methods.base import Compiled, check_keys
from steerserve.methods.routing import How, Pick, check
from steerserve.model_info import MoEInfo
from steerserve.spec import PromptInfo, ResolveContext

MODES = ("mask", "zero")


class ExpertMask:
    name = "expert_mask"

    async def compile(
        self, params: Mapping[str, Any], prompt: PromptInfo, ctx: ResolveContext, where: str
    ) -> Compiled:
        check_keys(params, ("experts", "mode", "force"), where)
        moe = ctx.model.moe
        if moe is None:
            raise SteerError(f"expert_mask needs a mixture-of-experts model; the loaded model {ctx.model.name!r} "
                             f"({ctx.model.architecture}) is dense", field=f"{where}.method")
        if moe.unmaskable:
            raise SteerError(f"expert_mask is not served on {ctx.model.architecture} as configured: "
                             f"{moe.unmaskable}", field=f"{where}.method")
        mode = params.get("mode", "mask")
        if mode not in MODES:
            raise SteerError(f"must be one of {list(MODES)}, got {mode!r}", field=f"{where}.mode")
        if params.get("experts") is None and params.get("force") is None:
            raise SteerError("give 'experts' (to disable) or 'force' (or both)", field=f"{where}.experts")
        picks: list[Pick] = []
        artifacts: list[str] = []
        detail: dict[str, Any] = {"mode": mode}
        keys: tuple[tuple[str, How], ...] = (("experts", "off" if mode == "mask" else "drop"), ("force", "force"))
        for key, how in keys:
            value = params.get(key)
            if value is None:
                continue
            by_layer, ref = _experts(value, moe, ctx, f"{where}.{key}")
            if ref is not None:
                artifacts.append(ref)
            detail[key] = {str(layer): list(ids) for layer, ids in sorted(by_layer.items())}
            picks += [Pick(layer, e, how, f"{where}.{key}.{layer}") for layer, ids in sorted(by_layer.items())
                      for e in ids]
        check(picks, moe)
        return Compiled((), tuple(artifacts), detail, route=tuple(picks))


def _experts(value: Any, moe: MoEInfo, ctx: ResolveContext, f: str) -> tuple[dict[int, tuple[int, ...]], str | None]:
    """``{layer: ids}`` from an expert-set name or a ``{"LAYER": [ids]}`` object, and the artifact's ref."""
    if isinstance(value, str):
        if not value.strip():
            raise SteerError("must be a non-empty expert-set name or an object {\"LAYER\": [ids]}", field=f)
        meta, expert_set = ctx.store.load_expert_set(value, field=f)
        return dict(expert_set.experts), meta.ref()
    if not isinstance(value, Mapping) or not value:
        raise SteerError("must be an expert-set name or a non-empty object {\"LAYER\": [expert ids]}", field=f)
    out: dict[int, tuple[int, ...]] = {}
    for key, ids in value.items():
        lf = f"{f}.{key}"
        text = str(key)
        if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0"):
            raise SteerError(f"{key!r} is not a layer index", field=lf)
        layer = int(text)
        if layer not in moe.layers:
            where = "out of range" if layer >= ctx.model.num_layers else "a dense layer (no router)"
            raise SteerError(f"layer {layer} is {where}; the model's MoE layers are {list(moe.layers)}", field=lf)
        if not isinstance(ids, list) or not ids:
            raise SteerError("must be a non-empty list of expert ids", field=lf)
        for i, e in enumerate(ids):
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < moe.num_experts:
                raise SteerError(f"expert id {e!r} is not in [0, {moe.num_experts})", field=f"{lf}[{i}]")
            if e in ids[:i]:
                raise SteerError(f"expert {e} is listed twice", field=f"{lf}[{i}]")
        out[layer] = tuple(ids)
    return out, None


__all__ = ["MODES", "ExpertMask"]
