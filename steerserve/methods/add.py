"""``add``: vector addition (CAA-style). ``h_l[t] += coeff * v_l`` at the chosen layers and positions.

Positions are absolute token positions of the whole templated sequence (chat template included):
- ``"all"``: every prompt token and every generated token;
- ``"prompt"``: prompt tokens ``0 .. P-1`` only (the last one's state produces the first new token);
- ``"generated"``: tokens at positions ``>= P``, i.e. each generated token once it is fed back. The first
  generated token is therefore unaffected; the steering acts from the second one on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerserve.errors import SteerError
from steerserve.methods.base import Compiled, check_keys, coeff, layer_list, string
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.spec import PromptInfo, ResolveContext

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
        stored = ctx.store.load_vector(string(params, "vector", where), field=f"{where}.vector")
        layers = layer_list(params.get("layers"), ctx, f"{where}.layers", default=tuple(sorted(stored.tensors)))
        missing = [layer for layer in layers if layer not in stored.tensors]
        if missing:
            raise SteerError(
                f"vector {stored.meta.ref()!r} has no entry for layer(s) {missing}; it has {sorted(stored.tensors)}",
                field=f"{where}.layers",
            )
        start, stop = position_window(params.get("positions", "all"), len(prompt.token_ids), f"{where}.positions")
        ops = tuple(
            SteerOp(OpKind.ADD, layer, VectorRef.of(stored.tensors[layer]), c, start, stop) for layer in layers
        )
        return Compiled(ops, (stored.meta.ref(),), {"layers": list(layers), "coeff": c,
                                                     "positions": params.get("positions", "all")})
