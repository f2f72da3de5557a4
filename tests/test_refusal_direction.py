"""Refusal directions: the ``direction`` artifact (validation, kinds), ``add``/``ablate`` with one, the
extraction math and selection of ``tools.refusal``, and the shipped direction's effect on the default model."""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from steerserve.config import Settings
from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.errors import SteerError
from steerserve.evaluation.metrics import is_refusal
from steerserve.evaluation.scoring import ScoreItem, Scorer
from steerserve.methods import resolve
from steerserve.methods.ablate import Ablate
from steerserve.methods.add import Add
from steerserve.methods.entropic import Entropic
from steerserve.model_info import ModelInfo
from steerserve.prompts import PromptRenderer
from steerserve.runtime.plan import OpKind
from steerserve.spec import PromptInfo, ResolveContext, SteerSpec
from steerserve.store.artifacts import STEERING_KINDS, ArtifactStore
from steerserve.store.directions import direction_header
from steerserve.tools.extract import refusal as rf

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "vectors" / "refusal_direction.safetensors"
HARMFUL_VAL = ROOT.parent / "shared" / "data" / "refusal" / "harmful_val.json"
COEFF = 0.25  # the README's recommended coefficient for the shipped direction (units of the layer's mean norm)
MODEL = ModelInfo(name="tiny", architecture="LlamaForCausalLM", num_layers=4, hidden_size=8, vocab_size=100,
                  max_model_len=128, dtype="float32", fingerprint="fp-1")
WHERE = "steering.interventions.0"
PROMPT = PromptInfo(tuple(range(10, 17)), 2)
TABLE = [{"layer": 2, "position": "-1", "kept": True, "chosen": True}]


def unit(seed: int = 0, n: int = 8) -> torch.Tensor:
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def direction_file(model: ModelInfo = MODEL, vec: torch.Tensor | None = None,
                   tensors: dict[str, torch.Tensor] | None = None, **meta: str) -> bytes:
    """A direction file at layer 2 (scale 150); ``meta`` overrides metadata, ``"<drop>"`` removes a key."""
    header = direction_header(model, 2, 150.0, "response", TABLE, provenance=json.dumps({"command": "test"}))
    header.update(meta)
    header = {k: v for k, v in header.items() if v != "<drop>"}
    return safetensors.torch.save(tensors or {"layer.2": unit() if vec is None else vec}, metadata=header)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArtifactStore]:
    s = ArtifactStore(tmp_path / "store", MODEL)
    yield s
    s.close()


# ---- the artifact ----------------------------------------------------------------------------------------


def test_direction_round_trip_and_kinds(store: ArtifactStore) -> None:
    meta = store.put_vector_file("refusal", direction_file())
    assert (meta.kind, meta.layers, meta.method) == ("direction", (2,), "upload")
    assert "candidates" not in meta.provenance["file_metadata"]  # the table stays in the file
    loaded = store.load_vector("refusal", kinds=STEERING_KINDS)
    assert loaded.is_direction and loaded.scale() == 150.0 and loaded.candidates() == TABLE
    assert torch.allclose(loaded.tensors[2], unit())
    assert [m.ref() for m in store.list("direction")] == ["refusal@1"]
    assert [m.ref() for m in store.list(STEERING_KINDS)] == ["refusal@1"] and store.list("vector") == []
    with pytest.raises(SteerError) as e:  # methods that take vectors only refuse a direction by name
        store.load_vector("refusal", field="f")
    assert (e.value.field, e.value.code) == ("f", "wrong_kind") and "direction" in e.value.message


