"""The adapter for vLLM's Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``, 0.32's default on GPU).

V2 keeps no persistent batch: each step ``prepare_inputs`` builds a fresh ``InputBatch`` (``gpu/input_batch.
py``) in its own order (decodes first, then short extends, then prefills: ``sort_batch_req_ids``), whose
host-side fields say everything the tables need, per batch row ``i < num_reqs``:

- ``req_ids[i]``; ``query_start_loc_np[i]``: its first flat token; ``num_scheduled_tokens[i]``: how many;
- ``num_computed_tokens_np[i]``: the absolute position of that first token (already gathered per row, where
  V1 keeps it per persistent-batch slot); ``prefill_len_np[i]``: tokens to prefill (prompt, plus the output
  so far of a resumed request), so ``computed + scheduled < prefill_len`` is a partial prefill chunk whose
  sampled token vLLM discards;
- ``num_tokens``: the step's real tokens (``num_tokens_after_padding`` adds CUDA-graph padding, never steered).

The overrides, around the stock methods (``execute_model`` calls them in this order):
``finish_requests`` (finished and aborted; preempted requests keep their rows, and V2 re-sends them later
as new, which ``StepCore._steer_new`` recognises), ``add_requests``, ``prepare_inputs`` (-> the tables),
``execute_model`` (after the forward: refused steering, captures) and ``sample`` (the sampler sees the
logits first through ``_LogitsTap``: closed-loop gains and first-token log-probabilities).

Not covered: speculative decoding (the rejection sampler bypasses the tap, so closed loops and first-token
log-probabilities see no logits), prefill context parallelism (it re-partitions the batch's tokens) and
batch-sharded sampling over TP ranks (its logits come from ``compute_logits_local``, so the head point
does not see them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from steerserve.engines.vllm.steps import StepCore

FORCE_V1 = "VLLM_USE_V2_MODEL_RUNNER=0"  # vLLM's own switch (``vllm/envs.py``): the V1 runner on GPU too
_V2_METHODS = ("prepare_inputs", "add_requests", "finish_requests", "sample", "execute_model")


def is_v2(cls: type) -> bool:
    """Whether ``cls`` is (a subclass of) Model Runner V2: V2's step methods, none of V1's."""
    return all(hasattr(cls, m) for m in _V2_METHODS) and not hasattr(cls, "_prepare_inputs")


def discarded(batch: Any) -> np.ndarray:
    """``[num_reqs]`` bool: rows of a V2 ``InputBatch`` still prefilling after this step (their sample is
    thrown away)."""
    n = batch.num_reqs
    done = batch.num_computed_tokens_np[:n] + batch.num_scheduled_tokens[:n]
    return np.asarray(done < batch.prefill_len_np[:n], dtype=bool)


class _LogitsTap:
    """Stands in for the runner's sampler during ``sample``: hands the logits to the core, then samples."""

    def __init__(self, sampler: Any, core: StepCore) -> None:
        self._sampler, self._core = sampler, core

    def __call__(self, logits: Any, batch: Any) -> Any:
        n = batch.num_reqs
        if logits.shape[0] != n:  # one row per request unless speculative decoding (which has no tap)
            raise RuntimeError(f"steerserve: {logits.shape[0]} logit rows for {n} requests; closed loops and "
                               "first-token log-probabilities need one per request (no speculative decoding)")
        self._core._steer_logits(logits, batch.req_ids[:n], discarded(batch))
        return self._sampler(logits, batch)

    def __getattr__(self, name: str) -> Any:  # the runner also reads the sampler's state
        return getattr(self._sampler, name)


class SteeringRunnerV2Mixin(StepCore):
    """Mixed in front of V2's runner class (``GPUModelRunner`` or the CPU build's subclass)."""

    sampler: Any  # the base runner's (None on non-last pipeline ranks)

    def finish_requests(self, scheduler_output: Any) -> Any:
        self._steer_finished(scheduler_output.finished_req_ids)  # before new requests take their rows
        return super().finish_requests(scheduler_output)  # type: ignore[misc]

    def add_requests(self, scheduler_output: Any) -> Any:
        self._steer_new(scheduler_output.scheduled_new_reqs)
        return super().add_requests(scheduler_output)  # type: ignore[misc]

    def prepare_inputs(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        batch = super().prepare_inputs(scheduler_output, *args, **kwargs)  # type: ignore[misc]
        if getattr(self, "pcp_manager", None) is not None:  # its batch no longer maps rows to token runs
            raise RuntimeError("steerserve: prefill context parallelism is not supported (Model Runner V2); "
                               f"run without it or with the V1 runner ({FORCE_V1})")
        n = batch.num_reqs
        self._steer_layout(batch.req_ids[:n], batch.query_start_loc_np, batch.num_computed_tokens_np,
                           batch.num_scheduled_tokens, int(batch.num_tokens))
        return batch

    def execute_model(self, *args: Any, **kwargs: Any) -> Any:
        out = super().execute_model(*args, **kwargs)  # type: ignore[misc]
        if not kwargs.get("dummy_run", False):  # profiling, capture and DP padding runs lay out nothing
            self._steer_after_forward()
        return out

    def sample(self, hidden_states: Any, input_batch: Any, grammar_output: Any) -> Any:
        real = self.sampler
        if real is None or not (self._steer_cells or self._lp_reqs):
            return super().sample(hidden_states, input_batch, grammar_output)  # type: ignore[misc]
        self.sampler = _LogitsTap(real, self)
        try:
            return super().sample(hidden_states, input_batch, grammar_output)  # type: ignore[misc]
        finally:
            self.sampler = real
