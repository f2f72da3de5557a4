"""Distribution metrics from a server's own log-probabilities: ``steerserve eval --server URL`` without a local
model or store (``--exact`` scores on the local model instead, ``scoring``).

The replies are generated over the OpenAI routes with ``logprobs`` (chat: ``top_logprobs`` 20; raw text:
``/v1/completions``' ``logprobs`` 5), whose values are the model's own distribution after steering, before
temperature (as vLLM's ``raw_logprobs``). Each generated position then knows its top-k tokens, by text, not
id. What the metrics read is rebuilt from them (``NOTE`` states the approximation):

- ``choice_entropy``, ``refusal_score``: the first position's log-probabilities of the option tokens (a
  top-k token whose text is the option) and the refusal tokens (a top-k token whose stripped text is a
  refusal start, or its first word); a token outside the top-k counts as probability 0;
- ``decision_entropy``: per generated position, the options' entropy and mass the same way (the
  distributions that chose the reply's tokens: no teacher forcing is needed);
- ``kl``: at the first generated position only, where a steered setting and the unsteered baseline share
  the prompt: KL over the partition {tokens in both top-k sets} + one ``other`` bucket holding the rest of
  each distribution's mass, a lower bound of the exact KL (coarsening never raises a KL);
- a temperature setting's distributions are ``p^(1/T)`` renormalised over the top-k and the ``other``
  bucket taken as one token.

Tokens are matched by text, so synthetic ids stand in for the probe ids (``remote_probes``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from steerserve.errors import SteerError
from steerserve.evaluation.generate import Reply, error_detail, generate_each, numeric_report
from steerserve.evaluation.metrics import REFUSAL_STARTS, Probes
from steerserve.evaluation.scoring import Scored
from steerserve.evaluation.sweep import Setting

CHAT_TOP_K = 20  # the chat route's most ``top_logprobs``
RAW_TOP_K = 5  # the completions route's most ``logprobs``
_FLOOR = 1e-12  # a bucket's least probability in the KL (rounding can leave 1 - sum(top-k) at or below 0)
NOTE = ("distribution metrics are approximated from the server's top-{k} log-probabilities (no local model): "
        "an option or refusal token outside the top-{k} counts as probability 0 (choice entropy renormalised over "
        "the options found); KL is measured at the first generated position only, over the tokens in both "
        "top-{k} sets plus one 'other' bucket lumping the rest of the mass (a lower bound of the exact KL); "
        "pass --exact to score on the local model")


@dataclass(frozen=True)
class TopK:
    """One generated position's most likely tokens: text -> log-probability (tokens of equal text summed)."""

    logprobs: Mapping[str, float]

    @property
    def other(self) -> float:
        """The probability outside the top-k."""
        return max(0.0, 1.0 - sum(math.exp(lp) for lp in self.logprobs.values()))

    def logprob(self, match: set[str]) -> float:
        """log p(any token whose text is in ``match``); -inf when none is in the top-k."""
        p = sum(math.exp(lp) for t, lp in self.logprobs.items() if t in match)
        return math.log(p) if p > 0 else -math.inf

    def tempered(self, temperature: float) -> TopK:
        """``softmax(log p / T)`` over the top-k and the ``other`` bucket taken as one token."""
        if temperature == 1.0:
            return self
        scaled = {t: lp / temperature for t, lp in self.logprobs.items()}
        other = self.other
        weights = [*scaled.values(), *([math.log(other) / temperature] if other > 0 else [])]
        top = max(weights)
        z = top + math.log(sum(math.exp(w - top) for w in weights))
        return TopK({t: lp - z for t, lp in scaled.items()})


def _merge(pairs: Sequence[tuple[str, float]]) -> TopK:
    probs: dict[str, float] = {}
    for text, lp in pairs:
        probs[text] = probs.get(text, 0.0) + math.exp(lp)
    return TopK({t: math.log(p) if p > 0 else -math.inf for t, p in probs.items()})


def to_openai(payload: Mapping[str, Any], chat: bool) -> tuple[str, dict[str, Any]]:
    """A ``POST /generate`` body (``generate.body``) as (route, body) of the OpenAI route with top-k logprobs."""
    out = {k: v for k, v in payload.items() if k not in ("prompt", "messages")}
    if chat:
        return "/v1/chat/completions", {**out, "messages": payload["messages"], "logprobs": True,
                                        "top_logprobs": CHAT_TOP_K}
    return "/v1/completions", {**out, "prompt": payload["prompt"], "logprobs": RAW_TOP_K}


