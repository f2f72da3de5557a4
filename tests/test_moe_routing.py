"""The router point (expert masks) in the hf engine, exactly, on the four tiny random MoE architectures.

Model level: with the route hooks installed and no ROUTE op the logits are bit-identical to the model
without hooks; a masked sequence changes and its batch neighbour stays bit-identical. Engine level (a
routing capture per request, MoE layer and position, after masking): a disabled expert is never chosen
("mask"), never weighted ("zero", where selection is the stock one), a forced expert is always chosen, and
in a mixed batch every request's tokens and routing are exactly those it gets alone.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from steerserve.anatomy import anatomy_of, hf_router
from steerserve.config import Settings
from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.model import load_hf
from steerserve.model_info import ModelInfo
from steerserve.runtime.bank import VectorBank
from steerserve.runtime.hooks import RouteHooks
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.route_op import encode_row
from steerserve.runtime.route_point import RouteCapture
from steerserve.runtime.tables import Placement, Segment, StepTables
from tests.arch_results import record
from tests.moe_models import ARCHS

Ops = tuple[SteerOp, ...]
MAX_TOKENS = 6
OFF, DROP, FORCED = (0, 1, 2), (0, 1, 2), (5,)


def prompts(n: int = 3, length: int = 12, seed: int = 0) -> list[tuple[int, ...]]:
    """Fixed, seeded random prompts (token ids 3..49151: no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(3, 49152, (length,), generator=g).tolist()) for _ in range(n)]


def mask_ops(info: ModelInfo, off: Iterable[int] = (), drop: Iterable[int] = (), forced: Iterable[int] = (),
             layers: Iterable[int] | None = None) -> Ops:
    """One ROUTE op per MoE layer (all of them by default) with the same mask row."""
    assert info.moe is not None
    row = VectorRef.of(encode_row(info.hidden_size, info.moe.num_experts, off, drop, forced))
    return tuple(SteerOp(OpKind.ROUTE, layer, row, 1.0) for layer in (info.moe.layers if layers is None else layers))


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def loaded(arch: str, moe_checkpoints: dict[str, Path]) -> tuple[Any, Any, ModelInfo]:
    return load_hf(moe_checkpoints[arch])


def test_loads_with_batch_independent_experts(loaded: tuple[Any, Any, ModelInfo]) -> None:
    model, _, info = loaded
    assert info.moe is not None and info.moe.top_k == 2
    assert model.config._experts_implementation == "batched_mm"


def test_unmasked_is_bit_identical_and_a_neighbour_is_untouched(loaded: tuple[Any, Any, ModelInfo]) -> None:
    model, _, info = loaded
    assert info.moe is not None
    ids = torch.tensor(prompts(2))
    seq = ids.shape[1]
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        bank = VectorBank(16, info.hidden_size)
        tables = StepTables(info.num_layers, 64, 2)
        capture = RouteCapture()
        hooks = RouteHooks({i: hf_router(model, i) for i in info.moe.layers}, info.moe.num_experts,
                           info.moe.renormalize, bank, tables, capture, anatomy_of(info.architecture).router_out)
        try:
            tables.fill(2 * seq, [])
            assert torch.equal(model(input_ids=ids).logits, ref)  # no ROUTE op: the router's own output
            ops = mask_ops(info, off=OFF)
            rows = bank.acquire(op.vector for op in ops)
            assert rows is not None
            # ROUTE on sequence 0 only; sequence 1 reads row 0 (all zero) in the same forward pass
            tables.fill(2 * seq, [Segment(0, 0, seq, Placement.build(ops, rows, 2))])
            capture.on = True
            capture.begin([_read("masked", 0, seq), _read("plain", seq, seq)])
            out = model(input_ids=ids).logits
        finally:
            hooks.remove()
        assert torch.equal(out[1], ref[1])
        assert not torch.equal(out[0], ref[0])
        masked = capture.take("masked")
        assert masked is not None and set(masked["ids"]) == set(info.moe.layers)
        assert all(not set(OFF) & set(t) for per in masked["ids"].values() for t in per)
        assert torch.equal(model(input_ids=ids).logits, ref)  # hooks removed: the stock model again