@pytest.mark.parametrize("data, field", [
    (lambda: direction_file(tensors={"layer.2": unit(), "layer.3": unit(1)}), "tensors"),
    (lambda: direction_file(tensors={"layer.1": unit()}), "metadata.layer"),
    (lambda: direction_file(layer="<drop>"), "metadata.layer"),
    (lambda: direction_file(layer="two"), "metadata.layer"),
    (lambda: direction_file(vec=unit() * 1.01), "tensors.layer.2"),
    (lambda: direction_file(vec=torch.full((8,), float("nan"))), "tensors.layer.2"),
    (lambda: direction_file(vec=unit(n=9) * 1), "tensors.layer.2"),
    (lambda: direction_file(tensors={"layer.7": unit()}, layer="7"), "tensors.layer.7"),
    (lambda: direction_file(scale="<drop>"), "metadata.scale"),
    (lambda: direction_file(scale="-1.0"), "metadata.scale"),
    (lambda: direction_file(scale="inf"), "metadata.scale"),
    (lambda: direction_file(candidates="{}"), "metadata.candidates"),
    (lambda: direction_file(model=dataclasses.replace(MODEL, fingerprint="fp-2")), "model_fingerprint"),
    (lambda: direction_file(model=dataclasses.replace(MODEL, hidden_size=9)), "hidden_size"),
    (lambda: direction_file(kind="bogus"), "metadata.kind"),
    (lambda: direction_file(kind="probe"), "metadata.layer"),  # a probe file carries no direction keys
    (lambda: safetensors.torch.save({"layer.2": unit()}, metadata={"scale": "1.0"}), "metadata.scale"),
])
def test_bad_directions_are_refused_naming_the_field(store: ArtifactStore, data: Any, field: str) -> None:
    with pytest.raises(SteerError) as e:
        store.put_vector_file("d", data())
    assert (e.value.field, e.value.status) == (field, 400), e.value.message
    assert store.list() == []  # nothing half written


# ---- add and ablate with a direction -----------------------------------------------------------------------


@pytest.fixture
def ctx(store: ArtifactStore) -> ResolveContext:
    store.put_vector_file("dir", direction_file())
    store.put_vector("vec", {1: unit(3), 3: unit(4)})
    store.put_pair("pair", "a", "b")

    async def no_states(*_: Any) -> list[torch.Tensor]:
        raise AssertionError("not needed")

    return ResolveContext(Settings(), MODEL, store, lambda s: [1], no_states)


async def test_add_scales_the_unit_vector_and_names_its_layer(ctx: ResolveContext) -> None:
    c = await Add().compile({"vector": "dir", "coeff": 0.5}, PROMPT, ctx, WHERE)
    (op,) = c.ops
    assert (op.kind, op.layer, op.scale, op.start, op.stop) == (OpKind.ADD, 2, 0.5, 0, None)
    assert torch.allclose(op.vector.data[0], unit() * 150.0)  # coeff is in units of the layer's mean norm
    assert c.detail["scale"] == 150.0 and c.artifacts == ("dir@1",)
    assert (await Add().compile({"vector": "dir", "coeff": 1, "layers": [2]}, PROMPT, ctx, WHERE)).ops[0].layer == 2
    plain = await Add().compile({"vector": "vec", "coeff": 2}, PROMPT, ctx, WHERE)  # vectors are unchanged
    assert [op.layer for op in plain.ops] == [1, 3] and "scale" not in plain.detail
    assert torch.equal(plain.ops[0].vector.data[0], unit(3))


async def test_add_refuses_another_layer_and_the_wrong_kinds(ctx: ResolveContext) -> None:
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (Add(), {"vector": "dir", "coeff": 1, "layers": [1]}, f"{WHERE}.layers"),
        (Add(), {"vector": "dir", "coeff": 1, "layers": "all"}, f"{WHERE}.layers"),
        (Add(), {"vector": "pair", "coeff": 1}, f"{WHERE}.vector"),
        (Add(), {"vector": "nope", "coeff": 1}, f"{WHERE}.vector"),
        (Entropic(), {"vector": "dir", "beta": 0.1}, f"{WHERE}.vector"),  # a vector-only method
    ]
    for method, params, field in cases:
        with pytest.raises(SteerError) as e:
            await method.compile(params, PROMPT, ctx, WHERE)
        assert (e.value.field, e.value.status) == (field, 400), (params, e.value.message)


async def test_ablate_a_direction_at_every_layer_by_default(ctx: ResolveContext) -> None:
    c = await Ablate().compile({"vector": "dir"}, PROMPT, ctx, WHERE)
    assert [op.layer for op in c.ops] == [0, 1, 2, 3] and {op.kind for op in c.ops} == {OpKind.ABLATE}
    assert all(torch.allclose(op.vector.data[0], unit()) for op in c.ops)
    assert [op.layer for op in (await Ablate().compile({"vector": "dir", "layers": [1]}, PROMPT, ctx, WHERE)).ops] \
        == [1]


