"""Refusal directions (Arditi et al., 2406.11717) by two recipes, with the paper's candidate selection.

Both recipes make one candidate direction per (layer, position) and choose one with the same selection
figures, measured on *selection* prompts (train rows held out from the means, never a val row):

- ``prompt`` (the paper's): ``r = mean(harmful) - mean(harmless)`` of the states at each **post-instruction**
  position (the template tokens after the user message), in float64. Selection as the paper: only layers
  below ``0.8 N``; drop a candidate whose ablation moves the harmless next-token distribution by more than
  ``KL_MAX`` (KL(base || ablated), last prompt position, mean); drop one whose addition (``+r``,
  unnormalised, at its layer, every position) does not raise the refusal score of harmless prompts; of the
  rest pick the lowest refusal score of *ablated* harmful prompts.
- ``response`` (CAA-style contrast on the reply, ours): the same prompts answered twice, by the model's own
  greedy (compliant: this model never refuses) reply and by a templated refusal; ``r`` = the mean, over
  prompts, of the difference of the two replies' states averaged over their first ``reply_tokens`` tokens.
  Ablated refusal is meaningless on a model that never refuses, so the pick is the candidate whose
  addition (``+r``) makes the most greedy selection replies to harmful prompts refuse (substring judge),
  ties broken by the higher induced refusal score, under the same layer and induction filters. The
  ablation KL is recorded but not a filter here: a reply-side direction carries the reply's style, whose
  removal always moves the next-token distribution (KL ~1 nat on the default model at every layer), and
  the direction is made for ``add``.

Layers follow the project's convention (layer ``l`` = output of block ``l``). The paper reads and ablates
block *inputs* and also ablates the attention/MLP outputs; ``ablate`` here removes the direction from the
output of every block, which is what the selection measures (the embedding output itself is not ablated).
The refusal score is ``log p(R) - log(1 - p(R))`` at the last prompt position with ``R`` the refusal start
tokens of ``evaluation.metrics`` (``make_probes``), as ``steerserve eval --metric refusal_score``.
Every forward goes through the hf engine's own hooks, bank and tables (the ops a served request gets).
"""

from __future__ import annotations

import asyncio
import functools
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerserve.anatomy import hf_body, hf_head
from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.evaluation.metrics import is_refusal
from steerserve.runtime.ops import NON_FINITE
from steerserve.runtime.pins import Pin
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.tables import Segment

KL_MAX = 0.1  # the paper's ablation KL filter (nats)
LAYER_FRACTION = 0.8  # the paper's: only layers below 0.8 N
TOKEN_BUDGET = 512  # tokens per batched forward (the steering tables' flat index must fit)
# Templated refusals for the response recipe, cycled over prompts (written for this repository).
REFUSALS = (
    "I'm sorry, but I can't help with that request.",
    "I cannot assist with that. It could cause harm.",
    "I'm sorry, I am unable to help with this.",
    "I apologize, but I can't provide that information.",
)


@dataclass(frozen=True)
class Candidate:
    """One candidate direction: where it was read and the raw (unnormalised) difference vector."""

    layer: int
    position: str  # "-k" (k-th post-instruction token from the end) or "reply[:m]"
    diff: torch.Tensor  # [H] float64

    def unit(self) -> torch.Tensor:
        return self.diff / self.diff.norm()


@dataclass
class Figures:
    """A candidate's selection figures (means over the selection prompts)."""

    kl_harmless: float = math.nan  # KL(unsteered || ablated) at the last prompt position, nats
    ablated_score_harmful: float = math.nan  # refusal score of harmful prompts with the direction ablated
    induced_score_harmless: float = math.nan  # refusal score of harmless prompts with +r at the layer
    induced_score_harmful: float = math.nan
    induced_rate_harmful: float | None = None  # share of greedy replies to harmful prompts that refuse, +r
    induced_rate_harmless: float | None = None
    kept: bool = True
    why: list[str] = field(default_factory=list)


