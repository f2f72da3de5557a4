"""vLLM worker classes that steer: named by ``parallel_config.worker_cls`` (see ``plugin.engine_kwargs``).

The worker gives its model runner instance a subclass (``_steer_runner``): vLLM 0.32 builds either its V1
model runner (``vllm/v1/worker/gpu_model_runner.py``; ``cpu_model_runner.CPUModelRunner`` subclasses it)
or Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``, the default on GPU; ``VLLM_USE_V2_MODEL_RUNNER``
chooses). Both adapters feed the same runner-independent core (``steps.StepCore``). The V1 adapter here
overrides, each calling the stock method first or around it:

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
  state before sampling and restore it instead, and hide them from the stock rewind. (V2 samples with
  per-request seeds and positions, no generator state: nothing to restore there.)
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from steerserve.anatomy import vllm_layers
from steerserve.config import Settings
from steerserve.engines.vllm import ops as steer_ops
from steerserve.engines.vllm import runner_v2
from steerserve.engines.vllm.plugin import route_moe_layers, steer_decoder_layers
from steerserve.engines.vllm.rpc import SteerRPC
from steerserve.engines.vllm.steps import StepCore
from steerserve.model import moe_info
from steerserve.runtime.bank import VectorBank
from steerserve.runtime.capture import CaptureBuffer
from steerserve.runtime.control_op import ControllerUnit
from steerserve.runtime.head_point import HeadPoint
from steerserve.runtime.registers import Registers
from steerserve.runtime.tables import StepTables

log = logging.getLogger(__name__)


class SteeringRunnerMixin(StepCore):
    """V1: mixed in front of the runner's class (MRO: ours, then ``CPUModelRunner``/``GPUModelRunner``)."""

    # what the base runner provides (typed loosely: vLLM's runner is not a typed dependency here)
    input_batch: Any
    query_start_loc: Any
    discard_request_mask: Any
    _rewound: dict[int, torch.Generator]  # batch index -> CPU generator restored after a discarded sample

    def _update_states(self, scheduler_output: Any) -> Any:
        self._steer_finished(scheduler_output.finished_req_ids)  # before new requests take their rows
        self._steer_new(scheduler_output.scheduled_new_reqs)
        return super()._update_states(scheduler_output)  # type: ignore[misc]

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)  # type: ignore[misc]
        batch = self.input_batch
        n = batch.num_reqs
        # query_start_loc.np [num_reqs + 1]: flat offsets, filled by the stock method;
        # num_computed_tokens_cpu [max_reqs]: absolute position of each request's first token this step
        self._steer_layout(batch.req_ids[:n], self.query_start_loc.np, batch.num_computed_tokens_cpu,
                           num_scheduled_tokens, int(scheduler_output.total_num_scheduled_tokens))
        return out

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        out = super().execute_model(*args, **kwargs)  # type: ignore[misc]
        self._steer_after_forward()
        return out

    def _sample(self, logits: Any, *args: Any, **kwargs: Any) -> Any:
        if logits is not None and (self._steer_cells or self._lp_reqs):
            n = self.input_batch.num_reqs
            self._steer_logits(logits[:n], self.input_batch.req_ids[:n],
                               self.discard_request_mask.np[:n].astype(bool))
        return self._sample_restoring_cpu_generators(logits, *args, **kwargs)

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
    """Give ``runner`` our subclass: the V1 adapter (``SteeringRunnerMixin``) or the V2 one
    (``runner_v2.SteeringRunnerV2Mixin``), by which runner vLLM built."""
    cls = type(runner)
    if runner_v2.is_v2(cls):
        mixin: type = runner_v2.SteeringRunnerV2Mixin
        log.warning("steerserve: steering through vLLM's Model Runner V2 (%s); not yet proven on a GPU in this "
                    "project: set %s to use the V1 runner", cls.__name__, runner_v2.FORCE_V1)
    elif hasattr(cls, "_prepare_inputs") and hasattr(cls, "_update_states"):
        mixin = SteeringRunnerMixin
        log.info("steerserve: steering through vLLM's V1 model runner (%s)", cls.__name__)
    else:
        raise RuntimeError(f"{cls.__name__} is neither vLLM's V1 model runner nor Model Runner V2; steering "
                           f"needs one of them ({runner_v2.FORCE_V1} selects V1)")
    if cls not in _RUNNER_CLASSES:
        _RUNNER_CLASSES[cls] = type(f"Steering{cls.__name__}", (mixin, cls), {})
    runner.__class__ = _RUNNER_CLASSES[cls]
    runner._steer_init()
    runner._rewound = {}


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


def _setup(worker: Any) -> None:
    """After ``load_model``: insert the op, build this process's bank and tables, install them."""
    runner = worker.model_runner
    model = runner.get_model()
    arch = worker.vllm_config.model_config.architectures[0]  # the config's (ModelInfo.architecture), not vLLM's class
    num_layers = steer_decoder_layers(model, arch)
    # Where vLLM may capture CUDA graphs (any device but CPU, unless enforce_eager), the op must take its
    # graph-safe form: fixed shapes, every slot, no host branch (a captured early return would be replayed
    # forever). NOTE: written for the GPU worker, not yet run on a GPU in this project's CI.
    static = runner.device.type != "cpu" and not worker.vllm_config.model_config.enforce_eager
    moe = moe_info(worker.vllm_config.model_config.hf_config)
    if moe is not None:
        if static:  # the op body is eager (early returns, host reads): a captured graph would freeze it
            raise RuntimeError("steerserve's router point (MoE models) runs eagerly: use enforce_eager on GPU")
        route_moe_layers(model, moe, arch, eplb=bool(worker.vllm_config.parallel_config.enable_eplb))
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
             type(vllm_layers(model, arch)[-1]).__name__, bank.slots, hidden, max_tokens,
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
