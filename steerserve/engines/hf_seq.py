"""One sequence of the hf engine: its request, what it holds, and its per-token work (sample, build an output).

The engine (``engines.hf``) owns the batch and the model; a ``Seq`` owns what only concerns its own request:
its sampling state (generator, the tokens the penalties count, the last token's log-probabilities) and
what its outputs carry (first-token distribution, closed-loop figures, probe scores after the pilot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from steerserve.engines.base import GenerationOutput, GenerationRequest, TokenLogprob
from steerserve.engines.sampling import Detokenizer, adjust, sample, token_logprob
from steerserve.engines.threaded import Emit
from steerserve.runtime.pins import Pin
from steerserve.runtime.registers import Registers
from steerserve.runtime.safeswitch import PILOT_TOKENS


@dataclass
class Seq:
    req: GenerationRequest
    emit: Emit
    detok: Detokenizer
    gen: torch.Generator | None
    pin: Pin | None = None  # its vectors in the bank, once admitted
    cell: int = 0  # its register cell (closed-loop or controlled requests), once admitted; 0 = none
    slots: dict[str, int] = field(default_factory=dict)  # kind (controller, probes, head) -> its slot
    probe_sent: bool = False  # the probes' scores went out (after the pilot tokens)
    first_logprobs: torch.Tensor | None = None  # [V] fp32, kept until the first output carries it
    generated: list[int] = field(default_factory=list)  # sampled tokens (the penalties count them)
    logprob: TokenLogprob | None = None  # the last sampled token's, when the request asks for logprobs
    pos: int = 0  # tokens in the KV cache = absolute position of the next input token
    last: int = 0  # last sampled token, the next input
    completion: int = 0
    done: bool = False

    @property
    def ctrl_slot(self) -> int:
        """Its controller's slot, once admitted; -1 = none."""
        return self.slots.get("controller", -1)

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from this row's ``logits [V]`` (penalties and bias applied first, log-probabilities
        kept from the model's own distribution); counted, and made the next input."""
        if not bool(torch.isfinite(logits).all()):  # never sample from NaN: say so instead
            raise RuntimeError("the model produced non-finite logits for this request")
        params = self.req.sampling
        tok = sample(adjust(logits, params, self.generated) if params.adjusts_logits else logits, params, self.gen)
        if params.logprobs is not None:
            self.logprob = token_logprob(logits, tok, params.logprobs)
        self.generated.append(tok)
        self.last, self.completion = tok, self.completion + 1
        return tok

    def output(self, ids: tuple[int, ...], text: str, reason: Any, regs: Registers) -> GenerationOutput:
        """An output of ``ids`` (the token just sampled, or none) with what rides on it."""
        logprobs = (self.logprob,) if ids and self.logprob is not None else ()
        out = GenerationOutput(self.req.request_id, ids, text, reason, len(self.req.prompt_token_ids),
                               self.completion, logprobs=logprobs)
        if self.first_logprobs is not None:
            out.extra["first_logprobs"], self.first_logprobs = self.first_logprobs, None
        figures = self.loop_figures(regs) if reason is None else None
        if figures:
            out.extra["loop"] = figures
        if self.req.probes is not None and not self.probe_sent and self.completion > PILOT_TOKENS and reason is None:
            self.probe_sent = True  # the pilot is out: the scores, for the front end to decide what the client sees
            out.extra["probe"] = regs.report(self.cell)
        return out

    def loop_figures(self, regs: Registers) -> dict[str, float] | None:
        """A closed loop's figures at its latest token, for the stream: the entropy it measured (bits; with
        options, the last decision's) and the gain it set for the next token; None without a loop.
        Sampling has synced with the device already: two scalar reads."""
        if self.req.loop is None or not self.cell:
            return None
        return {"entropy_bits": float(regs.entropy[self.cell]), "gain": float(regs.gain[self.cell])}