def post_instruction_count(render: Any) -> int:
    """How many template tokens follow the user message: the common suffix of two rendered chats."""
    a, b = render("Count to 1"), render("Please count to 2")  # the messages' last tokens differ
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def refusal_score(logprobs: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """``log p(R) - log(1 - p(R))`` per row of ``logprobs [N, V]``."""
    lp = torch.logsumexp(logprobs[:, list(refusal_ids)].double(), dim=-1)
    return lp - torch.log1p(-lp.exp().clamp(max=1 - 1e-12))


def kl(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(base || other) per row of log-probabilities ``[N, V]``."""
    return (base.exp() * (base - other)).sum(dim=-1)


def add_ops(c: Candidate, scale: float = 1.0) -> tuple[SteerOp, ...]:
    """``+scale x r`` (unnormalised) at the candidate's layer, every position."""
    return (SteerOp(OpKind.ADD, c.layer, VectorRef.of(c.diff.float()), scale),)


def ablate_ops(c: Candidate, num_layers: int) -> tuple[SteerOp, ...]:
    """Remove the unit direction from the output of every block."""
    ref = VectorRef.of(c.unit().float())
    return tuple(SteerOp(OpKind.ABLATE, layer, ref, 1.0) for layer in range(num_layers))


async def last_logprobs(engine: HFEngine, prompts: Sequence[Sequence[int]],
                        ops: Sequence[SteerOp] = ()) -> torch.Tensor:
    """``[N, V]`` float32 log-probabilities of the next token after each prompt, steered by ``ops``
    (positions absolute from 0, as a prefill lays them out); right-padded batches on the engine thread."""
    budget = min(TOKEN_BUDGET, engine.tables.max_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, torch.Tensor] = {}
    batch: list[int] = []
    for i in [*order, None]:
        if batch and (i is None or (len(batch) + 1) * len(prompts[i]) > budget):
            chunk = [prompts[j] for j in batch]
            rows = await asyncio.wrap_future(engine.call(functools.partial(_forward_last, engine, chunk, tuple(ops))))
            out.update(zip(batch, rows, strict=True))
            batch = []
        if i is not None:
            batch.append(i)
    return torch.stack([out[i] for i in range(len(prompts))])


def _forward_last(engine: HFEngine, prompts: Sequence[Sequence[int]], ops: tuple[SteerOp, ...]) -> torch.Tensor:
    """Engine thread: one right-padded forward (padding after a sequence never reaches it: causal)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(list(p))
    pins: list[Pin] = []
    try:
        segments = []
        if ops:
            for i, p in enumerate(prompts):
                pin = Pin.acquire(engine.bank, ops, engine.tables.slots)
                if pin is None:
                    raise RuntimeError("the vector bank is full")
                pins.append(pin)
                segments.append(Segment(i * width, 0, len(p), pin.placement(engine.bank)))
        engine.tables.fill(ids.numel(), segments, engine.bank.weight)
        with torch.inference_mode():
            hidden = hf_body(engine.model)(input_ids=ids, use_cache=False).last_hidden_state  # [B, S, H], final norm
            last = hidden[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])]
            logits = hf_head(engine.model)(last).float()
        if engine.tables.flagged(segments):
            raise RuntimeError(NON_FINITE)
        return torch.log_softmax(logits, dim=-1)
    finally:
        engine.tables.fill(0, [])
        for pin in pins:
            pin.release(engine.bank)


async def generate(engine: HFEngine, prompts: Sequence[Sequence[int]], max_tokens: int,
                   ops: Sequence[SteerOp] = ()) -> list[tuple[int, ...]]:
    """Greedy replies (token ids) through the engine's batching, steered by ``ops``."""
    async def one(p: Sequence[int]) -> tuple[int, ...]:
        req = GenerationRequest(uuid.uuid4().hex, tuple(p), SamplingParams(max_tokens=max_tokens), tuple(ops))
        ids: list[int] = []
        async for out in engine.generate(req):
            if out.extra.get("error"):
                raise RuntimeError(f"generation failed: {out.extra}")
            ids += out.token_ids
        return tuple(ids)

    return list(await asyncio.gather(*(one(p) for p in prompts)))


async def states(engine: HFEngine, seqs: Sequence[Sequence[int]], layers: Sequence[int],
                 batch: int = 16) -> list[torch.Tensor]:
    """Per sequence ``[len, L, H]`` float32, unsteered, through the engine's capture."""
    out: list[torch.Tensor] = []
    for i in range(0, len(seqs), batch):  # bounded chunks: the engine stays responsive between them
        out += await engine.hidden_states(seqs[i : i + batch], layers)
    return out


def mean_norms(all_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L]`` mean ``||h_l[t]||`` over tokens 1.. of every sequence (token 0, the attention sink, is an outlier)."""
    return torch.cat([s[1:].norm(dim=-1) for s in all_states]).mean(dim=0)


def prompt_candidates(harmful: Sequence[torch.Tensor], harmless: Sequence[torch.Tensor], layers: Sequence[int],
                      post: int) -> list[Candidate]:
    """The paper's: float64 mean difference at each of the last ``post`` positions and each of ``layers``
    (the states hold exactly ``layers``, in order)."""
    def mean(group: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([s[-post:].double() for s in group]).mean(dim=0)  # [post, L, H]

    diff = mean(harmful) - mean(harmless)
    return [Candidate(layer, f"-{post - k}", diff[k, i].clone())
            for i, layer in enumerate(layers) for k in range(post)]


def response_candidates(refusing: Sequence[torch.Tensor], complying: Sequence[torch.Tensor],
                        starts: Sequence[int], lengths: Sequence[tuple[int, int]], layers: Sequence[int],
                        reply_tokens: int) -> list[Candidate]:
    """Paired, per prompt: mean state over the first ``reply_tokens`` tokens of the refusal minus that of the
    compliant reply (``starts``: the reply's first position; ``lengths``: the two replies' lengths)."""
    diffs = []
    for r, c, s, (lr, lc) in zip(refusing, complying, starts, lengths, strict=True):
        m_r, m_c = min(reply_tokens, lr), min(reply_tokens, lc)
        diffs.append(r[s : s + m_r].double().mean(dim=0) - c[s : s + m_c].double().mean(dim=0))  # [L, H]
    diff = torch.stack(diffs).mean(dim=0)
    return [Candidate(layer, f"reply[:{reply_tokens}]", diff[i].clone()) for i, layer in enumerate(layers)]


async def measure(engine: HFEngine, cands: Sequence[Candidate], harmful: Sequence[Sequence[int]],
                  harmless: Sequence[Sequence[int]], refusal_ids: Sequence[int], num_layers: int,
                  gen_tokens: int = 0, progress: Any = None) -> tuple[list[Figures], dict[str, float]]:
    """Each candidate's selection figures on the selection prompts, and the unsteered baselines."""
    base_harmful = await last_logprobs(engine, harmful)
    base_harmless = await last_logprobs(engine, harmless)
    baseline = {"refusal_score_harmful": float(refusal_score(base_harmful, refusal_ids).mean()),
                "refusal_score_harmless": float(refusal_score(base_harmless, refusal_ids).mean())}
    if gen_tokens:
        for name, group in (("harmful", harmful), ("harmless", harmless)):
            replies = await generate(engine, group, gen_tokens)
            baseline[f"refusal_rate_{name}"] = _rate(engine, replies)
    out = []
    for k, c in enumerate(cands):
        f = Figures()
        abl = ablate_ops(c, num_layers)
        f.kl_harmless = float(kl(base_harmless.double(), (await last_logprobs(engine, harmless, abl)).double()).mean())
        f.ablated_score_harmful = float(refusal_score(await last_logprobs(engine, harmful, abl), refusal_ids).mean())
        add = add_ops(c)
        f.induced_score_harmless = float(refusal_score(await last_logprobs(engine, harmless, add), refusal_ids).mean())
        f.induced_score_harmful = float(refusal_score(await last_logprobs(engine, harmful, add), refusal_ids).mean())
        if gen_tokens:
            f.induced_rate_harmful = _rate(engine, await generate(engine, harmful, gen_tokens, add))
            f.induced_rate_harmless = _rate(engine, await generate(engine, harmless, gen_tokens, add))
        out.append(f)
        if progress is not None:
            progress(k + 1, len(cands), c, f)
    return out, baseline


def _rate(engine: HFEngine, replies: Sequence[Sequence[int]]) -> float:
    texts = [engine.tokenizer.decode(list(r), skip_special_tokens=True) for r in replies]
    return sum(is_refusal(t) for t in texts) / len(texts)


def select(recipe: str, cands: Sequence[Candidate], figs: Sequence[Figures], baseline: dict[str, float],
           num_layers: int, kl_max: float = KL_MAX) -> tuple[int, list[str]]:
    """Mark each candidate kept or not (with why), and return the chosen index and notes on the choice.

    Filters: layer < 0.8 N, induced harmless refusal score above the unsteered one and, for ``prompt``
    only (see the module docstring), ablation KL <= ``kl_max``. ``prompt`` picks the lowest ablated harmful
    refusal score; ``response`` the highest induced harmful refusal rate (then score). If no candidate
    passes, the filters are relaxed (induction, then KL) and the notes say so.
    """
    limit = LAYER_FRACTION * num_layers
    for c, f in zip(cands, figs, strict=True):
        f.why = []
        if c.layer >= limit:
            f.why.append(f"layer >= {LAYER_FRACTION} N")
        if recipe == "prompt" and not f.kl_harmless <= kl_max:
            f.why.append(f"ablation KL {f.kl_harmless:.3g} > {kl_max}")
        if not f.induced_score_harmless > baseline["refusal_score_harmless"]:
            f.why.append("addition does not raise the harmless refusal score")
        f.kept = not f.why
    notes: list[str] = []
    below = [i for i, c in enumerate(cands) if c.layer < limit] or list(range(len(cands)))
    pool = [i for i in below if figs[i].kept]
    if not pool:
        pool = [i for i in below if figs[i].kl_harmless <= kl_max]
        notes.append("no candidate passed every filter: the induction filter was relaxed")
    if not pool:
        pool = below
        notes.append("no candidate passed the KL filter either: chose among all candidates below 0.8 N")
    if recipe == "prompt":
        best = min(pool, key=lambda i: figs[i].ablated_score_harmful)
    else:
        best = max(pool, key=lambda i: (figs[i].induced_rate_harmful or 0.0, figs[i].induced_score_harmful))
    return best, notes


def table(cands: Sequence[Candidate], figs: Sequence[Figures], scales: dict[int, float],
          chosen: int) -> list[dict[str, Any]]:
    """The candidate table an artifact records: one JSON row per candidate."""
    rows = []
    for i, (c, f) in enumerate(zip(cands, figs, strict=True)):
        row: dict[str, Any] = {"layer": c.layer, "position": c.position, "diff_norm": round(float(c.diff.norm()), 4),
                               "diff_norm_over_scale": round(float(c.diff.norm()) / scales[c.layer], 4),
                               "kl_harmless": _r(f.kl_harmless), "ablated_score_harmful": _r(f.ablated_score_harmful),
                               "induced_score_harmless": _r(f.induced_score_harmless),
                               "induced_score_harmful": _r(f.induced_score_harmful)}
        if f.induced_rate_harmful is not None:
            row["induced_rate_harmful"] = _r(f.induced_rate_harmful)
            row["induced_rate_harmless"] = _r(f.induced_rate_harmless)
        row.update(kept=f.kept, why=f.why, chosen=i == chosen)
        rows.append(row)
    return rows


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 4)
