"""``entropic``: entropic activation steering, EAST (Rahn et al., 2406.00244), open or closed loop.

``h_l[t] += beta * u`` at the last prompt token (position ``P - 1``, whose state picks the first new
token) and at every generated token, at one layer ``l``. ``u`` is a stored vector, normally made by
``steerserve extract east``, whose norm is the layer's mean residual norm: ``beta`` is then in units of
that norm (0.25 = a quarter of a typical state's length).

- Open loop: ``{"method": "entropic", "vector": NAME, "beta": x}``.
- Closed loop (ours, not in the paper): ``{"method": "entropic", "vector": NAME, "target_entropy": h}``;
  the same op scaled by ``beta_max`` and by the request's gain register in ``[-1, 1]`` (starting at
  ``initial_gain``, default 0), which the runtime moves after each sampled token so that the next-token
  entropy (bits) tracks ``h`` (``runtime.loop``; ``kp``/``ki``, the rule's gains per bit of error, default
  to ``LoopSpec``'s). With ``"options": [" A", " B"]`` (one-token answers) the
  loop tracks the *choice* entropy instead, at the steps where the options hold most of the probability:
  what an agent making repeated decisions needs (the full-vocabulary entropy of the words around the
  decisions is not what EAST moves).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from steerserve.errors import SteerError
from steerserve.methods.base import Compiled, check_keys, coeff, coeff_value, one_token_ids, string, vector_layer
from steerserve.runtime.loop import MAX_OPTIONS, LoopSpec
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.spec import PromptInfo, ResolveContext

# Closed-loop amplitude in units of the layer's mean residual norm: on the shipped vector, up to this
# beta the answers keep their format (see vectors/README.md); the gain in [-1, 1] scales it.
DEFAULT_BETA_MAX = 0.5
# kp, ki per bit of error: the gain spans [-1, 1], so at 2 one bit of error already crosses all of it; the
# bound only leaves room for small full-vocabulary errors and rejects typos.
MAX_LOOP_GAIN = 4.0


def target_bits(value: Any, vocab_size: int, f: str) -> float:
    """A target entropy in bits strictly inside ``(0, log2(vocab_size))``, the range of a next-token entropy."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SteerError(f"must be a number of bits, got {type(value).__name__}", field=f)
    top = math.log2(vocab_size)
    if not math.isfinite(value) or not 0 < value < top:
        raise SteerError(f"must be a finite number of bits in (0, {top:.2f}) for this model, got {value}", field=f)
    return float(value)


def option_tokens(value: Any, ctx: ResolveContext, f: str) -> tuple[int, ...]:
    """``options``: 2..MAX_OPTIONS distinct strings, each exactly one token of this model -> their ids."""
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_OPTIONS:
        raise SteerError(f"must be a list of 2 to {MAX_OPTIONS} one-token strings", field=f)
    return one_token_ids(ctx.tokenize, value, f)


def _loop_gain(params: Mapping[str, Any], key: str, where: str) -> float:
    """``kp``/``ki``: the loop's gain change per bit of error, in ``[0, MAX_LOOP_GAIN]`` (0 = no such term)."""
    f = f"{where}.{key}"
    value = coeff_value(params.get(key, getattr(LoopSpec, key)), MAX_LOOP_GAIN, f)
    if value < 0:
        raise SteerError(f"must be >= 0 (a negative {key} pushes away from the target), got {value}", field=f)
    return value


class Entropic:
    name = "entropic"

    async def compile(
        self, params: Mapping[str, Any], prompt: PromptInfo, ctx: ResolveContext, where: str
    ) -> Compiled:
        check_keys(params, ("vector", "beta", "target_entropy", "layer", "beta_max", "options", "initial_gain",
                            "kp", "ki"), where)
        closed = "target_entropy" in params
        if closed and "beta" in params:
            raise SteerError("give either 'beta' (open loop) or 'target_entropy' (closed loop), not both",
                             field=f"{where}.target_entropy")
        if not closed and "beta" not in params:
            raise SteerError("is required (or give 'target_entropy' for the closed loop)", field=f"{where}.beta")
        for key in ("beta_max", "options", "initial_gain", "kp", "ki"):
            if not closed and key in params:
                raise SteerError("only applies with 'target_entropy'", field=f"{where}.{key}")
        stored = ctx.store.load_vector(string(params, "vector", where), field=f"{where}.vector")
        layer = vector_layer(stored, params, ctx, where)
        vec = VectorRef.of(stored.tensors[layer])
        start = len(prompt.token_ids) - 1  # the last prompt token: its state picks the first new token
        if not closed:
            beta = coeff(params, ctx, where, key="beta")
            op = SteerOp(OpKind.ADD, layer, vec, beta, start, None)
            return Compiled((op,), (stored.meta.ref(),), {"layer": layer, "beta": beta})
        target = target_bits(params["target_entropy"], ctx.model.vocab_size, f"{where}.target_entropy")
        beta_max = coeff_value(params.get("beta_max", DEFAULT_BETA_MAX), ctx.settings.max_coeff,
                               f"{where}.beta_max")
        if beta_max <= 0:
            raise SteerError("must be positive (the gain in [-1, 1] gives the sign)", field=f"{where}.beta_max")
        options = option_tokens(params["options"], ctx, f"{where}.options") if "options" in params else ()
        if options and target >= math.log2(len(options)):
            raise SteerError(f"must be below log2({len(options)}) = {math.log2(len(options)):.2f} bits, the most "
                             f"{len(options)} options can have", field=f"{where}.target_entropy")
        initial = coeff_value(params.get("initial_gain", 0.0), 1.0, f"{where}.initial_gain")
        kp, ki = (_loop_gain(params, key, where) for key in ("kp", "ki"))
        op = SteerOp(OpKind.ADD, layer, vec, beta_max, start, None, gain=True)
        detail: dict[str, Any] = {"layer": layer, "target_entropy": target, "beta_max": beta_max,
                                  "initial_gain": initial, "kp": kp, "ki": ki}
        if options:
            detail["options"] = list(params["options"])
        return Compiled((op,), (stored.meta.ref(),), detail,
                        loop=LoopSpec(target=target, initial=initial, kp=kp, ki=ki, options=options))
