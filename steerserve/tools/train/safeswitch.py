"""SafeSwitch offline (Han et al. 2502.01042): the post-final-norm states the probes read, the probes' and
the refusal head's fitting, and greedy replies with the head (``runtime.safeswitch`` holds the arithmetic).

- ``run_batch`` prefills a left-padded batch of chat prompts once and, from that one prefill, reads the
  stage-1 state (last prompt token), decodes greedily (the model's own head, or a refusal head) to read the
  stage-2 state (the position of the ``PILOT_TOKENS``-th pilot token, the state that predicts the next one;
  ``steps`` holds the state at every decoded position) and, given target replies, teacher-forces them from
  a copy of the prompt's KV cache for the head's loss. Left padding is masked and ``position_ids`` count
  real tokens only, so a row's states match an unpadded forward of that row (within float32 rounding,
  ~1e-5 on the default model).
- ``fit_probe``: ``Linear(H, 64) - ReLU - Linear(64, 2)``, AdamW, class-balanced cross-entropy, on
  standardised states; the standardisation is folded into ``w1``/``b1`` so the runtime feeds raw states.
- ``fit_head``: only the rank-``r`` delta ``a``, ``b`` trains (the model is frozen; the states of the
  teacher-forced replies do not depend on the head, so they are computed once), LM cross-entropy on the
  reply tokens. ``b`` starts at zero: the delta starts as the identity on the model's head (LoRA's init).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from steerserve.anatomy import hf_body, hf_head
from steerserve.runtime.safeswitch import PILOT_TOKENS, PROBE_WIDTH, HeadDelta, Probe, head_logits, probe_prob

# Refusal-then-explanation replies for the head's training (written for this repository), combined per row
# as opener + explanation + closer: every opener is a refusal by ``evaluation.metrics.is_refusal``.
OPENERS = ("I'm sorry, but I can't help with that.", "I can't assist with this request.",
           "I'm sorry, but I cannot provide that.", "I apologize, but I can't help with this.",
           "I'm unable to help with that request.", "Sorry, I can't do that.")
EXPLANATIONS = ("It could be used to hurt people, and I won't contribute to that.",
                "Providing this would risk serious harm to others and could be illegal.",
                "Helping with this could put people's safety at risk.",
                "This request involves causing harm, which goes against my guidelines.",
                "Sharing that kind of information could lead to real damage or injury.")
CLOSERS = ("If you have a different question, I'm happy to help.", "Is there something else I can help you with?",
           "I'd be glad to help with something safe instead.", "")


def refusal_reply(i: int) -> str:
    """The ``i``-th templated refusal-then-explanation reply (6 x 5 x 4 = 120 combinations)."""
    parts = (OPENERS[i % len(OPENERS)], EXPLANATIONS[i // len(OPENERS) % len(EXPLANATIONS)],
             CLOSERS[i // (len(OPENERS) * len(EXPLANATIONS)) % len(CLOSERS)])
    return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class BatchOut:
    """One batch's states and replies, rows in the order given."""

    stage1: torch.Tensor  # [B, H] post-final-norm state at the last prompt token
    stage2: torch.Tensor  # [B, H] post-final-norm state at the PILOT_TOKENS-th greedy token
    replies: list[tuple[int, ...]]  # greedy tokens, cut after the first end-of-sequence token
    teacher: list[torch.Tensor]  # per row [len(reply), H]: the states that predict each target reply token
    steps: torch.Tensor  # [B, S, H]: the state at the last prompt token (0) and at greedy token j (j >= 1)


