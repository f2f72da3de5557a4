"""vLLM worker classes that steer: named by ``parallel_config.worker_cls`` (see ``plugin.engine_kwargs``).

Hooks into vLLM 0.32's V1 model runner (``vllm/v1/worker/gpu_model_runner.py``, which
``cpu_model_runner.CPUModelRunner`` subclasses), by giving the runner instance a subclass with two
overrides, both calling the stock method first:

- ``_update_states(scheduler_output)``: the per-request lifecycle. ``finished_req_ids`` (finished and
  aborted) release their bank rows *before* ``scheduled_new_reqs`` acquire theirs (a request's rows stay
  pinned across preemption and resumption: only ``finished_req_ids`` releases them). New requests'
  specs come from ``NewRequestData.sampling_params.extra_args["steerserve"]``.
- ``_prepare_inputs(scheduler_output, num_scheduled_tokens)``: the step's flat token layout is known
  after it: request ``i`` of ``input_batch.req_ids`` owns flat tokens
  ``query_start_loc.np[i] : query_start_loc.np[i+1]`` at absolute positions starting at
  ``input_batch.num_computed_tokens_cpu[i]`` (vLLM's own ``positions`` are computed the same way), so it
  is exactly a ``runtime.tables.Segment``. Chunked prefill and prefix-cache hits just give
  ``first > 0``. Tokens beyond the step's count (padding) are never steered by the op.
- ``execute_model``: after the forward pass of a steered step, the requests with a token the op refused
  (its steering would have made the residual stream non-finite: ``runtime.ops.steer_guarded_``) lose
  their steering for the rest of their life and are reported through ``steerserve_take_failed``; the
  front end ends them with an error. Their KV, like everyone else's, stays finite.
- ``_sample`` / ``_bookkeeping_sync``: vLLM 0.32 rewinds a seeded request's generator after sampling a
  token it discards (a partial prefill chunk) with ``Generator.set_offset``, which CPU generators do not
  have: the engine core died (``CPU Generator does not use offset``). For CPU generators we save the
  state before sampling and restore it instead, and hide them from the stock rewind.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from steerserve.config import Settings
from steerserve.engines.vllm import ops as steer_ops
from steerserve.engines.vllm.plugin import decoder_layers, route_moe_layers, steer_decoder_layers
from steerserve.engines.vllm.rpc import SteerRPC
from steerserve.engines.vllm.wire import from_extra_args
from steerserve.model import moe_info
from steerserve.runtime.bank import VectorBank
from steerserve.runtime.capture import CaptureBuffer, Captures, Read
from steerserve.runtime.control_op import ControllerUnit
from steerserve.runtime.head_point import HeadPoint
from steerserve.runtime.ops import NON_FINITE
from steerserve.runtime.pins import Pin
from steerserve.runtime.registers import Registers, entropy_step_
from steerserve.runtime.safeswitch import PILOT_TOKENS
from steerserve.runtime.tables import Segment, StepTables

log = logging.getLogger(__name__)


class SteeringRunnerMixin:
    """Mixed in front of the runner's class (MRO: ours, then ``CPUModelRunner``/``GPUModelRunner``)."""

    # what the base runner provides (typed loosely: vLLM's runner is not a typed dependency here)
    input_batch: Any
    query_start_loc: Any
    _steer_reqs: dict[str, Pin]  # req_id -> its vectors in the bank and its ops' placement
    _steer_step: list[tuple[str, Segment]]  # this step's steered requests, as laid out in the tables
    _steer_failed: dict[str, str]  # req_id -> why its steering was refused (until the front end takes it)
    _steer_cells: dict[str, int]  # req_id -> register cell of a closed-loop or controlled request
    _steer_ctrl: dict[str, tuple[int, int]]  # req_id -> (controller slot, prompt length) of a controlled request
    _steer_probe: dict[str, tuple[int, int]]  # req_id -> (probe slot, prompt length): SafeSwitch probes
    _steer_head: dict[str, int]  # req_id -> head slot: its logits get the refusal head's delta
    _steer_reports: dict[str, dict[str, float | None]]  # finished closed-loop req_id -> what its loop measured
    _steer_rows: torch.Tensor | None  # this step's register cell per batch row (closed loops), else None
    _capture_reqs: set[str]  # capture requests in flight
    _lp_reqs: set[str]  # requests whose first next-token log-softmax is kept (``Wired.logprobs``), until sampled
    _first_lp: dict[str, torch.Tensor]  # req_id -> that log-softmax [V] fp32 (CPU), until the front end takes it
    _captures: Captures
    _rewound: dict[int, torch.Generator]  # batch index -> CPU generator restored after a discarded sample
    discard_request_mask: Any

    def _update_states(self, scheduler_output: Any) -> Any:
        state = steer_ops.current()
        if state is not None:
            for req_id in scheduler_output.finished_req_ids:
                pin = self._steer_reqs.pop(req_id, None)
                if pin is not None:
                    pin.release(state.bank)
                cell = self._steer_cells.pop(req_id, None)
                if cell is not None:  # a host read, between steps: what the response reports
                    self._steer_reports[req_id] = state.regs.report(cell)
                    state.regs.close(cell)
                    _forget_oldest(self._steer_reports)
                self._capture_reqs.discard(req_id)
                self._lp_reqs.discard(req_id)
                self._steer_ctrl.pop(req_id, None)
                self._steer_probe.pop(req_id, None)
                self._steer_head.pop(req_id, None)
            for new in scheduler_output.scheduled_new_reqs:
                params = new.sampling_params
                wired = from_extra_args(params.extra_args if params is not None else None)
                if wired.capture:
                    self._capture_reqs.add(new.req_id)
                if wired.logprobs:
                    self._lp_reqs.add(new.req_id)
                n_prompt = len(new.prompt_token_ids or ())
                for got, keys, into in ((wired.controller, state.ctrl.keys, self._steer_ctrl),
                                        (wired.probes, state.head.probe_keys, self._steer_probe)):
                    if got is not None:
                        into[new.req_id] = (_slot(new.req_id, got, keys), n_prompt)
                if wired.head is not None:
                    self._steer_head[new.req_id] = _slot(new.req_id, wired.head, state.head.head_keys)
                if wired.needs_cell and new.req_id not in self._steer_cells:
                    cell = state.regs.open(wired.loop, controlled=wired.controller is not None)
                    if cell is None:  # the front end admits at most loop_slots of them (engines.slots)
                        raise RuntimeError(f"request {new.req_id}: no free closed-loop register slot")
                    self._steer_cells[new.req_id] = cell
                ops = wired.ops
                if not ops or new.req_id in self._steer_reqs:
                    continue
                pin = Pin.acquire(state.bank, ops, state.tables.slots)
                if pin is None:
                    # Cannot happen behind steerserve's front end: it admits a request only when the rows
                    # pinned by requests in flight plus its own fit (``engine.BankGate``), and the bank
                    # compacts rather than fail on fragmentation. A bare vLLM client gets this error.
                    raise RuntimeError(f"request {new.req_id}: its vectors do not fit in the steering bank")
                self._steer_reqs[new.req_id] = pin
        return super()._update_states(scheduler_output)  # type: ignore[misc]

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)  # type: ignore[misc]
        state = steer_ops.current()
        if state is None:
            return out
        batch = self.input_batch
        starts = self.query_start_loc.np  # [num_reqs + 1] flat offsets, filled by the stock method
        computed = batch.num_computed_tokens_cpu  # [max_reqs] absolute position of each first token
        step, reads, ctrl_reads, probe_rows, head_rows, routed = [], [], [], [], [], []
        cells = self._steer_cells
        rows = np.full(batch.num_reqs, state.regs.sink, dtype=np.int64) if cells else None
        for i, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
            pin = self._steer_reqs.get(req_id)
            cell = cells.get(req_id, 0)
            if pin is not None:
                step.append((req_id, Segment(int(starts[i]), int(computed[i]), int(num_scheduled_tokens[i]),
                                             pin.placement(state.bank), cell)))
            if rows is not None and cell:
                rows[i] = cell
            ctrl = self._steer_ctrl.get(req_id)
            if ctrl is not None:  # its controller reads the last prompt token, in the step that has it
                last = ctrl[1] - 1 - int(computed[i])
                if 0 <= last < int(num_scheduled_tokens[i]):
                    ctrl_reads.append((int(starts[i]) + last, cell, ctrl[0]))
            probe = self._steer_probe.get(req_id)
            if probe is not None:  # SafeSwitch: stage 1 at the last prompt token, stage 2 after the pilot
                sampled = int(computed[i]) + int(num_scheduled_tokens[i]) - 1  # position of the sampled row
                for stage, at in enumerate((probe[1] - 1, probe[1] + PILOT_TOKENS - 1)):
                    if sampled == at:
                        probe_rows.append((i, cell, probe[0], stage))
            head = self._steer_head.get(req_id)
            if head is not None:
                head_rows.append((i, head))
            if req_id in self._capture_reqs:
                reads.append(Read(req_id, int(starts[i]), int(computed[i]), int(num_scheduled_tokens[i])))
            if state.route_capture.on:
                routed.append(Read(req_id, int(starts[i]), int(computed[i]), int(num_scheduled_tokens[i])))
        total = int(scheduler_output.total_num_scheduled_tokens)
        state.route_capture.begin(routed)
        if step or state.tables.active:  # skip the table work on all-unsteered steps
            controlled = any(req_id in self._steer_ctrl for req_id, _ in step)
            state.tables.fill(total, [seg for _, seg in step], state.bank.weight, state.regs.gain,
                              state.regs.layer_gain if controlled else None)
        if ctrl_reads or state.ctrl.active:
            state.ctrl.fill(ctrl_reads)
        if probe_rows or head_rows or state.head.active:
            state.head.fill(probe_rows, head_rows)
        if reads or state.capture.active:
            for r in state.capture.fill(total, reads):
                log.warning("steerserve: capture of %s skipped this step (the buffer is full)", r.request)
        self._steer_step = step
        self._steer_rows = None if rows is None else torch.from_numpy(rows).to(state.regs.gain.device)
        return out

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        out = super().execute_model(*args, **kwargs)  # type: ignore[misc]
        state = steer_ops.current()
        if state is not None and state.capture.active:  # after the forward: copy the read rows out
            self._captures.add(state.capture.collect())
        step, self._steer_step = self._steer_step, []
        if state is not None and step:
            for i in state.tables.flagged([seg for _, seg in step]):
                req_id = step[i][0]
                pin = self._steer_reqs.pop(req_id, None)
                if pin is not None:  # unsteered from now on: its next steps cannot be refused again
                    pin.release(state.bank)
                log.warning("steerserve: request %s: steering made the residual stream non-finite; "
                            "its steering is dropped and the front end will end it", req_id)
                self._steer_failed[req_id] = NON_FINITE
                _forget_oldest(self._steer_failed)
        return out

    def _sample(self, logits: Any, *args: Any, **kwargs: Any) -> Any:
        state = steer_ops.current()
        num_reqs = self.input_batch.num_reqs
        if state is not None and self._steer_rows is not None and logits is not None:
            # Closed loops: the next step's gains from these logits, on the device. A row whose sample is
            # discarded (a partial prefill chunk) writes into the sink instead of its request's cell.
            rows = self._steer_rows.masked_fill(
                torch.from_numpy(self.discard_request_mask.np[:num_reqs].astype(bool)).to(logits.device),
                state.regs.sink)
            entropy_step_(state.regs, logits[:num_reqs], rows)
        if self._lp_reqs and logits is not None:
            self._keep_first_logprobs(logits[:num_reqs])
        return self._sample_restoring_cpu_generators(logits, *args, **kwargs)

    def _keep_first_logprobs(self, logits: torch.Tensor) -> None:
        """``logits [num_reqs, V]`` (the head's delta already in): keep the first row each asking request
        really samples (a partial prefill chunk's row is discarded, so it is not that row)."""
        discarded = self.discard_request_mask.np
        for i, req_id in enumerate(self.input_batch.req_ids[: logits.shape[0]]):
            if req_id in self._lp_reqs and not discarded[i]:
                self._lp_reqs.discard(req_id)
                self._first_lp[req_id] = torch.log_softmax(logits[i].float(), dim=-1).cpu()
                _forget_oldest(self._first_lp, 256)

    def _sample_restoring_cpu_generators(self, *args: Any, **kwargs: Any) -> Any:
        gens = self.input_batch.generators  # batch index -> torch.Generator (seeded requests)
        num_reqs = self.input_batch.num_reqs
        saved = {}
        for i in np.nonzero(self.discard_request_mask.np[:num_reqs])[0]:
            gen = gens.get(int(i))
            if gen is not None and gen.device.type == "cpu":
                saved[int(i)] = (gen, gen.get_state())
        out = super()._sample(*args, **kwargs)  # type: ignore[misc]
        for gen, rng in saved.values():
            gen.set_state(rng)  # as if the discarded token had never been drawn
        self._rewound = {i: gen for i, (gen, _) in saved.items()}
        return out

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any) -> Any:
        gens = self.input_batch.generators
        hidden = {i: gens.pop(i) for i in self._rewound if i in gens}
        self._rewound = {}
        try:
            return super()._bookkeeping_sync(*args, **kwargs)  # type: ignore[misc]
        finally:
            gens.update(hidden)


