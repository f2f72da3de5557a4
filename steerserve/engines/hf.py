"""The transformers reference engine: continuous batching on one thread, steering by the runtime ops.

The loop (one iteration per model step): take commands (new requests, aborts, jobs) -> admit waiting
requests whose vectors fit in the bank, prefilling each alone -> one decode step for every active
sequence in a left-padded batch -> postprocess (sample, detokenise, stop, emit). Requests join and
leave between decode steps; requests with different steering share the batch through the tables.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from steerserve.anatomy import anatomy_of, hf_layers, hf_norm, hf_router
from steerserve.config import Settings
from steerserve.engines.base import (
    ENGINE_FAILED,
    WEIGHT_KINDS,
    GenerationOutput,
    GenerationRequest,
    failure,
)
from steerserve.engines.hf_seq import Seq as _Seq
from steerserve.engines.kvbatch import KVBatch
from steerserve.engines.sampling import Detokenizer, make_generator
from steerserve.engines.threaded import Emit, EngineThread
from steerserve.errors import EngineUnavailable
from steerserve.model_info import ModelInfo
from steerserve.runtime.bank import VectorBank
from steerserve.runtime.capture import Read
from steerserve.runtime.control_op import ControllerSlots, ControllerUnit
from steerserve.runtime.head_point import HeadPoint, load_slot
from steerserve.runtime.hooks import RouteHooks, SteeringHooks, capture_hidden_states
from steerserve.runtime.ops import NON_FINITE, NON_FINITE_CODE
from steerserve.runtime.pins import Pin
from steerserve.runtime.plan import SteerOp
from steerserve.runtime.registers import Registers, entropy_step_
from steerserve.runtime.route_point import RouteCapture
from steerserve.runtime.safeswitch import PILOT_TOKENS
from steerserve.runtime.tables import Segment, StepTables

log = logging.getLogger(__name__)


class HFEngine(EngineThread):
    """Implements ``engines.base.Engine`` on a transformers causal LM."""

    structured_outputs = False  # JSON schema / choice constrained decoding (vLLM's own backend)

    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo, settings: Settings) -> None:
        self.model, self.tokenizer, self.info, self.settings = model.eval(), tokenizer, info, settings
        self.layers = hf_layers(model)
        self.bank = VectorBank(settings.bank_slots, info.hidden_size, dtype=model.dtype)
        self.max_batch = settings.max_batch or 16
        self.tables = StepTables(info.num_layers, max(settings.max_prompt_tokens, self.max_batch),
                                 settings.max_interventions)
        self.regs = Registers(settings.loop_slots, info.num_layers)
        self.ctrl = ControllerUnit(settings.controller_slots, self.regs.sink + 1, info.num_layers, info.hidden_size,
                                   settings.loop_slots)
        self.head = HeadPoint(settings.controller_slots, info.hidden_size, info.vocab_size, self.max_batch,
                              self.regs.sink)
        # Slots of controllers, probe pairs and refusal heads, by content key (loaded on admission).
        self.slots = {kind: ControllerSlots(settings.controller_slots) for kind in WEIGHT_KINDS}
        self.hooks = SteeringHooks(self.layers, self.bank, self.tables, self.ctrl, self.regs)
        # The router point (MoE models): expert masks from the ROUTE table; routing capture for tests and tools.
        self.route_capture = RouteCapture()
        moe = info.moe
        self.route_hooks = None if moe is None else RouteHooks(
            {i: hf_router(model, i) for i in moe.layers}, moe.num_experts, moe.renormalize, self.bank, self.tables,
            self.route_capture, anatomy_of(info.architecture).router_out)
        self._normed: torch.Tensor | None = None  # [B, S, H] the final norm's output of the last forward
        hf_norm(model).register_forward_hook(self._keep_normed)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []  # row i of self._kv
        self._kv = KVBatch()
        super().__init__()

    # ---- async API (any thread's event loop) ----
    async def start(self) -> None:
        """Start the engine thread; after a crash of the last one, first end what it left in flight with
        an error (commands still in the inbox, i.e. requests not yet taken, are served by the new thread)."""
        if self._thread is not None and not self._thread.is_alive():
            for seq in [*self._active, *self._waiting]:
                self._finish(seq, "abort", error=ENGINE_FAILED, status=503, code="engine_failed")
            self._active, self._waiting, self._kv = [], deque(), KVBatch()
        self._thread = threading.Thread(target=self._run, name="steerserve-hf-engine", daemon=True)
        self._thread.start()

    async def hidden_states(self, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                            ops: Sequence[SteerOp] = ()) -> list[torch.Tensor]:
        return await asyncio.wrap_future(self.call(lambda: self._hidden_states(prompts, layers, ops)))

    async def stats(self) -> dict[str, int]:
        def stats() -> dict[str, int]:
            steered = sum(1 for s in self._active if s.pin is not None and s.pin.keys)
            return {"running": len(self._active) + len(self._waiting), "steered": steered,
                    "loop_slots": self.regs.in_use, **self.bank.stats()}

        return dict(await asyncio.wrap_future(self.call(stats)))

    @property
    def bank_capacity(self) -> int:
        return self.bank.capacity

    async def set_route_capture(self, on: bool) -> None:
        """Record every request's routing (per MoE layer and position, after masking) from now on, or stop."""
        self.route_capture.on = on

    async def take_routing(self, request_id: str) -> dict[str, Any] | None:
        """A finished request's recorded routing (``RouteCapture.take``), then forgotten."""
        return await asyncio.wrap_future(self.call(lambda: self.route_capture.take(request_id)))

    # ---- engine thread ----
    def _run(self) -> None:
        with torch.inference_mode():
            while self._commands(block=not (self._active or self._waiting)):
                try:
                    self._admit()
                    if self._active:
                        self._decode()
                except Exception as exc:  # keep serving: fail the requests in flight, not the server
                    log.exception("engine step failed")
                    for seq in [*self._active, *self._waiting]:
                        self._finish(seq, "abort", error=str(exc))
                    self._active, self._kv = [], KVBatch()
                    self._waiting.clear()

    def _add(self, req: GenerationRequest, emit: Emit) -> None:
        try:
            gen = make_generator(req.sampling)
        except Exception as exc:  # a bad request fails alone; the engine thread must survive
            emit(GenerationOutput(req.request_id, (), "", "abort", extra={"error": str(exc)}))
            return
        self._waiting.append(_Seq(req, emit, Detokenizer(self._decode_text, req.sampling.stop), gen))

    def _stop_all(self) -> None:
        for seq in [*self._active, *self._waiting]:
            self._finish(seq, "abort")

    def _abort(self, request_id: str) -> None:
        for seq in [*self._waiting, *self._active]:
            if seq.req.request_id == request_id and not seq.done:
                self._finish(seq, "abort")
        self._waiting = deque(s for s in self._waiting if not s.done)
        self._drop_done()

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.max_batch:
            seq = self._waiting[0]
            try:
                pin = Pin.acquire(self.bank, seq.req.ops, self.tables.slots)
            except ValueError as exc:  # more ops on one layer than the tables hold: this request fails alone
                self._waiting.popleft()
                self._finish(seq, "abort", error=str(exc))
                continue
            if pin is None:
                return  # the bank is full of vectors in use: wait for a request to finish
            if seq.req.needs_cell:
                cell = self.regs.open(seq.req.loop, controlled=seq.req.controller is not None)
                if cell is None:  # the front end admits at most loop_slots closed-loop requests: not reached
                    pin.release(self.bank)
                    return
                seq.cell = cell
            self._waiting.popleft()
            seq.pin = pin
            if not self._take_slots(seq):
                continue
            self._prefill(seq)

    def _take_slots(self, seq: _Seq) -> bool:
        """Give ``seq`` the slots of its controller, probes and head (loading weights a slot does not hold);
        False (and the request ended with a 429) when every slot of a kind is held by requests in flight."""
        for kind, weights in seq.req.weights.items():
            got = self.slots[kind].acquire(weights.key)
            if got is None:
                self._finish(seq, "abort", error=f"all {self.slots[kind].capacity} {kind} slots are in use by other "
                             "requests; retry shortly", status=429, code="weight_slots_full")
                return False
            slot, load = got
            seq.slots[kind] = slot
            if load:
                load_slot(self.ctrl, self.head, slot, weights)
        return True

    def _layer_gain(self, seqs: Sequence[_Seq]) -> torch.Tensor | None:
        """The per-layer gains, for a step with a controlled request (None: every op's layer gain is 1)."""
        return self.regs.layer_gain if any(s.ctrl_slot >= 0 for s in seqs) else None

    def _keep_normed(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self._normed = output

    def _head_point(self, seqs: Sequence[_Seq], logits: torch.Tensor, first: bool) -> None:
        """The head point on this forward's sampled rows (``logits [B, V]``, in place): stage-1 probes at a
        prefill (``first``), stage-2 probes after the pilot, heads' deltas on their rows."""
        probes, heads = [], []
        for i, s in enumerate(seqs):
            if "probes" in s.slots and (first or s.pos == len(s.req.prompt_token_ids) + PILOT_TOKENS - 1):
                probes.append((i, s.cell, s.slots["probes"], 0 if first else 1))
            if "head" in s.slots:
                heads.append((i, s.slots["head"]))
        if not probes and not heads:
            return
        assert self._normed is not None
        self.head.fill(probes, heads)
        self.head.apply(self._normed[:, -1], logits, self.regs)
        self.head.fill([], [])

    def _prefill(self, seq: _Seq) -> None:
        """The prompt's forward pass, alone. Whatever goes wrong fails this request only: it answers with
        an error and releases its bank rows; the batch in flight is not touched."""
        try:
            ids = torch.tensor([seq.req.prompt_token_ids])
            n = ids.shape[1]
            segments = [self._segment(seq, 0, n)]
            self.tables.fill(n, segments, self.bank.weight, self.regs.gain, self._layer_gain([seq]))
            # A controlled request: its controller reads the last prompt token in this forward pass.
            self.ctrl.fill([(n - 1, seq.cell, seq.ctrl_slot)] if seq.ctrl_slot >= 0 else [])
            self.route_capture.begin([Read(seq.req.request_id, 0, 0, n)] if self.route_capture.on else [])
            try:
                out = self.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
            finally:
                self.ctrl.fill([])
            if self.tables.flagged(segments):
                return self._refuse(seq)
            self._head_point([seq], out.logits[:, -1], first=True)
            if seq.cell:  # the first token's distribution sets the gain of the first decode step
                entropy_step_(self.regs, out.logits[0, -1:], torch.tensor([seq.cell]))
            seq.pos = n
            if seq.req.first_logprobs:  # after the head point: what the request samples from
                seq.first_logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            self._token(seq, out.logits[0, -1])
        except Exception as exc:
            log.exception("request %s failed in prefill", seq.req.request_id)
            return self._finish(seq, "abort", error=str(exc) or type(exc).__name__)
        if not seq.done:
            self._kv.join(out.past_key_values)
            self._active.append(seq)

    def _decode(self) -> None:
        seqs = self._active
        ids = torch.tensor([[s.last] for s in seqs])
        positions = torch.tensor([[s.pos] for s in seqs])
        mask = torch.cat([self._kv.mask, torch.ones(len(seqs), 1, dtype=torch.long)], dim=1)
        segments = [self._segment(s, i, 1) for i, s in enumerate(seqs)]
        self.tables.fill(len(seqs), segments, self.bank.weight, self.regs.gain, self._layer_gain(seqs))
        self.route_capture.begin([Read(s.req.request_id, i, s.pos, 1) for i, s in enumerate(seqs)]
                                 if self.route_capture.on else [])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=self._kv.cache(), use_cache=True)
        self._kv.after_step(out.past_key_values)
        self._head_point(seqs, out.logits[:, -1], first=False)
        if any(s.cell for s in seqs):  # closed loops: decide the next step's gains from these logits
            cells = torch.tensor([s.cell or self.regs.sink for s in seqs])
            entropy_step_(self.regs, out.logits[:, -1], cells)
        for i in self.tables.flagged(segments):
            self._refuse(seqs[i])
        for i, seq in enumerate(seqs):
            if seq.done:
                continue
            seq.pos += 1
            try:  # a failure in one row's sampling or detokenising ends that request alone
                self._token(seq, out.logits[i, -1])
            except Exception as exc:
                log.exception("request %s failed while sampling", seq.req.request_id)
                self._finish(seq, "abort", error=str(exc) or type(exc).__name__)
        self._drop_done()

    def _refuse(self, seq: _Seq) -> None:
        """End a request whose steering the op refused (non-finite); its rows kept their unsteered values."""
        log.warning("request %s: %s", seq.req.request_id, NON_FINITE)
        self._finish(seq, "abort", error=NON_FINITE, status=400, code=NON_FINITE_CODE)

    def _segment(self, seq: _Seq, offset: int, count: int) -> Segment:
        assert seq.pin is not None
        return Segment(offset, seq.pos, count, seq.pin.placement(self.bank), seq.cell)

    def _token(self, seq: _Seq, logits: torch.Tensor) -> None:
        """Sample, detokenise, decide whether the sequence is finished, and emit."""
        tok = seq.sample(logits)
        if tok in self.eos_ids and not seq.req.sampling.ignore_eos:
            return self._finish(seq, "stop", text=seq.detok.flush())
        text = seq.detok.push(tok)
        if seq.detok.stopped:
            return self._finish(seq, "stop", text=text, token=tok)
        if seq.completion >= seq.req.sampling.max_tokens or seq.pos + 1 >= self.info.max_model_len:
            return self._finish(seq, "length", text=text + seq.detok.flush(), token=tok)
        seq.emit(self._output(seq, (tok,), text, None))

    def _finish(self, seq: _Seq, reason: str, text: str = "", token: int | None = None,
                error: str | None = None, status: int = 500, code: str = "generation_failed") -> None:
        if seq.done:
            return
        seq.done = True
        if seq.pin is not None:
            seq.pin.release(self.bank)
        for kind, weights in seq.req.weights.items():
            if kind in seq.slots:
                self.slots[kind].release(weights.key)
        report = {}
        figures = seq.loop_figures(self.regs)  # before close() resets the cell
        if seq.cell:
            report = self.regs.report(seq.cell)
            self.regs.close(seq.cell)
        if error:
            return seq.emit(failure(seq.req.request_id, len(seq.req.prompt_token_ids), seq.completion, error,
                                    status, code))
        out = self._output(seq, (token,) if token is not None else (), text, reason)
        if figures:
            out.extra["loop"] = figures
        if report:
            out.extra["report"] = report
        if seq.req.probes is not None and not seq.probe_sent:
            out.extra["probe"] = report
        seq.emit(out)

    def _drop_done(self) -> None:
        rows = [i for i, s in enumerate(self._active) if s.done]
        if rows:
            self._kv.leave(rows)
            self._active = [s for s in self._active if not s.done]

    def _output(self, seq: _Seq, ids: tuple[int, ...], text: str, reason: Any) -> GenerationOutput:
        return seq.output(ids, text, reason, self.regs)

    def _decode_text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _hidden_states(self, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                       ops: Sequence[SteerOp] = ()) -> list[torch.Tensor]:
        self.route_capture.begin([])
        pin = Pin.acquire(self.bank, ops, self.tables.slots)
        if pin is None:
            raise EngineUnavailable("the vector bank is full with requests in flight; retry")
        try:
            out = []
            for ids in prompts:  # the op's tables laid out over this prompt (none: unsteered)
                placement = pin.placement(self.bank)
                self.tables.fill(len(ids), [Segment(0, 0, len(ids), placement)] if ops else [], self.bank.weight)
                out += capture_hidden_states(self.model, [ids], layers)
            return out
        finally:
            pin.release(self.bank)
            self.tables.fill(0, [])
