"""The Model Runner V2 adapter against vLLM's own V2 structures, on CPU: it lays out the same tables as V1.

V2's kernels are Triton kernels, and the CPU build has no Triton backend, so a V2 runner cannot run a step
here. What runs is V2's host side, from the installed vLLM source: ``RequestState`` (with the CPU build's
buffer patch), ``GPUModelRunner.gather_batch_req_state`` (V2's batch order: decodes first) and a real
``InputBatch`` assembled as ``prepare_inputs`` assembles its host fields. The same requests go through the
V1 adapter over a V1-shaped batch in arrival order; each request's tokens must get the same table rows in
both, wherever the two orders put them. The stock runners' method signatures are checked too, so a vLLM
upgrade that moves a hook fails here rather than on a GPU.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

try:
    import vllm.v1.worker.cpu.shm  # noqa: F401  (the CPU build's patch: V2's host buffers unpinned)
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    from vllm.v1.worker.gpu.states import RequestState
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner
except Exception as exc:  # not installed, or a vLLM without Model Runner V2
    pytest.skip(f"vLLM's Model Runner V2 is not importable here ({type(exc).__name__}: {exc})",
                allow_module_level=True)

from steerserve.engines.vllm import ops as vops
from steerserve.engines.vllm.runner_v2 import SteeringRunnerV2Mixin, discarded, is_v2
from steerserve.engines.vllm.wire import EXTRA_KEY, encode_ops
from steerserve.engines.vllm.worker import SteeringRunnerMixin
from steerserve.runtime.bank import VectorBank
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.tables import StepTables
from tests.test_vllm_units import H, _state

LAYERS, TOKENS, REQS = 3, 64, 8
PROMPTS = {"a": 10, "b": 20, "c": 6, "d": 9}  # prompt lengths


def _specs() -> dict[str, dict[str, Any]]:
    g = torch.Generator().manual_seed(3)
    v = VectorRef.of(torch.randn(H, generator=g))
    return {
        "a": encode_ops(tuple(SteerOp(OpKind.ADD, layer, v, 2.0) for layer in range(LAYERS))),
        "b": encode_ops((SteerOp(OpKind.ADD, 1, VectorRef.of(torch.randn(H, generator=g)), -1.0, 5, 15),
                         SteerOp(OpKind.ADD, 2, VectorRef.of(torch.randn(4, H, generator=g)), 3.0, 6, 10,
                                 positional=True)), logprobs=True),
        "c": encode_ops((), logprobs=True),  # unsteered, asks for its first token's log-probabilities
        "d": encode_ops((SteerOp(OpKind.ABLATE, 0, VectorRef.of(torch.ones(H) / H**0.5), 1.0),)),
    }


def _new(req_id: str, computed: int = 0, outputs: int = 0) -> NewRequestData:
    prompt = list(range(1, PROMPTS[req_id] + 1))
    params = SamplingParams(max_tokens=8, extra_args={EXTRA_KEY: _specs()[req_id]})
    return NewRequestData(req_id=req_id, prompt_token_ids=prompt, mm_features=[], sampling_params=params,
                          pooling_params=None, block_ids=([],), num_computed_tokens=computed, lora_request=None,
                          prefill_token_ids=prompt + [7] * outputs)


# Three steps: a, b (partial: 8 of 20), c and d prefill; then a, c, d decode while b finishes its prefill;
# then a and b decode and c finishes. Each: (new requests, {req_id: (computed, scheduled)}, finished).
STEPS = [
    ([_new(r) for r in "abcd"], {"a": (0, 10), "b": (0, 8), "c": (0, 6), "d": (0, 9)}, set()),
    ([], {"a": (10, 1), "b": (8, 12), "c": (6, 1), "d": (9, 1)}, set()),
    ([], {"a": (11, 1), "b": (20, 1)}, {"c"}),
]


def _sched(new: list[NewRequestData], sched: dict[str, tuple[int, int]], finished: set[str]) -> Any:
    return SimpleNamespace(finished_req_ids=finished, preempted_req_ids=set(), scheduled_new_reqs=new,
                           num_scheduled_tokens={r: n for r, (_, n) in sched.items()},
                           total_num_scheduled_tokens=sum(n for _, n in sched.values()),
                           scheduled_spec_decode_tokens={}, computed={r: c for r, (c, _) in sched.items()})


class FakeV1:
    """V1's persistent batch, as far as the adapter reads it: rows in arrival order."""

    order: list[str]

    def _update_states(self, so: Any) -> None:
        self.order = [r for r in self.order if r not in so.finished_req_ids] + [n.req_id for n in so.scheduled_new_reqs]

    def _prepare_inputs(self, so: Any, num_scheduled_tokens: np.ndarray) -> None:
        ids = [r for r in self.order if r in so.num_scheduled_tokens]
        starts = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(num_scheduled_tokens, out=starts[1:])
        self.input_batch = SimpleNamespace(req_ids=ids, num_reqs=len(ids), generators={},
                                           num_computed_tokens_cpu=np.array([so.computed[r] for r in ids]))
        self.query_start_loc = SimpleNamespace(np=starts)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def step(self, so: Any) -> list[str]:
        self._update_states(so)
        ids = [r for r in self.order if r in so.num_scheduled_tokens]
        counts = np.array([so.num_scheduled_tokens[r] for r in ids], dtype=np.int32)
        self._prepare_inputs(so, counts)
        done = np.array([so.computed[r] for r in ids]) + counts
        self.discard_request_mask = SimpleNamespace(np=done < np.array([PROMPTS[r] for r in ids]))
        return ids