_RUNNER_CLASSES: dict[type, type] = {}


def _steer_runner(runner: Any) -> None:
    cls = type(runner)
    if not hasattr(cls, "_prepare_inputs") or not hasattr(cls, "_update_states"):
        raise RuntimeError(f"{cls.__name__} is not vLLM's V1 model runner; steering needs it "
                           "(set VLLM_USE_V2_MODEL_RUNNER=0 on GPU)")
    if cls not in _RUNNER_CLASSES:
        _RUNNER_CLASSES[cls] = type(f"Steering{cls.__name__}", (SteeringRunnerMixin, cls), {})
    runner.__class__ = _RUNNER_CLASSES[cls]
    runner._steer_reqs, runner._steer_step, runner._steer_failed, runner._rewound = {}, [], {}, {}
    runner._steer_cells, runner._steer_reports, runner._steer_rows, runner._steer_ctrl = {}, {}, None, {}
    runner._steer_probe, runner._steer_head = {}, {}
    runner._capture_reqs, runner._captures = set(), Captures()
    runner._lp_reqs, runner._first_lp = set(), {}


def _slot(req_id: str, got: tuple[int, str], keys: list[str | None]) -> int:
    """The slot a request names, after checking that it holds the weights the request was built for."""
    slot, key = got
    if not 0 <= slot < len(keys) or keys[slot] != key:
        raise RuntimeError(f"request {req_id}: worker slot {slot} does not hold its weights (load them first: "
                           "steerserve_load)")
    return slot