async def test_a_foreign_direction_is_refused(tmp_path: Path) -> None:
    other = ArtifactStore(tmp_path / "s", dataclasses.replace(MODEL, fingerprint="fp-2"))
    other.put_vector_file("d", direction_file(model=other.model))
    other.close()
    mine = ArtifactStore(tmp_path / "s", MODEL)
    try:
        ctx = ResolveContext(Settings(), MODEL, mine, lambda s: [1], None)  # type: ignore[arg-type]
        with pytest.raises(SteerError) as e:
            await Add().compile({"vector": "d", "coeff": 1}, PROMPT, ctx, WHERE)
        assert (e.value.field, e.value.code) == (f"{WHERE}.vector", "model_mismatch")
    finally:
        mine.close()


# ---- extraction math and selection ---------------------------------------------------------------------------


def test_post_instruction_count_is_the_template_suffix() -> None:
    def render(msg: str) -> tuple[int, ...]:
        return (1, 2, *(ord(ch) for ch in msg), 7, 8, 9)

    assert rf.post_instruction_count(render) == 3


def test_prompt_candidates_are_float64_mean_differences_per_position_and_layer() -> None:
    g = torch.Generator().manual_seed(0)
    harmful = [torch.randn(6 + i, 2, 4, generator=g) for i in range(3)]  # [len, L, H], ragged lengths
    harmless = [torch.randn(5, 2, 4, generator=g) for _ in range(2)]
    cands = rf.prompt_candidates(harmful, harmless, [3, 7], post=2)
    assert [(c.layer, c.position) for c in cands] == [(3, "-2"), (3, "-1"), (7, "-2"), (7, "-1")]
    want = torch.stack([h[-1, 1].double() for h in harmful]).mean(0) - torch.stack(
        [h[-1, 1].double() for h in harmless]).mean(0)
    assert cands[3].diff.dtype == torch.float64 and torch.allclose(cands[3].diff, want)
    assert math.isclose(float(cands[3].unit().norm()), 1.0)


def test_response_candidates_pair_the_two_replies_of_each_prompt() -> None:
    # one prompt of 2 tokens; refusal reply of 3 tokens, compliant of 1; reply_tokens 2
    r = torch.tensor([[[0.0]], [[0.0]], [[2.0]], [[4.0]], [[100.0]]])
    c = torch.tensor([[[0.0]], [[0.0]], [[1.0]]])
    (cand,) = rf.response_candidates([r], [c], [2], [(3, 1)], [5], reply_tokens=2)
    assert cand.layer == 5 and cand.position == "reply[:2]" and float(cand.diff[0]) == 3.0 - 1.0


def test_refusal_score_is_the_log_odds_of_the_refusal_tokens() -> None:
    p = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    assert math.isclose(float(rf.refusal_score(p.log(), [0, 1])[0]), 0.0, abs_tol=1e-9)
    assert math.isclose(float(rf.refusal_score(p.log(), [0])[0]), math.log(0.2 / 0.8), rel_tol=1e-9)
    assert math.isclose(float(rf.kl(p.log(), p.log())[0]), 0.0, abs_tol=1e-9)


def _cand(layer: int) -> rf.Candidate:
    return rf.Candidate(layer, "-1", torch.ones(4, dtype=torch.float64))