def _read(request: str, offset: int, count: int) -> Any:
    from steerserve.runtime.capture import Read

    return Read(request, offset, 0, count)


@pytest.fixture(scope="module")
async def engine(loaded: tuple[Any, Any, ModelInfo]) -> AsyncIterator[HFEngine]:
    model, tokenizer, info = loaded
    eng = HFEngine(model, tokenizer, info, Settings(max_batch=8, bank_slots=64))
    await eng.start()
    await eng.set_route_capture(True)
    yield eng
    eng.route_hooks and eng.route_hooks.remove()
    eng.hooks.remove()
    await eng.stop()


async def run(engine: Any, ids: Sequence[int], ops: Ops) -> tuple[list[int], dict[str, Any]]:
    """Greedy tokens and the recorded routing of one request."""
    rid = uuid.uuid4().hex
    req = GenerationRequest(rid, tuple(ids), SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), ops)
    tokens = [t async for o in engine.generate(req) for t in o.token_ids]
    routing = await engine.take_routing(rid)
    assert routing is not None
    return tokens, routing


async def together(engine: Any, jobs: Sequence[tuple[Sequence[int], Ops]]) -> list[tuple[list[int], dict[str, Any]]]:
    return list(await asyncio.gather(*(run(engine, ids, ops) for ids, ops in jobs)))


def _chosen(routing: dict[str, Any]) -> Iterable[tuple[int, list[int], list[float]]]:
    for layer, per in routing["ids"].items():
        for ids, w in zip(per, routing["weights"][layer], strict=True):
            yield int(layer), ids, w


async def test_mask_zero_and_force_semantics(engine: HFEngine) -> None:
    info = engine.info
    assert info.moe is not None
    record(info.architecture, "expert_mask_hf", False)  # until every check below has passed
    p = prompts()[0]
    n_pos = len(p) + MAX_TOKENS - 1  # every position the model ran on
    plain_tokens, plain = await run(engine, p, ())
    assert all(len(per) == n_pos for per in plain["ids"].values())
    _, masked = await run(engine, p, mask_ops(info, off=OFF))
    assert all(not set(OFF) & set(ids) for _, ids, _ in _chosen(masked))
    _, zeroed = await run(engine, p, mask_ops(info, drop=DROP))
    dropped = 0
    for _, ids, w in _chosen(zeroed):
        for e, x in zip(ids, w, strict=True):
            if e in DROP:
                assert x == 0.0
                dropped += 1
    assert dropped > 0  # the test exercises the point: some dropped expert was selected
    first = info.moe.layers[0]  # before any masked layer ran: selection is the stock one
    assert zeroed["ids"][first][: len(p)] == plain["ids"][first][: len(p)]
    _, forced = await run(engine, p, mask_ops(info, off=(0,), forced=FORCED))
    assert all(FORCED[0] in ids and 0 not in ids for _, ids, _ in _chosen(forced))
    assert forced["ids"] != plain["ids"]
    record(info.architecture, "expert_mask_hf", True)


def same_route(a: tuple[list[int], dict[str, Any]], b: tuple[list[int], dict[str, Any]]) -> bool:
    """Same tokens and expert ids; weights equal up to float rounding (the hf engine's batched decode
    rounds differently from a request alone, masked or not: attention over a left-padded batch)."""
    (ta, ra), (tb, rb) = a, b
    return ta == tb and ra["ids"] == rb["ids"] and all(
        abs(x - y) <= 1e-5 for layer in ra["weights"] for pa, pb in zip(ra["weights"][layer], rb["weights"][layer],
                                                                         strict=True)
        for x, y in zip(pa, pb, strict=True))


