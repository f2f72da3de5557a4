"""``actadd`` (Turner et al., Activation Addition), with the pair's states taken in the request's context.

``h_l[a+i] += coeff * (h_l(c + p+)[|c|+i] - h_l(c + p-)[|c|+i])`` for ``i < n``: the positional difference
of the two prompts' residual streams at layer ``l`` (the output of decoder block ``l``), each prompt read
after the same context ``c``, added at the front ``a`` of the user's text.

- The front ``a`` is the first token of the user's content for chat requests (after the chat-template
  prefix: the system turn and ``<|im_start|>user\\n`` on the default model). For a raw completions
  prompt it is position 1: the default tokenizer adds no BOS, so the prompt's own first token plays its
  part (the attention sink) and is not steered.
- The context ``c`` is the request's own tokens before the front, so each row of the vector is the state
  the model would have at exactly the position it is added to, had the user's text begun with ``p+``
  rather than ``p-``. Why: read bare, from position 0, the first token of each prompt is the attention
  sink (norm ~800 at layers 2-8 of the default model, ~23000 at layer 12, against ~100 for an ordinary
  token), so rows were differences of two outliers. In context every row has the typical norm of its
  layer (0.7-1.0 times it, measured), so ``coeff`` reads as "multiples of an ordinary token's state" and
  no per-position rescaling is needed.
- The shorter prompt is padded at its end to ``n`` tokens with the tokenizer's newline token (the last
  token of ``"\\n"``): content-free, present in every tokenizer, and a token whose state stays at the
  typical norm. A lone space (the paper's pad) is itself an outlier on this model, ~5x the typical norm
  after ``"Love"`` even in context, and dominated the vector. Padded rows are kept: they carry the longer
  prompt's tail (``"ate"`` of ``"H"+"ate"``), and zeroing them removes most of the pair's effect.
- Rows of an opening both texts share are exactly zero (same context, same tokens): a pair framed alike
  (``"I feel wonderful and happy today!"`` / ``"I feel terrible and sad today!"``, the README's
  recommended pair, layer 3, coeff +-6) steers from the first differing word over the rest of the pair's
  length. Single-word pairs (``"Love"``/``"Hate"``) touch one or two positions and, on the default model,
  did not move the sentiment of held-out prompts significantly (issue 8).
- The injection is clipped to the prompt (prompt forward only; decoding sees it through the KV cache).
- The difference is cached by content (model fingerprint, layer, context and both token lists): every
  single-turn chat request with the same system prompt shares one vector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from steerserve.errors import SteerError
from steerserve.methods.base import Compiled, check_keys, coeff, layer_index
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.spec import PromptInfo, ResolveContext

MAX_PAIR_TOKENS = 64


def front(prompt: PromptInfo) -> int:
    """First steered position: the user's first token, or 1 when there is no prefix (raw prompts)."""
    return prompt.user_start if prompt.user_start > 0 else 1


def pad_token(ctx: ResolveContext) -> int:
    """The neutral pad for this tokenizer: its newline token (the last id, for tokenizers that split it)."""
    return ctx.tokenize("\n")[-1]


async def pair_vector(pos: str, neg: str, layer: int, context: Sequence[int], ctx: ResolveContext,
                      where: str) -> VectorRef:
    """The ``[n, hidden]`` positional difference of the pair read after ``context``, once per content."""
    ids_p, ids_n = ctx.tokenize(pos), ctx.tokenize(neg)
    for key, ids in (("positive", ids_p), ("negative", ids_n)):
        if not ids:
            raise SteerError("tokenizes to nothing", field=f"{where}.{key}")
        if len(ids) > MAX_PAIR_TOKENS:
            raise SteerError(f"is {len(ids)} tokens long; the limit is {MAX_PAIR_TOKENS}", field=f"{where}.{key}")
    pad, n = pad_token(ctx), max(len(ids_p), len(ids_n))
    ids_p = ids_p + [pad] * (n - len(ids_p))
    ids_n = ids_n + [pad] * (n - len(ids_n))
    c = list(context)
    key = hashlib.sha256(repr((ctx.model.fingerprint, layer, c, ids_p, ids_n)).encode()).hexdigest()
    cached = ctx.cache.get(f"actadd:{key}")
    if isinstance(cached, VectorRef):
        return cached
    hp, hn = await ctx.hidden_states([c + ids_p, c + ids_n], [layer])  # each [len(c) + n, 1, hidden]
    ref = VectorRef.of(hp[len(c):, 0] - hn[len(c):, 0])  # [n, hidden]
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
        start = front(prompt)
        vec = await pair_vector(pos, neg, layer, prompt.token_ids[:start], ctx, where)
        stop = min(start + vec.rows, len(prompt.token_ids))
        ops = (SteerOp(OpKind.ADD, layer, vec, c, start, stop, positional=True),) if start < stop else ()
        detail = {"layer": layer, "coeff": c, "front": [start, stop], "pair_tokens": vec.rows}
        return Compiled(ops, artifacts, detail)
