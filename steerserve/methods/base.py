"""What a steering method is, and the small parameter checks every method shares."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from steerserve.errors import SteerError
from steerserve.methods.routing import Pick
from steerserve.runtime.controller import ControllerWeights
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.plan import SteerOp
from steerserve.runtime.safeswitch import SafeSwitchSpec
from steerserve.spec import PromptInfo, ResolveContext
from steerserve.store.artifacts import StoredVector


@dataclass(frozen=True)
class Compiled:
    """One intervention compiled to runtime ops, plus what to report back to the client."""

    ops: tuple[SteerOp, ...]
    artifacts: tuple[str, ...] = ()
    detail: Mapping[str, Any] = field(default_factory=dict)
    loop: LoopSpec | None = None  # closed loop on the request's gain register (its ``gain`` ops)
    controller: ControllerWeights | None = None  # read op deciding the request's per-layer gains
    safeswitch: SafeSwitchSpec | None = None  # probes at the head point; a refusal head if they fire
    route: tuple[Pick, ...] = ()  # expert_mask: merged over the request into one ROUTE op per layer (``routing``)


class Method(Protocol):
    """A steering method: validates its parameters and compiles them to primitive ops."""

    name: str

    async def compile(
        self, params: Mapping[str, Any], prompt: PromptInfo, ctx: ResolveContext, where: str
    ) -> Compiled: ...


def check_keys(params: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise SteerError(f"unknown parameter(s) {unknown}; allowed: {sorted(allowed)}", field=where)


def coeff(params: Mapping[str, Any], ctx: ResolveContext, where: str, key: str = "coeff",
          default: float | None = None) -> float:
    """A finite coefficient within the server's cap (``Settings.max_coeff``)."""
    value = params.get(key, default)
    f = f"{where}.{key}"
    if value is None:
        raise SteerError("is required", field=f)
    return coeff_value(value, ctx.settings.max_coeff, f)


def coeff_value(value: Any, cap: float, f: str) -> float:
    """``value`` as a float if it is a finite number with ``|value| <= cap``; else a 400 naming ``f``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SteerError(f"must be a number, got {type(value).__name__}", field=f)
    if not math.isfinite(value):
        raise SteerError("must be finite", field=f)
    if abs(value) > cap:
        raise SteerError(f"|{value}| exceeds the server's limit of {cap}", field=f)
    return float(value)


def layer_index(value: Any, ctx: ResolveContext, f: str) -> int:
    n = ctx.model.num_layers
    if isinstance(value, bool) or not isinstance(value, int):
        raise SteerError(f"must be an integer layer index, got {value!r}", field=f)
    if not 0 <= value < n:
        raise SteerError(f"layer {value} is out of range [0, {n - 1}] for this model", field=f)
    return value


def layer_list(value: Any, ctx: ResolveContext, f: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """``"all"`` | list of ints | None (= ``default``), each checked against the model's depth."""
    if value is None:
        return default
    if value == "all":
        return tuple(range(ctx.model.num_layers))
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SteerError("must be \"all\", a layer index or a non-empty list of layer indices", field=f)
    out = tuple(layer_index(v, ctx, f"{f}.{i}") for i, v in enumerate(value))
    if len(set(out)) != len(out):
        raise SteerError("lists a layer twice", field=f)
    return out


def string(params: Mapping[str, Any], key: str, where: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SteerError("is required and must be a non-empty string", field=f"{where}.{key}")
    return value


def one_token_ids(tokenize: Callable[[str], list[int]], options: Sequence[Any], f: str) -> tuple[int, ...]:
    """The token id of each option (answer choices): each must be a non-empty string that is exactly one token,
    a different one from the others; else a 400 naming ``f[i]``. Shared by ``entropic``'s ``options``, the
    evaluation's ``--options`` and the EAST extractor, so all three read choices the same way."""
    ids: list[int] = []
    for i, option in enumerate(options):
        if not isinstance(option, str) or not option:
            raise SteerError("must be a non-empty string", field=f"{f}[{i}]")
        toks = tokenize(option)
        if len(toks) != 1:
            raise SteerError(f"{option!r} is {len(toks)} tokens for this model; an option must be exactly one "
                             "(mind the leading space)", field=f"{f}[{i}]")
        if toks[0] in ids:
            raise SteerError(f"{option!r} repeats an earlier option's token", field=f"{f}[{i}]")
        ids.append(toks[0])
    return tuple(ids)


def vector_layer(stored: StoredVector, params: Mapping[str, Any], ctx: ResolveContext, where: str) -> int:
    """The layer a one-layer method steers: ``params["layer"]`` (which the vector must have), or the
    vector's only layer. Methods that add one vector at one layer (``entropic``, ``cot_compress``) share it."""
    have = sorted(stored.tensors)
    if "layer" in params:
        layer = layer_index(params["layer"], ctx, f"{where}.layer")
        if layer not in stored.tensors:
            raise SteerError(f"vector {stored.meta.ref()!r} has no entry for layer {layer}; it has {have}",
                             field=f"{where}.layer")
        return layer
    if len(have) == 1:
        return have[0]
    raise SteerError(f"vector {stored.meta.ref()!r} has {len(have)} layers; choose one with 'layer'",
                     field=f"{where}.layer")