def _with_head_point(model: Any) -> None:
    """Wrap ``model.compute_logits`` (called on the sampled rows' post-final-norm states, in batch order,
    outside the compiled graph): the head point's probes read those states, its heads add their deltas."""
    compute = model.compute_logits

    def compute_logits(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        logits = compute(hidden_states, *args, **kwargs)
        state = steer_ops.current()
        if state is not None and state.head.active and logits is not None:
            state.head.apply(hidden_states, logits, state.regs)
        return logits

    model.compute_logits = compute_logits


def _forget_oldest(d: dict[str, Any], limit: int = 10_000) -> None:
    """Bound what nobody collects (a bare vLLM client never asks for failures or reports)."""
    while len(d) > limit:
        del d[next(iter(d))]


def _setup(worker: Any) -> None:
    """After ``load_model``: insert the op, build this process's bank and tables, install them."""
    runner = worker.model_runner
    model = runner.get_model()
    num_layers = steer_decoder_layers(model)
    # Where vLLM may capture CUDA graphs (any device but CPU, unless enforce_eager), the op must take its
    # graph-safe form: fixed shapes, every slot, no host branch (a captured early return would be replayed
    # forever). NOTE: written for the GPU worker, not yet run on a GPU in this project's CI.
    static = runner.device.type != "cpu" and not worker.vllm_config.model_config.enforce_eager
    moe = moe_info(worker.vllm_config.model_config.hf_config)
    if moe is not None:
        if static:  # the op body is eager (early returns, host reads): a captured graph would freeze it
            raise RuntimeError("steerserve's router point (MoE models) runs eagerly: use enforce_eager on GPU")
        route_moe_layers(model, moe, eplb=bool(worker.vllm_config.parallel_config.enable_eplb))
    conf = (worker.vllm_config.additional_config or {}).get("steerserve", {})
    hidden = worker.vllm_config.model_config.get_hidden_size()
    dtype = worker.vllm_config.model_config.dtype
    max_tokens = worker.vllm_config.scheduler_config.max_num_batched_tokens
    slots = int(conf.get("bank_slots", Settings.bank_slots))
    bank = VectorBank(slots, hidden, dtype=dtype, device=runner.device)
    width = int(conf.get("max_interventions", Settings.max_interventions))
    tables = StepTables(num_layers, max_tokens, width, device=runner.device)
    loop_slots = int(conf.get("loop_slots", Settings.loop_slots))
    regs = Registers(loop_slots, num_layers, device=runner.device)
    weight_slots = int(conf.get("controller_slots", Settings.controller_slots))
    ctrl = ControllerUnit(weight_slots, regs.sink + 1, num_layers, hidden, loop_slots, device=runner.device)
    vocab = worker.vllm_config.model_config.get_vocab_size()
    head = HeadPoint(weight_slots, hidden, vocab,
                     worker.vllm_config.scheduler_config.max_num_seqs, regs.sink, device=runner.device)
    _with_head_point(model)
    capture = CaptureBuffer(num_layers, int(conf.get("capture_tokens", Settings.capture_tokens)), hidden, max_tokens,
                            device=runner.device)
    steer_ops.install(steer_ops.SteerState(bank, tables, regs, capture, ctrl, head, static=static))
    log.info("steerserve: steering %d layers of %s (bank %d x %d, tables %d tokens)%s", num_layers,
             type(decoder_layers(model)[0]).__name__, bank.slots, hidden, max_tokens,
             "" if moe is None else f", router point on MoE layers {list(moe.layers)}")


def _make_worker(base: type) -> type:
    class SteerWorker(SteerRPC, base):
        def init_device(self) -> None:
            super().init_device()
            _steer_runner(self.model_runner)

        def load_model(self, *args: Any, **kwargs: Any) -> None:
            super().load_model(*args, **kwargs)
            with torch.no_grad():
                _setup(self)

    return SteerWorker


def _cpu() -> type:
    from vllm.v1.worker.cpu_worker import CPUWorker

    return _make_worker(CPUWorker)


def _gpu() -> type:
    from vllm.v1.worker.gpu_worker import Worker

    return _make_worker(Worker)


def __getattr__(name: str) -> type:
    """``SteerCPUWorker`` / ``SteerGPUWorker``, built on first access so that importing this module
    never imports the other platform's worker (the CPU build has no CUDA worker deps, and vice versa)."""
    makers = {"SteerCPUWorker": _cpu, "SteerGPUWorker": _gpu}
    if name not in makers:
        raise AttributeError(name)
    cls = makers[name]()
    cls.__name__ = cls.__qualname__ = name
    globals()[name] = cls
    return cls
