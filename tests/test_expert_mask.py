"""``expert_mask`` at resolve level: the exact mask rows it compiles to (``route_op.encode_row``), the merge of
several entries (client and policy) into one ROUTE op per MoE layer, composition with ``add``, every 4xx
naming its field, and the ``expert_set`` artifact (upload checks, use by name)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from steerserve.config import Settings
from steerserve.errors import SteerError
from steerserve.methods import check_policy, resolve
from steerserve.model_info import ModelInfo, MoEInfo
from steerserve.runtime.plan import OpKind, SteerOp
from steerserve.runtime.route_op import encode_row
from steerserve.spec import PromptInfo, ResolveContext, SteerSpec
from steerserve.store.artifacts import ArtifactStore
from steerserve.store.expert_sets import expert_set_header, expert_set_tensors
from steerserve.store.policies import Policy

H, E, K = 32, 8, 2
MOE = MoEInfo(layers=(1, 2), num_experts=E, top_k=K, renormalize=True)  # layer 0 is dense
MODEL = ModelInfo(name="tiny-moe", architecture="Qwen2MoeForCausalLM", num_layers=3, hidden_size=H, vocab_size=100,
                  max_model_len=64, dtype="float32", fingerprint="moe-fp", moe=MOE)
DENSE = dataclasses.replace(MODEL, name="tiny-dense", architecture="LlamaForCausalLM", moe=None, fingerprint="dense")
PROMPT = PromptInfo((1, 2, 3), 0)
IV = "steering.interventions"


def _ctx(model: ModelInfo, store: ArtifactStore) -> ResolveContext:
    async def no_states(*_: Any) -> list[torch.Tensor]:
        raise AssertionError("not needed")

    return ResolveContext(Settings(), model, store, lambda s: [1], no_states)


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ResolveContext]:
    store = ArtifactStore(tmp_path / "store", MODEL)
    store.put_vector("v", {1: torch.ones(H)})
    yield _ctx(MODEL, store)
    store.close()


async def run(ctx: ResolveContext, *ivs: dict[str, Any], policy: Policy | None = None) -> tuple[SteerOp, ...]:
    return (await resolve(SteerSpec.from_dict({"interventions": list(ivs)}), PROMPT, ctx, policy=policy)).ops


def routes(ops: tuple[SteerOp, ...]) -> dict[int, torch.Tensor]:
    out = {op.layer: op.vector.data[0] for op in ops if op.kind == OpKind.ROUTE}
    assert len(out) == sum(op.kind == OpKind.ROUTE for op in ops), "one ROUTE op per layer"
    for op in ops:
        if op.kind == OpKind.ROUTE:
            assert (op.scale, op.start, op.stop, op.positional, op.gain) == (1.0, 0, None, False, False)
    return out


async def refused(ctx: ResolveContext, *ivs: dict[str, Any], policy: Policy | None = None,
                  status: int = 400) -> str:
    with pytest.raises(SteerError) as info:
        await run(ctx, *ivs, policy=policy)
    assert info.value.status == status, info.value
    assert info.value.field is not None
    return info.value.field


def mask(**params: Any) -> dict[str, Any]:
    return {"method": "expert_mask", **params}


async def test_rows_per_mode_and_force(ctx: ResolveContext) -> None:
    got = routes(await run(ctx, mask(experts={"1": [3, 5], "2": [0]})))
    assert set(got) == {1, 2}
    assert torch.equal(got[1], encode_row(H, E, off=[3, 5])) and torch.equal(got[2], encode_row(H, E, off=[0]))
    got = routes(await run(ctx, mask(experts={"2": [1, 6]}, mode="zero", force={"2": [4]})))
    assert torch.equal(got[2], encode_row(H, E, drop=[1, 6], forced=[4])) and set(got) == {2}
    got = routes(await run(ctx, mask(force={"1": [7, 0]})))
    assert torch.equal(got[1], encode_row(H, E, forced=[0, 7]))


async def test_entries_merge_into_one_row_per_layer(ctx: ResolveContext) -> None:
    ops = await run(ctx, mask(experts={"1": [3]}), mask(experts={"1": [3, 4], "2": [2]}, mode="zero"),
                    mask(force={"1": [6]}))
    got = routes(ops)
    assert torch.equal(got[1], encode_row(H, E, off=[3], drop=[3, 4], forced=[6]))
    assert torch.equal(got[2], encode_row(H, E, drop=[2]))


async def test_composes_with_add(ctx: ResolveContext) -> None:
    resolved = await resolve(SteerSpec.from_dict({"interventions": [
        {"method": "add", "vector": "v", "coeff": 2.0}, mask(experts={"2": [1]})]}), PROMPT, ctx)
    kinds = [(op.kind, op.layer) for op in resolved.ops]
    assert kinds == [(OpKind.ADD, 1), (OpKind.ROUTE, 2)]
    assert torch.equal(resolved.ops[1].vector.data[0], encode_row(H, E, off=[1]))
    assert resolved.applied[1].detail == {"mode": "mask", "experts": {"2": [1]}}


@pytest.mark.parametrize(("params", "field"), [
    ({"experts": {"1": [8]}}, "experts.1[0]"),  # id out of range
    ({"experts": {"1": [2, -1]}}, "experts.1[1]"),
    ({"experts": {"1": [2, 2]}}, "experts.1[1]"),  # repeated
    ({"experts": {"1": ["3"]}}, "experts.1[0]"),
    ({"experts": {"0": [1]}}, "experts.0"),  # a dense layer
    ({"experts": {"7": [1]}}, "experts.7"),  # no such layer
    ({"experts": {"x": [1]}}, "experts.x"),
    ({"experts": {"1": []}}, "experts.1"),
    ({"experts": {}}, "experts"),
    ({"mode": "mask"}, "experts"),  # neither experts nor force
    ({"experts": {"1": [1]}, "mode": "off"}, "mode"),
    ({"experts": {"1": [1]}, "coeff": 1}, ""),  # unknown parameter: the intervention itself
    ({"experts": {"1": [1, 2]}, "force": {"1": [2]}}, "force.1"),  # forced and disabled
    ({"experts": {"1": [1]}, "mode": "zero", "force": {"1": [1]}}, "force.1"),
    ({"force": {"2": [0, 1, 2]}}, "force.2"),  # more than top_k forced
    ({"experts": {"1": list(range(7))}}, "experts.1"),  # mask mode: more than E - k = 6
    ({"experts": {"1": list(range(8))}, "mode": "zero"}, "experts.1"),  # every expert, zero mode
    ({"experts": "nope"}, "experts"),  # no such expert set
])
async def test_bad_input_names_the_field(ctx: ResolveContext, params: dict[str, Any], field: str) -> None:
    want = f"{IV}.0" + (f".{field}" if field else "")
    assert await refused(ctx, mask(**params)) == want


async def test_limits_hold_at_the_limit(ctx: ResolveContext) -> None:
    assert routes(await run(ctx, mask(experts={"1": list(range(6))}, force={"1": [6, 7]})))[1][:E].tolist() == [
        -1.0] * 6 + [1.0, 1.0]
    assert routes(await run(ctx, mask(experts={"1": list(range(7))}, mode="zero")))[1][E:2 * E].sum() == 7


async def test_merged_mask_is_checked_again(ctx: ResolveContext) -> None:
    # each alone is valid; together they conflict or break the layer: the later entry is named
    assert await refused(ctx, mask(experts={"1": [2]}), mask(force={"1": [2]})) == f"{IV}.1.force.1"
    assert await refused(ctx, mask(force={"1": [2]}), mask(experts={"1": [2]})) == f"{IV}.0.force.1"
    assert await refused(ctx, mask(experts={"1": [0, 1, 2, 3]}), mask(experts={"1": [4, 5, 6]})) == \
        f"{IV}.1.experts.1"
    assert await refused(ctx, mask(force={"2": [0]}), mask(force={"2": [1, 2]})) == f"{IV}.1.force.2"
    assert await refused(ctx, mask(experts={"2": [0, 1, 2, 3]}, mode="zero"),
                         mask(experts={"2": [4, 5, 6, 7]}, mode="zero")) == f"{IV}.1.experts.2"


async def test_policy_mask_is_merged_and_cannot_be_undone(ctx: ResolveContext) -> None:
    policy = Policy("moe", mandatory=({"method": "expert_mask", "experts": {"1": [5]}},))
    await check_policy(policy, PROMPT, ctx)
    got = routes(await run(ctx, mask(experts={"1": [4]}, mode="zero"), policy=policy))
    assert torch.equal(got[1], encode_row(H, E, off=[5], drop=[4]))
    alone = routes(await run(ctx, policy=policy))
    assert set(alone) == {1} and torch.equal(alone[1], encode_row(H, E, off=[5]))
    assert await refused(ctx, mask(force={"1": [5]}), policy=policy, status=403) == f"{IV}.0.force.1"
    # too many disabled together with the policy's: a 400 on the client's field
    assert await refused(ctx, mask(experts={"1": [0, 1, 2, 3, 4, 6]}), policy=policy) == f"{IV}.0.experts.1"
    broken = Policy("moe2", mandatory=({"method": "expert_mask", "experts": {"1": [1]}},
                                       {"method": "expert_mask", "force": {"1": [1]}}))
    with pytest.raises(SteerError) as info:
        await check_policy(broken, PROMPT, ctx)
    assert info.value.field == "mandatory.1.force.1"


async def test_dense_model_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "dense", DENSE)
    try:
        assert await refused(_ctx(DENSE, store), mask(experts={"1": [1]})) == f"{IV}.0.method"
        data = safetensors.torch.save({"layer.1": torch.tensor([1])}, metadata={"kind": "expert_set"})
        with pytest.raises(SteerError) as info:
            store.put_vector_file("s", data)
        assert info.value.field == "metadata.kind"
    finally:
        store.close()


def _set_file(experts: dict[int, list[int]], scores: torch.Tensor | None = None, **meta: str) -> bytes:
    header = {**expert_set_header(MODEL, "weight", {"target": "t", "others": ["o"]}), **meta}
    return safetensors.torch.save(expert_set_tensors(experts, scores), metadata=header)


async def test_expert_set_by_name(ctx: ResolveContext) -> None:
    scores = torch.zeros(3, E)
    scores[1, 3] = 1.0
    meta = ctx.store.put_vector_file("refusal-experts", _set_file({1: [3], 2: [0, 7]}, scores))
    assert meta.kind == "expert_set" and meta.layers == (1, 2)
    loaded_meta, expert_set = ctx.store.load_expert_set("refusal-experts")
    assert expert_set.experts == {1: (3,), 2: (0, 7)} and expert_set.scores is not None
    assert torch.equal(expert_set.scores, scores)
    assert await refused(ctx, mask(experts="refusal-experts", mode="zero"),
                         mask(force="refusal-experts@1")) == f"{IV}.1.force.1"  # the set dropped and forced
    got = routes(await run(ctx, mask(experts="refusal-experts")))
    assert torch.equal(got[1], encode_row(H, E, off=[3])) and torch.equal(got[2], encode_row(H, E, off=[0, 7]))
    applied = (await resolve(SteerSpec.from_dict({"interventions": [mask(experts="refusal-experts")]}), PROMPT,
                             ctx)).applied[0]
    assert applied.artifacts == (loaded_meta.ref(),)


@pytest.mark.parametrize(("experts", "scores", "meta", "field"), [
    ({1: [8]}, None, {}, "tensors.layer.1"),
    ({1: [2, 2]}, None, {}, "tensors.layer.1"),
    ({0: [1]}, None, {}, "tensors.layer.0"),  # dense layer
    ({1: list(range(7))}, None, {}, "tensors.layer.1"),  # more than E - k
    ({}, None, {}, "tensors"),
    ({1: [1]}, torch.zeros(2, E), {}, "tensors.scores"),
    ({1: [1]}, None, {"num_experts": "16"}, "metadata.num_experts"),
    ({1: [1]}, None, {"top_k": "4"}, "metadata.top_k"),
    ({1: [1]}, None, {"by": "sum"}, "metadata.by"),
    ({1: [1]}, None, {"classes": "[1]"}, "metadata.classes"),
])
def test_expert_set_upload_checks(ctx: ResolveContext, experts: dict[int, list[int]], scores: torch.Tensor | None,
                                  meta: dict[str, str], field: str) -> None:
    with pytest.raises(SteerError) as info:
        ctx.store.put_vector_file("bad", _set_file(experts, scores, **meta))
    assert info.value.field == field and info.value.status == 400


def test_expert_set_float_ids_and_foreign_tensor_refused(ctx: ResolveContext) -> None:
    header = expert_set_header(MODEL, "count", {})
    for tensors, field in (({"layer.1": torch.tensor([1.0])}, "tensors.layer.1"),
                           ({"layer.1": torch.tensor([1]), "extra": torch.tensor([1])}, "tensors.extra")):
        with pytest.raises(SteerError) as info:
            ctx.store.put_vector_file("bad", safetensors.torch.save(tensors, metadata=header))
        assert info.value.field == field
    assert json.loads(header["classes"]) == {}


def test_http_dense_server_refuses_expert_sets(client: Any, admin_headers: dict[str, str]) -> None:
    """Over HTTP on the dense default model: an expert-set upload is a 400 naming ``metadata.kind`` (the
    ``expert_mask`` request itself is a case of ``test_validation``), and the server keeps serving."""
    data = safetensors.torch.save({"layer.1": torch.tensor([0])}, metadata={"kind": "expert_set"})
    r = client.post("/admin/vectors", params={"name": "experts"}, content=data,
                    headers={**admin_headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "metadata.kind"
    assert client.get("/admin/vectors/experts", headers=admin_headers).status_code == 404
    assert client.post("/generate", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200