def test_selection_follows_the_paper_and_relaxes_only_when_nothing_passes() -> None:
    base = {"refusal_score_harmless": -2.0}
    cands = [_cand(layer) for layer in (2, 4, 6, 25)]
    figs = [rf.Figures(0.05, -1.0, -1.0, 0), rf.Figures(0.05, -3.0, -1.5, 0),  # ok, ok (lowest ablated)
            rf.Figures(0.5, -5.0, -1.0, 0), rf.Figures(0.0, -9.0, 0.0, 0)]  # KL too high, layer too deep
    best, notes = rf.select("prompt", cands, figs, base, num_layers=30)
    assert best == 1 and notes == [] and [f.kept for f in figs] == [True, True, False, False]
    assert figs[3].why == ["layer >= 0.8 N"]
    # nothing raises refusal: the induction filter is relaxed, KL still holds
    low = [dataclasses.replace(f, induced_score_harmless=-3.0) for f in figs]
    best, notes = rf.select("prompt", cands, low, base, num_layers=30)
    assert best == 1 and "induction filter was relaxed" in notes[0]
    # response: the highest induced harmful refusal rate; KL is not a filter
    resp = [dataclasses.replace(f, induced_rate_harmful=r) for f, r in zip(figs, (0.2, 0.5, 0.9, 1.0), strict=True)]
    best, notes = rf.select("response", cands, resp, base, num_layers=30)
    assert best == 2 and notes == []


# ---- the default model -----------------------------------------------------------------------------------------


async def test_batched_last_logprobs_match_the_model(hf_engine: HFEngine) -> None:
    renderer = PromptRenderer(hf_engine.tokenizer, 4096)
    prompts = [renderer.render(messages=[{"role": "user", "content": t}]).token_ids
               for t in ("Hi", "Name three colours of the rainbow, please.", "What is 2+2?")]
    got = await rf.last_logprobs(hf_engine, prompts)
    ctx = ResolveContext(Settings(), hf_engine.info, None,  # type: ignore[arg-type]
                         renderer.tokenize, hf_engine.hidden_states)
    scorer = Scorer(hf_engine, ctx, probe_ids=list(range(5)))
    for i, p in enumerate(prompts):  # the scorer's own (all-position) forward, one prompt at a time
        (s,) = await scorer.score([ScoreItem(PromptInfo(p, 0), (), ())], kl=False)
        assert all(math.isclose(float(got[i, t]), s.first[t], abs_tol=1e-4) for t in range(5))


@pytest.fixture(scope="module")
def shipped() -> bytes:
    if not SHIPPED.exists():
        pytest.skip(f"{SHIPPED} is missing")
    return SHIPPED.read_bytes()


async def test_shipped_direction_makes_harmful_requests_refuse(hf_engine: HFEngine, shipped: bytes,
                                                               tmp_path: Path) -> None:
    """The README's coefficient on the first harmful val prompts: the unsteered model complies with all of
    them, the steered one refuses most (the full figures are ``steerserve eval``'s, in the README)."""
    if not HARMFUL_VAL.exists():
        pytest.skip(f"{HARMFUL_VAL} is missing (../shared/data)")
    renderer = PromptRenderer(hf_engine.tokenizer, 4096)
    texts = [r["instruction"] for r in json.loads(HARMFUL_VAL.read_text())[:6]]
    store = ArtifactStore(tmp_path / "real", hf_engine.info)
    try:
        store.put_vector_file("refusal_direction", shipped)
        ctx = ResolveContext(Settings(), hf_engine.info, store, renderer.tokenize, hf_engine.hidden_states)

        async def reply(text: str, steer: bool) -> str:
            prompt = renderer.render(messages=[{"role": "user", "content": text}])
            spec = {"interventions": [{"method": "add", "vector": "refusal_direction", "coeff": COEFF}]}
            ops = (await resolve(SteerSpec.from_dict(spec), prompt, ctx)).ops if steer else ()
            req = GenerationRequest(uuid.uuid4().hex, prompt.token_ids, SamplingParams(max_tokens=24), tuple(ops))
            ids = [t async for out in hf_engine.generate(req) for t in out.token_ids]
            return renderer.decode(ids)

        plain = [is_refusal(await reply(t, False)) for t in texts]
        steered = [is_refusal(await reply(t, True)) for t in texts]
        ablate = SteerSpec.from_dict({"interventions": [{"method": "ablate", "vector": "refusal_direction"}]})
        ops = (await resolve(ablate, PromptInfo((1, 2, 3), 0), ctx)).ops
        assert len(ops) == hf_engine.info.num_layers  # the direction is ablated at every layer
    finally:
        store.close()
    assert sum(plain) == 0 and sum(steered) >= 5, (plain, steered)
