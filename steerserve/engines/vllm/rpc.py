"""The worker's RPCs (``collective_rpc("steerserve_*")``): what the front end reads from or loads into a worker
between steps. A mixin of ``worker.SteerWorker``; ``self.model_runner`` is the steered model runner (V1 or V2)
(``worker._steer_runner``) and ``ops.current()`` the worker's installed ``SteerState``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from steerserve.engines.vllm import ops as steer_ops
from steerserve.engines.vllm.wire import decode_weights
from steerserve.runtime.head_point import load_slot


def _ours(keys: Iterable[str], request_id: str) -> list[str]:
    """The worker's keys of our request ``request_id``: itself, or as vLLM runs it (``<id>-<8 chars>``)."""
    return [k for k in keys if k == request_id or k.rsplit("-", 1)[0] == request_id]


class SteerRPC:
    """The ``steerserve_*`` methods of a steered vLLM worker."""

    model_runner: Any

    def steerserve_stats(self) -> dict[str, int]:
        """Bank and request counts of this worker (``collective_rpc("steerserve_stats")``)."""
        state = steer_ops.current()
        if state is None:
            return {"steered": 0, "pinned_rows": 0, "cached_rows": 0, "capacity": 0, "compactions": 0}
        return {"steered": len(self.model_runner._steer_reqs), "loop_slots": state.regs.in_use,
                **state.bank.stats()}

    def steerserve_load(self, slot: int, payload: dict[str, Any]) -> None:
        """Load weights (``wire.encode_weights``: a controller, probes or a head) into ``slot`` of their
        unit, between steps; the front end (``ControllerSlots``) only reuses a slot no request in flight holds."""
        state = steer_ops.current()
        if state is not None:
            load_slot(state.ctrl, state.head, slot, decode_weights(payload))

    def steerserve_take_failed(self) -> dict[str, str]:
        """Requests whose steering the op refused since the last call: req_id -> why (then forgotten)."""
        failed, self.model_runner._steer_failed = self.model_runner._steer_failed, {}
        return dict(failed)

    def steerserve_loop_report(self, request_id: str) -> dict[str, float | None] | None:
        """What a closed-loop request's loop measured so far (finished or not), by our request id; a
        host read of its registers between two steps."""
        runner, state = self.model_runner, steer_ops.current()
        for key in _ours(runner._steer_reports, request_id):
            return runner._steer_reports.pop(key)
        for key in _ours(runner._steer_cells, request_id):
            return None if state is None else state.regs.report(runner._steer_cells[key])
        return None

    def steerserve_loop_figures(self, request_ids: list[str]) -> dict[str, dict[str, float]]:
        """Where each closed loop of ``request_ids`` stands after the latest step: the entropy it measured
        (bits) and the gain it set for the next token; loops not (or no longer) running are left out."""
        runner, state = self.model_runner, steer_ops.current()
        if state is None:
            return {}
        out = {}
        for rid in request_ids:
            for key in _ours(runner._steer_cells, rid):
                cell = runner._steer_cells[key]
                out[rid] = {"entropy_bits": float(state.regs.entropy[cell]), "gain": float(state.regs.gain[cell])}
        return out

    def steerserve_take_logprobs(self, request_id: str) -> bytes | None:
        """A request's first next-token log-softmax (``[V]`` fp32 bytes), by our request id; then forgotten."""
        kept = self.model_runner._first_lp
        for key in _ours(kept, request_id):
            return kept.pop(key).numpy().astype("<f4", copy=False).tobytes()
        return None

    def steerserve_route_capture(self, on: bool) -> None:
        """Record every request's routing (per MoE layer and position, after masking) from now on, or stop."""
        state = steer_ops.current()
        if state is not None:
            state.route_capture.on = on

    def steerserve_take_routing(self, request_id: str) -> dict[str, Any] | None:
        """A request's recorded routing (``RouteCapture.take``), by our request id; then forgotten."""
        state = steer_ops.current()
        if state is None:
            return None
        keys = _ours(state.route_capture.requests(), request_id)
        return state.route_capture.take(keys[0]) if keys else None

    def steerserve_take_capture(self, request_id: str, layers: list[int]) -> tuple[list[int], bytes] | None:
        """A finished capture request's states at ``layers`` (``[n, len(layers), H]`` fp32 bytes, with
        the shape), by our request id (vLLM runs it as ``<id>-<8 chars>``); then forgotten."""
        captures = self.model_runner._captures
        states = None
        for key in _ours(captures.keys(), request_id):
            states = captures.take(key, layers)
        if states is None:
            return None
        return list(states.shape), states.numpy().astype("<f4", copy=False).tobytes()