async def test_mixed_batch_matches_alone(engine: HFEngine) -> None:
    info = engine.info
    ps = prompts(4, seed=1)
    jobs = [(ps[0], mask_ops(info, off=OFF)), (ps[1], ()), (ps[2], mask_ops(info, drop=DROP, forced=FORCED)),
            (ps[3], ())]
    alone = [await run(engine, ids, ops) for ids, ops in jobs]
    mixed = await together(engine, jobs)
    assert all(same_route(a, m) for a, m in zip(alone, mixed, strict=True))
    unmasked = await together(engine, [(ids, ()) for ids, _ in jobs])
    # the unmasked requests of the mixed batch route as beside unmasked neighbours (bit for bit within one
    # forward pass: test_unmasked_is_bit_identical_and_a_neighbour_is_untouched; across engine runs the
    # decode batch's make-up depends on arrival timing, which moves the weights' last bits)
    assert same_route(mixed[1], unmasked[1]) and same_route(mixed[3], unmasked[3])
    assert mixed[0][1]["ids"] != unmasked[0][1]["ids"] and mixed[2][1]["ids"] != unmasked[2][1]["ids"]


def test_route_rows_read_the_route_table_only() -> None:
    """ROUTE ops fill their own table (row 0 = the bank's zero row elsewhere) and never make a step steered."""
    from steerserve.runtime.route_point import route_rows

    bank, tables = VectorBank(8, 32), StepTables(3, 16, 2)
    row = encode_row(32, 8, off=(1,), drop=(2,), forced=(3,))
    ops = (SteerOp(OpKind.ROUTE, 1, VectorRef.of(row), 1.0, start=2),)
    rows = bank.acquire(op.vector for op in ops)
    assert rows is not None
    tables.fill(6, [])
    assert route_rows(tables, bank.weight, 1, 6, 8) is None  # no ROUTE op this step: the fast path
    tables.fill(6, [Segment(1, 0, 4, Placement.build(ops, rows, 2))])  # tokens 1..4 at positions 0..3
    assert tables.active and not tables.steering
    got = route_rows(tables, bank.weight, 1, 6, 8)
    assert got is not None and got.shape == (6, 16)
    assert torch.equal(got[3], row[:16]) and torch.equal(got[4], row[:16])  # positions 2, 3 (start=2)
    assert not got[[0, 1, 2, 5]].any()  # other tokens and positions read the all-zero row 0
    assert not route_rows(tables, bank.weight, 0, 6, 8).any()  # another layer: nothing


def test_compile_cache_key_covers_the_router_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's compile caches are keyed by ``code_fingerprint``: it must change with the router point's code
    outside ``engines/vllm`` (``route_op``, ``route_point``) as with the op files themselves."""
    from steerserve.engines.vllm import plugin

    base = plugin.code_fingerprint()
    real = Path.read_bytes

    def edited(self: Path) -> bytes:
        data = real(self)
        return data + b"\n# edited" if self.name == "route_op.py" else data

    monkeypatch.setattr(Path, "read_bytes", edited)
    assert plugin.code_fingerprint() != base


def test_routers_whose_masks_would_mean_something_else_are_named() -> None:
    """DeepSeek-V2: a grouped top-k or a routed scaling factor leaves the model served, expert masks refused
    with the reason (``ExpertMask.compile`` turns it into a 400); renormalised weights are refused outright."""
    from steerserve.model import moe_info
    from tests import moe_models

    def info(**fields: Any) -> Any:
        cfg = moe_models.config("deepseek_v2")
        cfg.architectures = ["DeepseekV2ForCausalLM"]
        for key, value in fields.items():
            setattr(cfg, key, value)
        return moe_info(cfg)

    plain = info()
    assert plain.unmaskable == "" and plain.layers == (1, 2) and plain.num_experts == 8  # layer 0 dense
    assert "grouped top-k" in info(n_group=2, topk_group=1, topk_method="group_limited_greedy").unmaskable
    assert "routed_scaling_factor=16.0" in info(routed_scaling_factor=16.0).unmaskable
    with pytest.raises(RuntimeError, match="norm_topk_prob"):
        info(norm_topk_prob=True)
