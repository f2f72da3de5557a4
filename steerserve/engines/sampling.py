"""Token sampling and incremental detokenisation with stop strings, shared by the engines."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from steerserve.engines.base import SamplingParams, TokenLogprob


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-request generator so that a seeded request samples the same tokens in any batch."""
    if params.temperature <= 0:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def adjust(logits: torch.Tensor, params: SamplingParams, generated: Sequence[int]) -> torch.Tensor:
    """``logits [vocab]`` with OpenAI's penalties over the ``generated`` tokens and the logit bias applied,
    in the order vLLM applies them (both additive, so the order changes nothing). A new tensor; the
    input is untouched."""
    out = logits.float().clone()
    if (params.presence_penalty or params.frequency_penalty) and generated:
        counts = torch.bincount(torch.tensor(list(generated)), minlength=out.shape[-1])[: out.shape[-1]].float()
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias])
        out.index_add_(0, ids, torch.tensor([b for _, b in params.logit_bias]))
    return out


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The log-probability of ``token`` under ``logits [vocab]`` (fp32 log-softmax), and the ``top`` most
    likely tokens' (ties in token-id order, best first)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logp, top)
        best = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), best)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from ``logits [vocab]``: argmax when greedy, else temperature + nucleus (top_p)."""
    if params.temperature <= 0 or generator is None:
        return int(torch.argmax(logits).item())
    # float64 and max-subtracted: a temperature near the smallest float (1e-45) must not underflow to NaN
    z = logits.double()
    probs = torch.softmax((z - z.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p
        keep[0] = True  # the top token always stays, however small top_p is (5e-324 compares as 0 otherwise)
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator).item())


class Detokenizer:
    """Turns a growing list of token ids into text increments, cutting at the first stop string.

    Text that could still become a stop string, or an incomplete UTF-8 sequence, is held back until
    the next token decides it, so a streamed client never sees text that is later cut.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str]) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned
        self.stopped = False

    def push(self, token_id: int, final: bool = False) -> str:
        """Add a token; return the newly safe text. Sets ``stopped`` when a stop string appears."""
        self.ids.append(token_id)
        text = self._decode(self.ids)
        for s in self._stop:
            cut = text.find(s, max(0, self.emitted - len(s)))
            if cut >= 0:
                self.stopped = True
                text = text[:cut]
        if self.stopped or final:
            safe = len(text)
        else:
            safe = len(text) - self._hold
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
        out = text[self.emitted : max(self.emitted, safe)]
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        """The held-back tail, once generation has ended for another reason (length, EOS)."""
        text = self._decode(self.ids)
        out = text[self.emitted :]
        self.emitted = len(text)
        return out
