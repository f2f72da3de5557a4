"""``VLLMEngine``: the ``engines.base.Engine`` protocol on vLLM's ``AsyncLLM`` (stock vLLM, our worker).

Per request: the compiled ops travel in ``SamplingParams.extra_args`` (``wire``), the prompt carries a
prefix-cache salt per spec, ``BankGate`` holds the request back until its vectors fit in the workers'
banks, and outputs come back as deltas (vLLM detokenises and applies stop strings). The EOS token is
dropped from the token ids (it counts in usage), as on the hf engine. Cancelling the iterator aborts the
request in vLLM (its bank rows are released by the worker), then frees its place at the gate.

Hidden states for ``actadd`` pairs and extraction are read through the serving engine itself: a
*capture request* (prompt only, one token, a salt of its own so that no prefix-cache hit skips a
position) whose prompt tokens the worker's read op copies into its capture buffer at every layer
(``runtime.capture``); the front end fetches them with ``steerserve_take_capture``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import torch

from steerserve.config import Settings
from steerserve.engines.base import (
    ENGINE_FAILED,
    WEIGHT_KINDS,
    GenerationOutput,
    GenerationRequest,
    Structured,
    TokenLogprob,
    failure,
)
from steerserve.engines.vllm.gate import BankGate
from steerserve.engines.vllm.plugin import engine_kwargs
from steerserve.engines.vllm.polls import FailurePoll, FigurePoll, rpc
from steerserve.engines.vllm.wire import EXTRA_KEY, Slotted, Weights, cache_salt, encode_ops, encode_weights
from steerserve.errors import EngineUnavailable, SteerError
from steerserve.model_info import ModelInfo
from steerserve.runtime.control_op import ControllerSlots
from steerserve.runtime.ops import NON_FINITE_CODE
from steerserve.runtime.plan import SteerOp
from steerserve.runtime.safeswitch import PILOT_TOKENS

log = logging.getLogger(__name__)


def eos_token_ids(path: Path, tokenizer: Any) -> set[int]:
    """EOS ids as the hf engine uses them: the generation config's and the tokenizer's."""
    from transformers import GenerationConfig

    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


class VLLMEngine:
    """Implements ``engines.base.Engine``; vLLM's engine core runs in its own process by default."""

    structured_outputs = True  # JSON schema / choice constrained decoding (vLLM's own backend)

    def __init__(self, path: Path, tokenizer: Any, info: ModelInfo, settings: Settings) -> None:
        self.path, self.tokenizer, self.info, self.settings = path, tokenizer, info, settings
        self.eos_ids = eos_token_ids(path, tokenizer)
        self.gate = BankGate(settings.bank_slots - 1)
        self.llm: Any = None
        self._poll: FailurePoll | None = None
        self._figures: FigurePoll | None = None
        self._capture_lock = asyncio.Lock()  # one capture request at a time: each fits the buffer alone
        # Worker slots of controllers, probe pairs and refusal heads (loaded once, named by requests).
        self.slots = {kind: ControllerSlots(settings.controller_slots) for kind in WEIGHT_KINDS}
        self._load_lock = asyncio.Lock()  # a slot's weights are in the worker before any request names it

    @property
    def bank_capacity(self) -> int:
        return self.gate.capacity

    def engine_args(self) -> dict[str, Any]:
        """The ``AsyncEngineArgs`` fields: ours first, the operator's ``engine_args`` on top."""
        s = self.settings
        args: dict[str, Any] = {
            "model": str(self.path), "served_model_name": self.info.name, "dtype": s.dtype,
            "max_model_len": self.info.max_model_len, "seed": 0,
            "generation_config": "vllm",  # sampling defaults come from each request, as on the hf engine
            "disable_log_stats": True,
            **engine_kwargs(bank_slots=s.bank_slots, max_interventions=s.max_interventions,
                            loop_slots=s.loop_slots, capture_tokens=s.capture_tokens,
                            controller_slots=s.controller_slots),
        }
        if s.max_batch is not None:
            args["max_num_seqs"] = s.max_batch
        args.update(s.engine_args)
        return args

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB of KV cache on CPU (vLLM's own variable)
        args = AsyncEngineArgs(**self.engine_args())
        log.info("starting vLLM (the first start compiles the model, 1-2 minutes on CPU; later starts reuse "
                 "vLLM's compile cache)")
        # Building the engine loads the model and compiles it (minutes on CPU): off the event loop.
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self._poll, self._figures = FailurePoll(self.llm), FigurePoll(self.llm)

    async def stop(self) -> None:
        llm, self.llm, self._poll, self._figures = self.llm, None, None, None
        if llm is not None:
            _fail_in_flight(llm)
            await asyncio.to_thread(llm.shutdown)

    async def health(self) -> bool:
        return self.llm is not None and not self.llm.errored

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    async def stats(self) -> dict[str, int]:
        """Requests in vLLM, and the first worker's bank (tensor-parallel workers hold identical banks)."""
        llm = self.llm
        if llm is None or llm.errored:
            raise RuntimeError("the engine is not running")
        worker = (await rpc(llm, "steerserve_stats"))[0]
        return {"running": llm.get_num_unfinished_requests(), **worker, **self.gate.stats()}

    def _params(self, request: GenerationRequest, slotted: dict[str, Slotted]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        return SamplingParams(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
            seed=None if s.seed is None else s.seed % 2**63, stop=list(s.stop) or None,
            stop_token_ids=None if s.ignore_eos else sorted(self.eos_ids), ignore_eos=s.ignore_eos,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            logit_bias=dict(s.logit_bias) or None, logprobs=s.logprobs, structured_outputs=_structured(s.structured),
            output_kind=RequestOutputKind.DELTA,
            extra_args={EXTRA_KEY: encode_ops(request.ops, request.loop, controller=slotted.get("controller"),
                                              probes=slotted.get("probes"), head=slotted.get("head"),
                                              logprobs=request.first_logprobs)}
            if request.wired else None,
        )

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationOutput, None]:
        from vllm.v1.engine.exceptions import EngineDeadError

        if not await self.health():
            raise EngineUnavailable()
        vectors = {op.vector.key: op.vector.rows for op in request.ops}
        prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_token_ids)}
        salt = cache_salt(request.ops, request.loop, None if request.controller is None else request.controller.key)
        if salt is not None:
            prompt["cache_salt"] = salt
        rid = request.request_id
        held = request.weights
        slotted: dict[str, Slotted] = {}
        try:
            for kind, w in held.items():
                slotted[kind] = (await self._load(kind, w), w.key)
            params = self._params(request, slotted)
            await self.gate.enter(rid, vectors)  # waits while the bank is full
        except EngineDeadError:  # died while this request's weights were being loaded
            self._release(held, slotted)
            raise EngineUnavailable(ENGINE_FAILED) from None
        except BaseException:
            self._release(held, slotted)
            raise
        llm, poll, figures, completion, checked = self.llm, self._poll, self._figures, 0, time.monotonic()
        asked: set[str] = set()
        stream = None
        try:
            if llm is None or llm.errored:  # died (or is restarting) while this request waited at the gate
                raise EngineUnavailable()
            stream = llm.generate(prompt, params, rid)
            async for out in stream:
                c = out.outputs[0]
                ids = tuple(c.token_ids)
                completion += len(ids)
                reason = c.finish_reason if out.finished else None
                if request.ops and poll is not None and (out.finished or time.monotonic() - checked > 1.0):
                    # After the step that produced this output: did a worker refuse this request's steering?
                    checked = time.monotonic()
                    why = (await poll.since(checked)).get(rid)
                    if why is not None:
                        yield failure(rid, len(request.prompt_token_ids), completion, why, 400, NON_FINITE_CODE)
                        return
                logprobs = _logprobs(ids, c.logprobs, request.sampling.logprobs)
                if reason == "stop" and ids and ids[-1] in self.eos_ids and c.stop_reason in (None, ids[-1]):
                    ids, logprobs = ids[:-1], logprobs[: len(ids) - 1]  # EOS ends the text; counted, not shown
                extra: dict[str, object] = {}
                if request.loop is not None and figures is not None and not out.finished:
                    loop = await figures.of(rid)  # the closed loop's figures, for the stream (as on hf)
                    if loop:
                        extra["loop"] = loop
                if out.finished and out.num_cached_tokens is not None:
                    extra["cached_tokens"] = out.num_cached_tokens  # prompt tokens served from the prefix cache
                probing = request.probes is not None and "probe" not in asked
                if probing and (out.finished or completion > PILOT_TOKENS) or out.finished and request.needs_cell:
                    # What its loop/controller/probes measured (read between steps): with probes, once the
                    # pilot tokens are out, so that the front end can decide what the client sees.
                    report = (await rpc(llm, "steerserve_loop_report", rid))[0] or {}
                    if probing:
                        asked.add("probe")
                        extra["probe"] = report
                    if out.finished and report:
                        extra["report"] = report
                if request.first_logprobs and "logprobs" not in asked and (completion or out.finished):
                    # Sampled by now (even when that token was EOS and ``ids`` is empty): the worker kept the row.
                    asked.add("logprobs")
                    raw = (await rpc(llm, "steerserve_take_logprobs", rid))[0]
                    if raw is None:
                        raise RuntimeError(f"request {rid}: the worker kept no first-token log-probabilities")
                    extra["first_logprobs"] = torch.frombuffer(bytearray(raw), dtype=torch.float32)
                yield GenerationOutput(rid, ids, c.text, reason, len(request.prompt_token_ids), completion, extra,
                                       logprobs)
        except ValueError as exc:  # vLLM refused the request when adding it: its structured-output schema
            so = request.sampling.structured
            if so is None or completion:
                raise
            yield failure(rid, len(request.prompt_token_ids), 0, f"vLLM's structured output refused it: {exc}", 400,
                          "invalid_structured_output", so.field)
        except EngineDeadError:
            log.error("request %s: the engine core died while it was in flight", rid)
            yield failure(rid, len(request.prompt_token_ids), completion, ENGINE_FAILED, 503, "engine_failed")
        finally:
            if stream is not None:
                try:
                    await stream.aclose()  # if we stopped early: vLLM aborts it (the worker frees its rows)
                except Exception:  # a dead engine has nothing left to abort
                    log.debug("closing the stream of %s failed", rid, exc_info=True)
            await self.gate.leave(rid)
            self._release(held, slotted)  # after vLLM finished or aborted it: the slots may be reused
            if poll is not None:
                poll.forget(rid)
            if figures is not None:
                figures.forget(rid)

    async def _load(self, kind: str, weights: Weights) -> int:
        """The worker slot holding ``weights`` (a ``kind``: controller, probes, head), loading them first if
        needed; 429 when every slot of that kind is held by requests in flight."""
        slots = self.slots[kind]
        async with self._load_lock:
            got = slots.acquire(weights.key)
            if got is None:
                raise SteerError(f"all {slots.capacity} {kind} slots are in use by other requests; retry shortly",
                                 field="steering", status=429, code="weight_slots_full")
            slot, load = got
            if load:
                try:
                    await rpc(self.llm, "steerserve_load", slot, encode_weights(weights))
                except BaseException:
                    slots.forget(weights.key)
                    raise
            return slot

    def _release(self, held: dict[str, Weights], slotted: dict[str, Slotted]) -> None:
        for kind in slotted:
            self.slots[kind].release(held[kind].key)

    async def set_route_capture(self, on: bool) -> None:
        """Record every request's routing (per MoE layer and position, after masking) from now on, or stop."""
        if self.llm is None:
            raise RuntimeError("the engine is not running")
        await rpc(self.llm, "steerserve_route_capture", on)

    async def take_routing(self, request_id: str) -> dict[str, Any] | None:
        """A finished request's recorded routing (``route_point.RouteCapture.take``), then forgotten."""
        if self.llm is None:
            raise RuntimeError("the engine is not running")
        got = (await rpc(self.llm, "steerserve_take_routing", request_id))[0]
        return None if got is None else dict(got)

    async def hidden_states(self, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                            ops: Sequence[SteerOp] = ()) -> list[torch.Tensor]:
        """States of each prompt at ``layers`` (unsteered, or steered by open-loop ``ops``), read by capture
        requests through vLLM itself."""
        limit = self.settings.capture_tokens
        for i, ids in enumerate(prompts):
            if len(ids) > limit:
                raise SteerError(f"prompt {i} is {len(ids)} tokens; hidden states are read for at most {limit}",
                                 field="prompts")
        from vllm.v1.engine.exceptions import EngineDeadError

        async with self._capture_lock:
            try:
                return [await self._capture(list(ids), list(layers), ops) for ids in prompts]
            except EngineDeadError:  # an actadd pair's or an extraction's capture: 503 as for any request
                log.error("a hidden-state capture was in flight when the engine core died")
                raise EngineUnavailable(ENGINE_FAILED) from None

    async def _capture(self, ids: list[int], layers: list[int], ops: Sequence[SteerOp] = ()) -> torch.Tensor:
        from vllm import SamplingParams

        llm = self.llm
        if llm is None or llm.errored:
            raise EngineUnavailable()
        rid = f"capture-{uuid.uuid4().hex}"
        params = SamplingParams(max_tokens=1, temperature=0.0,
                                extra_args={EXTRA_KEY: encode_ops(ops, capture=True)})
        await self.gate.enter(rid, {op.vector.key: op.vector.rows for op in ops})  # a steered capture pins rows
        try:
            async for _ in llm.generate({"prompt_token_ids": ids, "cache_salt": rid}, params, rid):
                pass
        finally:
            await self.gate.leave(rid)
        got = (await rpc(llm, "steerserve_take_capture", rid, layers))[0]
        if got is None:
            raise RuntimeError(f"capture {rid}: the worker returned no states")
        shape, raw = got
        states = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(*shape)  # [n, L, H]
        if states.shape[0] != len(ids):
            raise RuntimeError(f"capture {rid}: {states.shape[0]} of {len(ids)} positions were read")
        return states