class FakeV2(V2Runner):
    """V2's host side for real (request states, batch order, ``InputBatch``), its Triton kernels left out."""

    def __init__(self) -> None:  # not V2's: that builds the model, the KV cache and the device kernels
        self.req_states = RequestState(REQS, 256, TOKENS, 0, 32, torch.device("cpu"))
        self.decode_query_len, self.use_pp, self.adaptive_verification, self.pcp_manager = 1, False, None, None
        self.buffers = InputBuffers(REQS, TOKENS, torch.device("cpu"))
        self.sampler = lambda logits, batch: logits.argmax(-1)

    def finish_requests(self, so: Any) -> None:
        for r in so.finished_req_ids | so.preempted_req_ids:
            self.req_states.remove_request(r)

    def add_requests(self, so: Any) -> None:
        for new in so.scheduled_new_reqs:
            self.req_states.remove_request(new.req_id)
            self.req_states.add_request(new.req_id, new.prompt_len, new.prefill_token_ids,
                                        new.num_computed_tokens, 8)

    def prepare_inputs(self, so: Any, brs: Any, batch_desc: Any, num_active_loras: int) -> InputBatch:
        n, t = len(brs.req_ids), brs.num_tokens
        starts = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(brs.num_scheduled_tokens, out=starts[1:])
        computed = self.req_states.num_computed_tokens_np[brs.idx_mapping_np]
        self.buffers.positions[:t] = torch.from_numpy(np.concatenate(
            [np.arange(c, c + k) for c, k in zip(computed, brs.num_scheduled_tokens, strict=True)]))
        idx, qsl = torch.from_numpy(brs.idx_mapping_np.astype(np.int64)), torch.from_numpy(starts)
        ar = np.arange(n + 1, dtype=np.int32)
        return InputBatch(
            req_ids=brs.req_ids, num_reqs=n, num_reqs_after_padding=n, idx_mapping=idx,
            idx_mapping_np=brs.idx_mapping_np, expanded_idx_mapping=idx, expanded_local_pos=torch.zeros(n),
            num_scheduled_tokens=brs.num_scheduled_tokens, num_tokens=t, num_tokens_after_padding=t + 3,
            num_draft_tokens=0, num_draft_tokens_per_req=None, query_start_loc=qsl, query_start_loc_np=starts,
            seq_lens=torch.from_numpy(computed + brs.num_scheduled_tokens), seq_lens_cpu_upper_bound=qsl,
            dcp_local_seq_lens=None, num_computed_tokens_np=computed, prefill_len_np=brs.prefill_len_np,
            num_computed_prefill_tokens_np=brs.num_computed_prefill_tokens_np,
            is_prefilling_np=brs.is_prefilling_np, has_prefill=brs.has_prefill,
            decode_graph_eligible=brs.decode_graph_eligible, input_ids=self.buffers.input_ids[: t + 3],
            positions=self.buffers.positions[: t + 3], is_padding=self.buffers.is_padding[: t + 3],
            logits_indices=qsl[1:] - 1, cu_num_logits=torch.from_numpy(ar), cu_num_logits_np=ar,
            has_structured_output_reqs=False, prompt_lens=None)

    def execute_model(self, so: Any, *args: Any, **kwargs: Any) -> None:  # V2's order of calls
        self.finish_requests(so)
        self.add_requests(so)
        for r, c in so.computed.items():  # update_requests: the scheduler's computed counts
            self.req_states.num_computed_tokens_np[self.req_states.req_id_to_index[r]] = c
        rs = self.req_states
        np.minimum(rs.num_computed_tokens_np, rs.prefill_len.np, out=rs.num_computed_prefill_tokens)
        brs, _ = self.gather_batch_req_state(so, False)
        self.batch = self.prepare_inputs(so, brs, None, 0)

    def sample(self, hidden_states: Any, input_batch: Any, grammar_output: Any) -> Any:
        return self.sampler(hidden_states, input_batch)  # hidden_states: the logits, in these tests