async def _one(client: httpx.AsyncClient, payload: dict[str, Any], chat: bool) -> tuple[Reply, tuple[TopK, ...]]:
    route, data = to_openai(payload, chat)
    r = await client.post(route, json=data)
    if r.status_code != 200:
        raise SteerError(f"the server answered {r.status_code}: {error_detail(r)}", status=r.status_code)
    body = r.json()
    choice = body["choices"][0]
    lp = choice.get("logprobs") or {}
    if chat:
        text = str(choice["message"].get("content") or "")
        tops = tuple(_merge([(e["token"], e["logprob"]) for e in pos["top_logprobs"]])
                     for pos in lp.get("content") or [])
    else:
        text = str(choice["text"])
        tops = tuple(_merge(list(pos.items())) for pos in lp.get("top_logprobs") or [])
    steering = body.get("steering") or {}
    reply = Reply(text, int(body["usage"]["completion_tokens"]), str(choice["finish_reason"]),
                  numeric_report(steering.get("report")), str(body.get("model", "")))
    return reply, tops


async def generate_with_topk(client: httpx.AsyncClient, payloads: Sequence[dict[str, Any]], chat: bool,
                             concurrency: int, progress: bool = True) -> list[tuple[Reply, tuple[TopK, ...]]]:
    """Every payload's reply and its per-position top-k, in order (``generate.generate_each``)."""
    return await generate_each(client, payloads, concurrency, progress, lambda c, p: _one(c, p, chat))


def remote_probes(options: Sequence[str]) -> tuple[Probes, dict[int, set[str]]]:
    """Probes with synthetic ids (options first, then the refusal tokens) and each id's matching texts."""
    words = {w for s in REFUSAL_STARTS for w in (s, *re.findall(r"[A-Za-z]+", s)[:1])}
    texts = [{o} for o in dict.fromkeys(options)] + [{w, " " + w} for w in sorted(words)]
    option_ids = tuple(range(len(texts) - len(words)))
    refusal = tuple(range(len(option_ids), len(texts)))
    return Probes(refusal, tuple(options), option_ids), dict(enumerate(texts))


def _decision(top: TopK, options: Sequence[set[str]]) -> tuple[float, float]:
    """(entropy in bits over the options, their mass) at one position; options outside the top-k are 0."""
    ps = [math.exp(top.logprob(o)) for o in options]
    mass = sum(ps)
    if mass <= 0:
        return math.nan, 0.0
    return -sum(p / mass * math.log2(p / mass) for p in ps if p > 0), mass


def kl_coarse(p: TopK, q: TopK) -> float:
    """KL(p || q) in nats over {tokens in both top-k sets} + one ``other`` bucket (a lower bound)."""
    shared = p.logprobs.keys() & q.logprobs.keys()
    kl = sum(math.exp(p.logprobs[t]) * (p.logprobs[t] - q.logprobs[t]) for t in shared)
    po = max(_FLOOR, 1.0 - sum(math.exp(p.logprobs[t]) for t in shared))
    qo = max(_FLOOR, 1.0 - sum(math.exp(q.logprobs[t]) for t in shared))
    return max(0.0, kl + po * math.log(po / qo))


def _reference(settings: Sequence[Setting], setting: Setting) -> int | None:
    """The unsteered setting at T = 1 on the same prompt template: the steered one's KL reference."""
    for i, st in enumerate(settings):
        if st.steering is None and st.temperature is None and st.template == setting.template:
            return i
    return None


def score_all(settings: Sequence[Setting], tops: Sequence[Sequence[tuple[TopK, ...]]], probes: Probes,
              texts: Mapping[int, set[str]], kl: bool, along: bool) -> list[list[Scored | None]]:
    """``Scored`` per [setting][sample] from the top-k (see the module docstring); a reply with no position
    (an empty generation) is None."""
    options = [texts[i] for i in probes.option_ids]
    out: list[list[Scored | None]] = []
    for st, per_sample in zip(settings, tops, strict=True):
        ref = _reference(settings, st) if st.steering is not None else None
        temperature = 1.0 if st.temperature is None else st.temperature
        row: list[Scored | None] = []
        for j, positions in enumerate(per_sample):
            if not positions:
                row.append(None)
                continue
            dists = [t.tempered(temperature) for t in positions]
            first = {i: dists[0].logprob(texts[i]) for i in probes.ids}
            divergence: tuple[float, ...] | None = None
            if kl:
                base = tops[ref][j][:1] if ref is not None else ()
                if st.steering is not None:
                    divergence = (kl_coarse(dists[0], base[0]),) if base else (math.nan,)
                else:  # unsteered: only a temperature moves it from the model's own distribution
                    divergence = (kl_coarse(dists[0], positions[0]),)
            decisions = tuple(_decision(d, options) for d in dists) if along and options else ()
            row.append(Scored(first, (), (), divergence, decisions))
        out.append(row)
    return out
