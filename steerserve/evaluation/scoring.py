"""The scorer: exact, full-vocabulary next-token distributions of a token sequence under steering, by
teacher forcing on the hf engine's own model (the same hooks, bank and tables that serve requests).

One forward of prompt + continuation per sequence, right-padded into batches (causal attention: padding
after a sequence never reaches it, and padding tokens are outside every steering segment). Ops are laid
out at absolute positions from 0, exactly as the engine lays out a prefill. Closed-loop (``gain``) ops
are applied at gain 1.0: the hf tables carry no gain register yet. An item's ``temperature`` scores the
distributions ``softmax(logits / T)`` (a temperature baseline); its KL is then to the unsteered model's own
distribution (T = 1), so an unsteered item at T != 1 has a KL too.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerserve.engines.hf import HFEngine
from steerserve.methods import resolve
from steerserve.runtime.ops import NON_FINITE
from steerserve.runtime.pins import Pin
from steerserve.runtime.plan import SteerOp
from steerserve.runtime.registers import option_entropy
from steerserve.runtime.tables import Segment
from steerserve.spec import PromptInfo, ResolveContext, ResolvedSpec, SteerSpec

TOKEN_BUDGET = 512  # tokens per forward: the logits alone are [tokens, vocab] fp32 (~100 MB at 49k vocab)


@dataclass(frozen=True)
class ScoreItem:
    prompt: PromptInfo
    continuation: tuple[int, ...]  # generated tokens (the reply, tokenized)
    ops: tuple[SteerOp, ...]  # the steered model's ops; () = unsteered
    positions: int = 1  # generated positions to score: the first predicts continuation[0]
    temperature: float = 1.0  # the scored distributions are softmax(logits / temperature)

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prompt.token_ids + self.continuation


@dataclass(frozen=True)
class Scored:
    first: dict[int, float]  # log p(token) at the first generated position, for the probe ids
    top: tuple[int, ...]  # per scored position: the most likely token (greedy decoding's choice)
    chosen: tuple[float, ...]  # per scored position < len(continuation): log p(the continuation's token)
    kl: tuple[float, ...] | None  # per scored position: KL(steered || unsteered), nats; None if not asked
    # per scored position: (entropy in bits over the option ids, their probability mass); () without options
    decisions: tuple[tuple[float, float], ...] = ()


class Scorer:
    """Scores sequences on ``engine``'s model; resolves specs with ``ctx`` (model, store, policy)."""

    def __init__(self, engine: HFEngine, ctx: ResolveContext, probe_ids: Sequence[int] = (),
                 token_budget: int = TOKEN_BUDGET, option_ids: Sequence[int] = ()) -> None:
        self.engine, self.ctx, self.probe_ids = engine, ctx, tuple(probe_ids)
        self.option_ids = tuple(option_ids)
        self.token_budget = min(token_budget, engine.tables.max_tokens)

    async def resolve(self, spec: Mapping[str, Any] | None, prompt: PromptInfo) -> ResolvedSpec:
        """The spec compiled for this prompt, as the server compiles it (raises SteerError)."""
        return await resolve(SteerSpec.from_dict(spec), prompt, self.ctx)

    async def score(self, items: Sequence[ScoreItem], kl: bool = True) -> list[Scored]:
        """Score every item; ``kl`` adds the unsteered forward (for items with ops) and the per-position KL."""
        for item in items:
            if not 1 <= item.positions <= len(item.continuation) + 1:
                raise ValueError(f"positions must be in [1, {len(item.continuation) + 1}]")
            if len(item.tokens) > self.engine.tables.max_tokens:
                raise ValueError(f"a sequence of {len(item.tokens)} tokens exceeds the steering tables' "
                                 f"{self.engine.tables.max_tokens}")
        order = sorted(range(len(items)), key=lambda i: len(items[i].tokens))  # little padding per batch
        out: dict[int, Scored] = {}
        batch: list[int] = []
        for i in [*order, None]:
            if batch and (i is None or (len(batch) + 1) * len(items[i].tokens) > self.token_budget):
                chosen = [items[j] for j in batch]
                scored = await asyncio.wrap_future(self.engine.call(functools.partial(self._score, chosen, kl)))
                out.update(zip(batch, scored, strict=True))
                batch = []
            if i is not None:
                batch.append(i)
        return [out[i] for i in range(len(items))]

    # ---- engine thread ----
    def _score(self, items: Sequence[ScoreItem], kl: bool) -> list[Scored]:
        steered = self._forward(items, steer=True)  # [B, S, V]
        # The unsteered forward only for steered items: an unsteered item's KL is 0 by definition.
        rows = {i: r for r, i in enumerate(i for i, it in enumerate(items) if it.ops)} if kl else {}
        unsteered = self._forward([items[i] for i in rows], steer=False) if rows else None  # [B', S', V]
        out = []
        for i, it in enumerate(items):
            a = len(it.prompt.token_ids) - 1  # the last prompt position predicts the first generated token
            logits = steered[i, a : a + it.positions].float()  # [k, V]
            ls = torch.log_softmax(logits / it.temperature, dim=-1)  # [k, V]
            divergence: tuple[float, ...] | None = None
            if kl:
                lu: torch.Tensor | None = None  # the unsteered model at T = 1, [k, V]
                if unsteered is not None and i in rows:
                    lu = torch.log_softmax(unsteered[rows[i], a : a + it.positions].float(), dim=-1)
                elif it.temperature != 1.0:  # unsteered, only rescaled: its own logits at T = 1
                    lu = torch.log_softmax(logits, dim=-1)
                if lu is not None:
                    divergence = tuple((ls.exp() * (ls - lu)).sum(dim=-1).tolist())  # [k]
                else:
                    divergence = (0.0,) * it.positions
            cont = torch.tensor(it.continuation[: it.positions], dtype=torch.long)
            chosen = ls[: len(cont)].gather(1, cont[:, None])[:, 0]  # [min(k, len(continuation))]
            decisions: tuple[tuple[float, float], ...] = ()
            if self.option_ids:  # the sampler-side op's own measurement, on these distributions
                ids = torch.tensor(self.option_ids).expand(len(ls), -1)  # [k, K]
                h, mass = option_entropy(ls, ids, torch.ones_like(ids, dtype=torch.bool))
                decisions = tuple(zip(h.tolist(), mass.tolist(), strict=True))
            out.append(Scored({t: float(ls[0, t]) for t in self.probe_ids}, tuple(ls.argmax(dim=-1).tolist()),
                              tuple(chosen.tolist()), divergence, decisions))
        return out

    def _forward(self, items: Sequence[ScoreItem], steer: bool) -> torch.Tensor:
        """Logits ``[B, S, V]`` of the right-padded batch, steered by each item's ops or not at all."""
        eng = self.engine
        width = max(len(it.tokens) for it in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)  # [B, S]; padding is token 0, never read
        for i, it in enumerate(items):
            ids[i, : len(it.tokens)] = torch.tensor(it.tokens)
        pins: list[Pin] = []
        try:
            segments = []
            for i, it in enumerate(items):
                if not (steer and it.ops):
                    continue
                pin = Pin.acquire(eng.bank, it.ops, eng.tables.slots)
                if pin is None:
                    raise RuntimeError("the vector bank is full: score fewer sequences at once")
                pins.append(pin)
                segments.append(Segment(i * width, 0, len(it.tokens), pin.placement(eng.bank)))
            eng.tables.fill(ids.numel(), segments, eng.bank.weight)  # flat token index = row * width + pos
            logits = eng.model(input_ids=ids, use_cache=False, logits_to_keep=0).logits
            if eng.tables.flagged(segments):
                raise RuntimeError(NON_FINITE)
            return logits
        finally:
            eng.tables.fill(0, [])  # the engine's next step starts from neutral tables
            for pin in pins:
                pin.release(eng.bank)
