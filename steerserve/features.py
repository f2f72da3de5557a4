"""Reading a SAE dictionary's features off the serving engine (``POST /features``).

The states come from the engine itself (a capture request; ``Engine.hidden_states``) at the dictionary's
layer and are encoded on the host with the whole dictionary (``store.sae.Sae.encode``). With steering, the
tokens (the prompt and the steered reply) are read twice: under the request's open-loop ops, at their
absolute positions (what the steered model computed at each token; the capture reads the stream after the
layer's own steering), and unsteered, so each listed feature says what the steering moved it from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from steerserve.engines.base import Engine
from steerserve.errors import SteerError
from steerserve.runtime.plan import SteerOp
from steerserve.spec import ResolvedSpec
from steerserve.store.sae import Sae


def open_loop_ops(resolved: ResolvedSpec, field: str = "steering") -> tuple[SteerOp, ...]:
    """``resolved``'s ops if a forward pass can replay them; a 400 naming ``field`` for a closed loop, a
    controller or SafeSwitch, whose effect depends on what was decided during generation."""
    if resolved.loop is not None or resolved.controller is not None or resolved.safeswitch is not None \
            or any(op.gain for op in resolved.ops):
        raise SteerError("features are read under open-loop steering only (add, ablate, actadd, sae_feature, ...); "
                         "a closed loop, a controller or SafeSwitch decides during generation", field=field)
    return resolved.ops


async def read_features(engine: Engine, sae: Sae, tokens: Sequence[int], prompt_len: int, top_k: int,
                        decode: Callable[[list[int]], str], ops: Sequence[SteerOp] = ()) -> list[dict[str, Any]]:
    """Per token of ``tokens``: ``{"position", "token", "reply", "features": [{"id", "activation",
    ["unsteered"], ["label"]}]}``, at most ``top_k`` features above 0, the most active first (under ``ops``
    when given; ``unsteered`` then gives the same feature's activation without them)."""
    layer = [sae.layer]
    states = (await engine.hidden_states([tokens], layer, ops))[0][:, 0, :]  # [T, H]
    acts = sae.encode(states)  # [T, d_sae]
    base = None
    if ops:
        base = sae.encode((await engine.hidden_states([tokens], layer))[0][:, 0, :])  # [T, d_sae]
    top = acts.topk(min(top_k, sae.d_sae), dim=-1)
    out = []
    for pos, (tok, values, ids) in enumerate(zip(tokens, top.values.tolist(), top.indices.tolist(), strict=True)):
        found = []
        for v, i in zip(values, ids, strict=True):
            if v <= 0:
                continue
            item: dict[str, Any] = {"id": i, "activation": round(v, 6)}
            if base is not None:
                item["unsteered"] = round(float(base[pos, i]), 6)
            if i in sae.labels:
                item["label"] = sae.labels[i]
            found.append(item)
        out.append({"position": pos, "token": decode([tok]), "reply": pos >= prompt_len, "features": found})
    return out

