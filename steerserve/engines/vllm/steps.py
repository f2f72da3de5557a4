"""What a steered vLLM model runner does per request and per step, whichever runner it is.

vLLM 0.32 has two GPU model runners: V1 (``vllm/v1/worker/gpu_model_runner.py``, and the CPU runner that
subclasses it) and Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``, the default on GPU). They lay
out a step differently in code but not in substance: requests in batch order, each owning a contiguous run
of flat tokens from ``query_start_loc[i]``, the first at absolute position ``num_computed_tokens[i]``.
``StepCore`` is everything that follows from that, written once; ``worker.SteeringRunnerMixin`` (V1) and
``runner_v2.SteeringRunnerV2Mixin`` (V2) are thin adapters that read their runner's batch and call it:

- ``_steer_finished`` / ``_steer_new``: the request lifecycle (bank rows, register cells, slots);
- ``_steer_layout``: the step's per-request segments -> the runtime's tables (``StepTables.fill`` & co);
- ``_steer_after_forward``: captures and the requests whose steering the op refused;
- ``_steer_logits``: the sampler-side work (closed-loop gains, first-token log-probabilities).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from steerserve.engines.vllm import ops as steer_ops
from steerserve.engines.vllm.wire import from_extra_args
from steerserve.runtime.capture import Captures, Read
from steerserve.runtime.ops import NON_FINITE
from steerserve.runtime.pins import Pin
from steerserve.runtime.registers import entropy_step_
from steerserve.runtime.safeswitch import PILOT_TOKENS
from steerserve.runtime.tables import Segment

log = logging.getLogger(__name__)


class StepCore:
    """Per-request state of a steered runner and the per-step work on it (the runner-independent part)."""

    _steer_live: set[str]  # requests seen and not finished (a preempted one stays: V2 re-sends it as new)
    _steer_reqs: dict[str, Pin]  # req_id -> its vectors in the bank and its ops' placement
    _steer_step: list[tuple[str, Segment]]  # this step's steered requests, as laid out in the tables
    _steer_failed: dict[str, str]  # req_id -> why its steering was refused (until the front end takes it)
    _steer_cells: dict[str, int]  # req_id -> register cell of a closed-loop or controlled request
    _steer_ctrl: dict[str, tuple[int, int]]  # req_id -> (controller slot, prompt length) of a controlled request
    _steer_probe: dict[str, tuple[int, int]]  # req_id -> (probe slot, prompt length): SafeSwitch probes
    _steer_head: dict[str, int]  # req_id -> head slot: its logits get the refusal head's delta
    _steer_reports: dict[str, dict[str, float | None]]  # finished closed-loop req_id -> what its loop measured
    _capture_reqs: set[str]  # capture requests in flight
    _lp_reqs: set[str]  # requests whose first next-token log-softmax is kept (``Wired.logprobs``), until sampled
    _first_lp: dict[str, torch.Tensor]  # req_id -> that log-softmax [V] fp32 (CPU), until the front end takes it
    _captures: Captures

    def _steer_init(self) -> None:
        self._steer_live, self._steer_reqs, self._steer_step, self._steer_failed = set(), {}, [], {}
        self._steer_cells, self._steer_reports, self._steer_ctrl = {}, {}, {}
        self._steer_probe, self._steer_head = {}, {}
        self._capture_reqs, self._captures = set(), Captures()
        self._lp_reqs, self._first_lp = set(), {}

    def _steer_finished(self, req_ids: Iterable[str]) -> None:
        """Finished and aborted requests release what they hold (preempted ones keep it)."""
        state = steer_ops.current()
        if state is None:
            return
        for req_id in req_ids:
            self._steer_live.discard(req_id)
            pin = self._steer_reqs.pop(req_id, None)
            if pin is not None:
                pin.release(state.bank)
            cell = self._steer_cells.pop(req_id, None)
            if cell is not None:  # a host read, between steps: what the response reports
                self._steer_reports[req_id] = state.regs.report(cell)
                state.regs.close(cell)
                forget_oldest(self._steer_reports)
            self._capture_reqs.discard(req_id)
            self._lp_reqs.discard(req_id)
            self._steer_ctrl.pop(req_id, None)
            self._steer_probe.pop(req_id, None)
            self._steer_head.pop(req_id, None)

    def _steer_new(self, new_reqs: Sequence[Any]) -> None:
        """``new_reqs``: vLLM's ``NewRequestData`` (our ops in ``sampling_params.extra_args``). A request
        already live (V2 re-sends a resumed request as new) keeps what it holds and is not re-admitted."""
        state = steer_ops.current()
        if state is None:
            return
        for new in new_reqs:
            if new.req_id in self._steer_live:
                continue
            self._steer_live.add(new.req_id)
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
            if wired.needs_cell:
                cell = state.regs.open(wired.loop, controlled=wired.controller is not None)
                if cell is None:  # the front end admits at most loop_slots of them (engines.slots)
                    raise RuntimeError(f"request {new.req_id}: no free closed-loop register slot")
                self._steer_cells[new.req_id] = cell
            if not wired.ops:
                continue
            pin = Pin.acquire(state.bank, wired.ops, state.tables.slots)
            if pin is None:
                # Cannot happen behind steerserve's front end: it admits a request only when the rows
                # pinned by requests in flight plus its own fit (``engine.BankGate``), and the bank
                # compacts rather than fail on fragmentation. A bare vLLM client gets this error.
                raise RuntimeError(f"request {new.req_id}: its vectors do not fit in the steering bank")
            self._steer_reqs[new.req_id] = pin

    def _steer_layout(self, req_ids: Sequence[str], starts: np.ndarray, computed: np.ndarray,
                      counts: np.ndarray, total: int) -> None:
        """The step's layout -> this worker's tables. Request ``i`` of ``req_ids`` (batch order) owns flat
        tokens ``starts[i] : starts[i] + counts[i]`` at absolute positions from ``computed[i]``; ``total``
        tokens in all (padding beyond is never steered)."""
        state = steer_ops.current()
        if state is None:
            return
        step, reads, ctrl_reads, probe_rows, head_rows, routed = [], [], [], [], [], []
        for i, req_id in enumerate(req_ids):
            start, first, count = int(starts[i]), int(computed[i]), int(counts[i])
            pin = self._steer_reqs.get(req_id)
            cell = self._steer_cells.get(req_id, 0)
            if pin is not None:
                step.append((req_id, Segment(start, first, count, pin.placement(state.bank), cell)))
            ctrl = self._steer_ctrl.get(req_id)
            if ctrl is not None:  # its controller reads the last prompt token, in the step that has it
                last = ctrl[1] - 1 - first
                if 0 <= last < count:
                    ctrl_reads.append((start + last, cell, ctrl[0]))
            probe = self._steer_probe.get(req_id)
            if probe is not None:  # SafeSwitch: stage 1 at the last prompt token, stage 2 after the pilot
                sampled = first + count - 1  # position of the sampled row
                for stage, at in enumerate((probe[1] - 1, probe[1] + PILOT_TOKENS - 1)):
                    if sampled == at:
                        probe_rows.append((i, cell, probe[0], stage))
            head = self._steer_head.get(req_id)
            if head is not None:
                head_rows.append((i, head))
            if req_id in self._capture_reqs:
                reads.append(Read(req_id, start, first, count))
            if state.route_capture.on:
                routed.append(Read(req_id, start, first, count))
        state.route_capture.begin(routed)
        if step or state.tables.active:  # skip the table work on all-unsteered steps
            controlled = any(req_id in self._steer_ctrl for req_id, _ in step)
            # (the graph-safe op never reads the eager op's all-layer gather: no bank, no gather)
            state.tables.fill(total, [seg for _, seg in step], None if state.static else state.bank.weight,
                              state.regs.gain, state.regs.layer_gain if controlled else None)
        if ctrl_reads or state.ctrl.active:
            state.ctrl.fill(ctrl_reads)
        if probe_rows or head_rows or state.head.active:
            state.head.fill(probe_rows, head_rows)
        if reads or state.capture.active:
            for r in state.capture.fill(total, reads):
                log.warning("steerserve: capture of %s skipped this step (the buffer is full)", r.request)
        self._steer_step = step

    def _steer_after_forward(self) -> None:
        """After the step's forward pass: copy captured rows out; drop the steering the op refused."""
        state = steer_ops.current()
        if state is not None and state.capture.active:
            self._captures.add(state.capture.collect())
        step, self._steer_step = self._steer_step, []
        if state is None or not step:
            return
        for i in state.tables.flagged([seg for _, seg in step]):
            req_id = step[i][0]
            pin = self._steer_reqs.pop(req_id, None)
            if pin is not None:  # unsteered from now on: its next steps cannot be refused again
                pin.release(state.bank)
            log.warning("steerserve: request %s: steering made the residual stream non-finite; "
                        "its steering is dropped and the front end will end it", req_id)
            self._steer_failed[req_id] = NON_FINITE
            forget_oldest(self._steer_failed)

    def _steer_logits(self, logits: torch.Tensor, req_ids: Sequence[str], discarded: np.ndarray) -> None:
        """``logits [len(req_ids), V]``, the rows the sampler samples from (the head's delta already in);
        ``discarded [len(req_ids)]`` bool: rows whose sample vLLM throws away (a partial prefill chunk)."""
        state = steer_ops.current()
        if state is not None and self._steer_cells:
            # Closed loops: the next step's gains from these logits, on the device. A discarded row writes
            # into the sink instead of its request's cell.
            cells = self._steer_cells
            rows = np.array([cells.get(r, 0) or state.regs.sink for r in req_ids], dtype=np.int64)
            rows[discarded] = state.regs.sink
            entropy_step_(state.regs, logits, torch.from_numpy(rows).to(logits.device))
        if self._lp_reqs:
            for i, req_id in enumerate(req_ids):
                if req_id in self._lp_reqs and not discarded[i]:
                    self._lp_reqs.discard(req_id)
                    self._first_lp[req_id] = torch.log_softmax(logits[i].float(), dim=-1).cpu()
                    forget_oldest(self._first_lp, 256)


def _slot(req_id: str, got: tuple[int, str], keys: list[str | None]) -> int:
    """The slot a request names, after checking that it holds the weights the request was built for."""
    slot, key = got
    if not 0 <= slot < len(keys) or keys[slot] != key:
        raise RuntimeError(f"request {req_id}: worker slot {slot} does not hold its weights (load them first: "
                           "steerserve_load)")
    return slot


def forget_oldest(d: dict[str, Any], limit: int = 10_000) -> None:
    """Bound what nobody collects (a bare vLLM client never asks for failures or reports)."""
    while len(d) > limit:
        del d[next(iter(d))]