def _runner(base: type, mixin: type) -> Any:
    runner = type(f"Steering{base.__name__}", (mixin, base), {})()
    runner._steer_init()
    runner.order = []
    return runner


def _tables() -> vops.SteerState:
    return _state(VectorBank(32, H), StepTables(LAYERS, TOKENS, 4))


def _by_request(tables: StepTables, req_ids: list[str], starts: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """Each request's table rows ``{req_id: (rows, scales)}`` per kind, cut out of the flat layout."""
    out = {}
    for i, r in enumerate(req_ids):
        s, c = int(starts[i]), int(counts[i])
        out[r] = [(tables.rows[k][:, s : s + c].clone(), tables.scales[k][:, s : s + c].clone()) for k in OpKind]
    return out


def test_v2_lays_out_the_tables_v1_does_under_its_own_batch_order() -> None:
    v1, v2 = _runner(FakeV1, SteeringRunnerMixin), _runner(FakeV2, SteeringRunnerV2Mixin)
    s1, s2 = _tables(), _tables()
    orders = []
    try:
        for new, sched, finished in STEPS:
            so = _sched(new, sched, finished)
            vops.install(s1)
            ids1 = v1.step(so)
            logits = torch.randn(len(ids1), 32)
            v1._sample(logits)
            got1 = _by_request(s1.tables, ids1, v1.query_start_loc.np, [sched[r][1] for r in ids1])
            vops.install(s2)
            v2.execute_model(so)
            b = v2.batch
            assert torch.equal(b.positions[: b.num_tokens], torch.from_numpy(np.concatenate(  # the fixture's own
                [np.arange(sched[r][0], sum(sched[r])) for r in b.req_ids])))  # positions: as V2 lays them out
            v2.sample(logits[[ids1.index(r) for r in b.req_ids]], b, None)  # the same logits per request
            got2 = _by_request(s2.tables, b.req_ids, b.query_start_loc_np, b.num_scheduled_tokens)
            orders.append((ids1, list(b.req_ids)))
            assert got1.keys() == got2.keys()
            for r in got1:
                for (r1, c1), (r2, c2) in zip(got1[r], got2[r], strict=True):
                    assert torch.equal(r1, r2) and torch.equal(c1, c2), r
            for k in OpKind:  # beyond the step's tokens (V2 pads 3): neutral in both
                assert not s2.tables.scales[k][:, b.num_tokens :].any()
            assert s1.tables.width == s2.tables.width and s1.tables.active == s2.tables.active
            v1._steer_after_forward()
            v2._steer_after_forward()
    finally:
        vops.install(None)
    assert orders[1] == (["a", "b", "c", "d"], ["a", "c", "d", "b"])  # V2 puts decodes first: layouts differ
    assert s1.tables.active  # the steps were steered, so the comparison compared something
    # first-token log-probabilities: b's first sampled row (step 1) is a discarded partial-prefill sample
    assert v1._first_lp.keys() == v2._first_lp.keys() == {"b", "c"}
    assert all(torch.equal(v1._first_lp[r], v2._first_lp[r]) for r in "bc")
    assert v1._steer_reqs.keys() == v2._steer_reqs.keys() == {"a", "b", "d"}


def _discarded(runner: Any) -> dict[str, bool]:
    return dict(zip(runner.batch.req_ids, discarded(runner.batch).tolist(), strict=True))


def test_v2_resumed_request_keeps_its_rows_and_discard_follows_prefill_len() -> None:
    v2, state = _runner(FakeV2, SteeringRunnerV2Mixin), _tables()
    vops.install(state)
    try:
        v2.execute_model(_sched([_new("a"), _new("b")], {"a": (0, 10), "b": (0, 8)}, set()))
        assert _discarded(v2) == {"a": False, "b": True}  # b: 8 of 20 prompt tokens
        pin, pinned = v2._steer_reqs["a"], state.bank.stats()["pinned_rows"]
        so = _sched([], {"b": (8, 4)}, set())
        so.preempted_req_ids = {"a"}
        v2.execute_model(so)  # a preempted: V2 frees its request state, steerserve keeps its rows
        v2.execute_model(_sched([_new("a", computed=0, outputs=3)], {"a": (0, 13), "b": (12, 8)}, set()))
        assert v2._steer_reqs["a"] is pin and state.bank.stats()["pinned_rows"] == pinned
        assert _discarded(v2) == {"a": False, "b": False}  # a re-prefills prompt + 3 outputs in full
        v2.execute_model(_sched([], {"b": (20, 1)}, {"a"}))
        assert "a" not in v2._steer_reqs and state.bank.stats()["pinned_rows"] < pinned
    finally:
        vops.install(None)


def test_the_stock_runners_have_the_hooks_the_adapters_override() -> None:
    assert is_v2(V2Runner) and not is_v2(V1Runner)
    params = {name: list(inspect.signature(getattr(V2Runner, name)).parameters)
              for name in ("finish_requests", "add_requests", "prepare_inputs", "sample", "execute_model")}
    assert params["finish_requests"] == params["add_requests"] == ["self", "scheduler_output"]
    assert params["prepare_inputs"][:2] == ["self", "scheduler_output"]
    assert params["sample"] == ["self", "hidden_states", "input_batch", "grammar_output"]
    assert "dummy_run" in params["execute_model"]
    fields = set(InputBatch.__dataclass_fields__)
    assert {"req_ids", "num_reqs", "query_start_loc_np", "num_computed_tokens_np", "num_scheduled_tokens",
            "num_tokens", "prefill_len_np"} <= fields
    for name in ("_update_states", "_prepare_inputs", "_sample", "_bookkeeping_sync", "execute_model"):
        assert hasattr(V1Runner, name), name


def test_the_worker_picks_the_adapter_of_the_runner_vllm_built(caplog: pytest.LogCaptureFixture) -> None:
    from steerserve.engines.vllm.worker import _steer_runner

    for base, mixin in ((V2Runner, SteeringRunnerV2Mixin), (V1Runner, SteeringRunnerMixin)):
        runner = object.__new__(base)  # (not initialised: only its class matters here)
        with caplog.at_level("INFO", logger="steerserve.engines.vllm.worker"):
            _steer_runner(runner)
        assert isinstance(runner, mixin) and isinstance(runner, base) and runner._steer_reqs == {}
    assert "Model Runner V2" in caplog.text and "VLLM_USE_V2_MODEL_RUNNER=0" in caplog.text
    assert "V1 model runner" in caplog.text