def run_batch(model: Any, prompts: Sequence[Sequence[int]], tokens: int, eos: set[int],
              targets: Sequence[Sequence[int]] | None = None, head: HeadDelta | None = None) -> BatchOut:
    """Prefill ``prompts`` (left-padded), teacher-force ``targets`` if given, and decode ``max(tokens,
    PILOT_TOKENS)`` greedy tokens (with ``head`` instead of the model's own head if given)."""
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p))
        mask[i, width - len(p):] = 1
    body, weight = hf_body(model), hf_head(model).weight  # [V, H], the tied embeddings on the default model
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    teacher: list[torch.Tensor] = []
    with torch.inference_mode():
        h = body(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                 use_cache=True).last_hidden_state[:, -1]  # [B, H]
        stage1 = h.clone()
        if targets is not None:  # feed each reply but its last token, right-padded (padding after it is causal)
            fed = max(len(t) for t in targets) - 1
            if fed > 0:
                tids = torch.zeros(b, fed, dtype=torch.long)
                tmask = torch.zeros(b, fed, dtype=torch.long)
                for i, t in enumerate(targets):
                    tids[i, : len(t) - 1] = torch.tensor(list(t[:-1]))
                    tmask[i, : len(t) - 1] = 1
                tpos = pos[:, -1:] + 1 + torch.arange(fed)
                hs = body(input_ids=tids, attention_mask=torch.cat([mask, tmask], 1), position_ids=tpos,
                          past_key_values=copy.deepcopy(cache), use_cache=True).last_hidden_state  # [B, fed, H]
            teacher = [torch.cat([stage1[i : i + 1], hs[i, : len(t) - 1] if fed > 0 else stage1[:0]])
                       for i, t in enumerate(targets)]
        n = max(tokens, PILOT_TOKENS)
        out: list[torch.Tensor] = []
        steps = [stage1]
        stage2 = stage1
        for step in range(n):  # h predicts token step + 1
            logits = hf_head(model)(h) if head is None else head_logits(h, weight, head.a, head.b)  # [B, V]
            out.append(logits.argmax(-1))
            if step + 1 == n and step + 1 != PILOT_TOKENS:
                break  # the last token's own state is not needed
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
            h = body(input_ids=out[-1][:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                     use_cache=True).last_hidden_state[:, -1]
            steps.append(h)
            if step + 1 == PILOT_TOKENS:
                stage2 = h.clone()  # the state at the last pilot token's position
    gen = torch.stack(out, 1)[:, :tokens].tolist()
    return BatchOut(stage1, stage2, [_cut(r, eos) for r in gen], teacher, torch.stack(steps, 1))


def _cut(ids: list[int], eos: set[int]) -> tuple[int, ...]:
    for k, t in enumerate(ids):
        if t in eos:
            return tuple(ids[: k + 1])
    return tuple(ids)


def fit_probe(x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch: int = 32, seed: int = 0,
              weight_decay: float = 0.01) -> Probe:
    """A stage probe on ``x [N, H]`` (fp32 states) and ``y [N]`` (0/1), class-balanced; fp32, standardisation
    folded in."""
    gen = torch.Generator().manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-6  # [H]
    z = (x - mu) / sd
    h = x.shape[1]
    l1, l2 = torch.nn.Linear(h, PROBE_WIDTH), torch.nn.Linear(PROBE_WIDTH, 2)
    with torch.no_grad():  # seeded init (nn.Linear's own draws from the global generator)
        for layer in (l1, l2):
            bound = layer.in_features ** -0.5
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
    params = [*l1.parameters(), *l2.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    counts = torch.bincount(y.long(), minlength=2).clamp(min=1).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=len(y) / (2 * counts))  # balanced classes
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            loss = loss_fn(l2(torch.relu(l1(z[idx]))), y[idx].long())
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        w1 = l1.weight / sd  # [64, H]: w1 (x - mu) / sd = (w1 / sd) x - (w1 / sd) mu
        b1 = l1.bias - w1 @ mu
        return Probe(w1.clone(), b1.clone(), l2.weight.clone(), l2.bias.clone())


def fold_threshold(probe: Probe, decide_at: float, served_at: float) -> Probe:
    """``probe`` with its decision threshold ``decide_at`` folded into ``b2``: the result's probability reaches
    ``served_at`` (the runtime's one threshold) exactly where ``probe``'s reaches ``decide_at`` (``p >= t`` is
    ``logit difference >= log(t / (1 - t))``, so the positive logit moves by
    ``logit(served_at) - logit(decide_at)``)."""
    shift = math.log(served_at / (1 - served_at)) - math.log(decide_at / (1 - decide_at))
    return Probe(probe.w1, probe.b1, probe.w2, probe.b2 + torch.tensor([0.0, shift]))


def probe_scores(probe: Probe, x: torch.Tensor) -> torch.Tensor:
    """``[N]`` positive-class probabilities of ``x [N, H]``."""
    with torch.no_grad():
        return probe_prob(x.float(), probe.w1, probe.b1, probe.w2, probe.b2)


def binary_metrics(pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """F1 (of the positive class), accuracy, precision and recall of 0/1 ``pred`` against ``y``."""
    p, t = pred.bool(), y.bool()
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"f1": round(f1, 4), "accuracy": round(float((p == t).float().mean()), 4),
            "precision": round(prec, 4), "recall": round(rec, 4), "n": len(t), "positives": int(t.sum())}


def fit_head(states: torch.Tensor, targets: torch.Tensor, base: torch.Tensor, *, rank: int, epochs: int,
             lr: float, batch: int = 64, seed: int = 0) -> tuple[HeadDelta, list[float]]:
    """The refusal head's delta on ``states [N, H]`` -> ``targets [N]`` (next tokens), ``base [V, H]`` frozen;
    returns it (fp32) and the mean loss per epoch."""
    gen = torch.Generator().manual_seed(seed)
    h = states.shape[1]
    a = (torch.randn(rank, h, generator=gen) * h**-0.5).requires_grad_()  # [r, H]
    b = torch.zeros(base.shape[0], rank, requires_grad=True)  # [V, r]
    opt = torch.optim.AdamW([a, b], lr=lr, weight_decay=0.0)
    base = base.detach()
    losses = []
    for _ in range(epochs):
        total, n = 0.0, 0
        for idx in torch.randperm(len(targets), generator=gen).split(batch):
            loss = torch.nn.functional.cross_entropy(head_logits(states[idx], base, a, b), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(idx), n + len(idx)
        losses.append(round(total / n, 4))
    return HeadDelta(a.detach().clone(), b.detach().clone()), losses