def _fail_in_flight(llm: Any) -> None:
    """End every request the dead ``llm`` still holds with ``EngineDeadError``, as vLLM's output handler does
    when it sees the core die. Its own pass misses a request added at the moment of death (after the pass,
    before ``errored`` turned true), whose stream would otherwise wait forever."""
    from vllm.v1.engine.exceptions import EngineDeadError

    processor = getattr(llm, "output_processor", None)
    if processor is not None and processor.request_states:
        log.error("ending %d request(s) still bound to the stopped engine", len(processor.request_states))
        processor.propagate_error(EngineDeadError())


def _structured(structured: Structured | None) -> Any:
    """vLLM's ``StructuredOutputsParams`` for ``structured`` (its own backend compiles the grammar)."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if structured.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=json.loads(structured.value))


def _logprobs(ids: tuple[int, ...], got: Any, top: int | None) -> tuple[TokenLogprob, ...]:
    """vLLM's per-token ``{token id: Logprob}`` (the sampled token's and the ``top`` best, ranked from 1)
    as ours, one per token of ``ids``."""
    if top is None or not got:
        return ()
    out = []
    for tok, entry in zip(ids, got, strict=True):
        ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top)
        out.append(TokenLogprob(tok, float(entry[tok].logprob), tuple((t, float(lp)) for _, t, lp in ranked[:top])))
    return tuple(out)
