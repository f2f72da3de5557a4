"""The engine protocol: what the API layer may ask of any engine (``hf.HFEngine``, ``vllm.engine.VLLMEngine``)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from steerserve.model_info import ModelInfo
from steerserve.runtime.controller import ControllerWeights
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.plan import SteerOp
from steerserve.runtime.safeswitch import HeadDelta, ProbePair

FinishReason = Literal["stop", "length", "abort"]
WEIGHT_KINDS = ("controller", "probes", "head")  # weights an engine loads into slots ahead of the requests


@dataclass(frozen=True)
class Structured:
    """Constrained decoding, done by vLLM's own structured-output backend (the hf engine has none).

    ``kind`` is ``json`` (``value``: a JSON schema as JSON text) or ``json_object`` (any JSON object;
    ``value`` empty).
    """

    kind: Literal["json", "json_object"]
    value: str = ""
    field: str = "response_format"  # the request field that asked for it, named by an error about it


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever the model emits (benchmarks)
    # OpenAI's: subtracted from a token's logit once it has been generated (presence) and per time (frequency).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    # Per generated token: its log-probability and the ``logprobs`` most likely tokens' (0: the sampled
    # token's alone). Computed from the model's own distribution (after steering and any head, before
    # penalties, bias and temperature), as vLLM's default ``raw_logprobs`` mode does.
    logprobs: int | None = None
    structured: Structured | None = None

    @property
    def adjusts_logits(self) -> bool:
        """Whether anything changes the logits between the model and the sampler."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    ops: tuple[SteerOp, ...] = ()  # compiled steering, positions already absolute
    loop: LoopSpec | None = None  # closed loop on the request's gain register (its ``gain`` ops)
    controller: ControllerWeights | None = None  # refusal controller: decides its per-layer gains in-graph
    probes: ProbePair | None = None  # SafeSwitch probes: read at the last prompt token and after the pilot
    head: HeadDelta | None = None  # refusal head: this request's logits get the head's delta
    # Return the whole first next-token distribution (fp32 log-softmax ``[V]``, after the steering and the
    # head, before sampling) in the first output's ``extra["first_logprobs"]`` (the upload KL vetting).
    first_logprobs: bool = False

    @property
    def needs_cell(self) -> bool:
        """Whether the request holds a register cell (a closed loop, a controller, probes) for its lifetime."""
        return self.loop is not None or self.controller is not None or self.probes is not None

    @property
    def weights(self) -> dict[str, ControllerWeights | ProbePair | HeadDelta]:
        """The weights the request needs loaded in an engine slot, by kind (``WEIGHT_KINDS``)."""
        have = {"controller": self.controller, "probes": self.probes, "head": self.head}
        return {kind: w for kind, w in have.items() if w is not None}

    @property
    def wired(self) -> bool:
        """Whether the engine's worker must know of the request (anything beyond plain generation)."""
        return bool(self.ops) or self.needs_cell or self.head is not None or self.first_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens' at its position (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationOutput:
    """One increment of a request's output; the last one has ``finish_reason`` set."""

    request_id: str
    token_ids: tuple[int, ...]  # new tokens since the previous increment
    text: str  # new text since the previous increment (stop strings already cut)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    extra: dict[str, object] = field(default_factory=dict)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of ``token_ids`` when the request asked for them


ENGINE_FAILED = "the engine failed while this request was in flight; retry"


def failure(request_id: str, prompt_tokens: int, completion: int, error: str, status: int = 500,
            code: str = "generation_failed", field: str = "steering") -> GenerationOutput:
    """A failed request's last output: ``finish_reason="abort"``, the error (with the HTTP status and code the
    edge answers) in ``extra``. 4xx: the client's own doing (e.g. its steering overflowed); 503: the engine
    died; 500: anything else (the message stays in the log). ``field``: what a 4xx names."""
    return GenerationOutput(request_id, (), "", "abort", prompt_tokens, completion,
                            {"error": error, "status": status, "code": code, "field": field})


class Engine(Protocol):
    """Batches and generates. Implementations own a thread or process; all methods are async-safe."""

    info: ModelInfo

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationOutput, None]:
        """Queue ``request`` and stream its outputs. Cancelling the iterator aborts the request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def health(self) -> bool: ...

    async def stats(self) -> dict[str, int]:
        """Now: ``running`` (requests in the engine, waiting or generating), ``steered`` (holding bank
        rows), and the vector bank's ``pinned_rows``, ``cached_rows``, ``capacity``, ``compactions``."""
        ...

    async def hidden_states(self, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                            ops: Sequence[SteerOp] = ()) -> list[torch.Tensor]:
        """Residual stream of each prompt: one ``[len(prompt), len(layers), hidden]`` fp32 tensor each, unsteered,
        or steered by open-loop ``ops`` (at their absolute positions; read after the layer's steering)."""
        ...
