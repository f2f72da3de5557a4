"""``actadd`` (Turner et al., Activation Addition).

``h_l[a+i] += coeff * (h_l(p+)[i] - h_l(p-)[i])`` for ``i < n``: the positional difference of the two
prompts' residual streams at layer ``l``, added at the front of the user's text.

- The pair's activations are taken on the bare pair texts (no chat template, no special tokens), from
  position 0, on the unsteered model. The shorter prompt is padded at the end with space tokens, as the
  paper does, so both have ``n`` tokens.
- ``a`` is the first token of the user's content: after the chat-template prefix (system turn and
  ``<|im_start|>user\\n`` for the default model) for chat requests, 0 for raw completions prompts.
- The injection is clipped to the prompt: positions past the end of the prompt are not steered.
- The difference vector is cached by content (model fingerprint, layer, both token lists).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from steerserve.errors import SteerError
from steerserve.methods.base import Compiled, check_keys, coeff, layer_index
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.spec import PromptInfo, ResolveContext

MAX_PAIR_TOKENS = 64


async def pair_vector(pos: str, neg: str, layer: int, ctx: ResolveContext, where: str) -> VectorRef:
    """The ``[n, hidden]`` positional difference for a prompt pair, computed once per content."""
    ids_p, ids_n = ctx.tokenize(pos), ctx.tokenize(neg)
    for key, ids in (("positive", ids_p), ("negative", ids_n)):
        if not ids:
            raise SteerError("tokenizes to nothing", field=f"{where}.{key}")
        if len(ids) > MAX_PAIR_TOKENS:
            raise SteerError(f"is {len(ids)} tokens long; the limit is {MAX_PAIR_TOKENS}", field=f"{where}.{key}")
    space = ctx.tokenize(" ")[-1]
    n = max(len(ids_p), len(ids_n))
    ids_p = ids_p + [space] * (n - len(ids_p))
    ids_n = ids_n + [space] * (n - len(ids_n))
    key = hashlib.sha256(repr((ctx.model.fingerprint, layer, ids_p, ids_n)).encode()).hexdigest()
    cached = ctx.cache.get(f"actadd:{key}")
    if isinstance(cached, VectorRef):
        return cached
    hp, hn = await ctx.hidden_states([ids_p, ids_n], [layer])  # each [n, 1, hidden]
    ref = VectorRef.of(hp[:, 0] - hn[:, 0])
    ctx.cache[f"actadd:{key}"] = ref
    return ref


class ActAdd:
    name = "actadd"

    async def compile(
        self, params: Mapping[str, Any], prompt: PromptInfo, ctx: ResolveContext, where: str
    ) -> Compiled:
        check_keys(params, ("positive", "negative", "pair", "layer", "coeff"), where)
        artifacts: tuple[str, ...] = ()
        if "pair" in params:
            if "positive" in params or "negative" in params:
                raise SteerError("give either 'pair' or 'positive'/'negative', not both", field=f"{where}.pair")
            if not isinstance(params["pair"], str):
                raise SteerError("must be a stored pair name", field=f"{where}.pair")
            stored = ctx.store.load_pair(params["pair"], field=f"{where}.pair")
            pos, neg, layer_default, coeff_default = stored.positive, stored.negative, stored.layer, stored.coeff
            artifacts = (stored.meta.ref(),)
        else:
            texts = []
            for key in ("positive", "negative"):
                text = params.get(key)
                if not isinstance(text, str) or not text.strip():
                    raise SteerError("is required (or name a stored 'pair') and must be a non-blank string",
                                     field=f"{where}.{key}")
                texts.append(text)
            (pos, neg), layer_default, coeff_default = texts, None, None
        raw_layer = params.get("layer", layer_default)
        if raw_layer is None:
            raise SteerError("is required", field=f"{where}.layer")
        layer = layer_index(raw_layer, ctx, f"{where}.layer")
        c = coeff(params, ctx, where, default=coeff_default)
        vec = await pair_vector(pos, neg, layer, ctx, where)
        start = prompt.user_start
        stop = min(start + vec.rows, len(prompt.token_ids))
        ops = (SteerOp(OpKind.ADD, layer, vec, c, start, stop, positional=True),) if start < stop else ()
        detail = {"layer": layer, "coeff": c, "front": [start, stop], "pair_tokens": vec.rows}
        return Compiled(ops, artifacts, detail)
