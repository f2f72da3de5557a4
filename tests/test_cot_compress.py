"""``cot_compress`` (ASC): the gamma_max closed form, the JVP against finite differences on the real model,
the method's compiled ops and its refusals, and gamma 0 == unsteered bit for bit on the hf engine."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from steerserve.config import Settings
from steerserve.engines.hf import HFEngine
from steerserve.errors import SteerError
from steerserve.evaluation import metrics
from steerserve.methods.cot_compress import CotCompress
from steerserve.model import load_hf, model_info, prepare_default_model
from steerserve.model_info import ModelInfo
from steerserve.prompts import PromptRenderer
from steerserve.spec import PromptInfo, ResolveContext
from steerserve.store.artifacts import ArtifactStore, file_header
from steerserve.tools import gsm8k
from steerserve.tools.calibrate import kl_bound
from steerserve.tools.common import write_artifact
from steerserve.tools.extract.asc import CONCISE_TEMPLATE, TEMPLATE, complete, model_chains, pair_ids, user_prompt
from tests.paths import models_dir

SHIPPED = Path(__file__).resolve().parents[1] / "vectors" / "asc.safetensors"


@pytest.mark.parametrize(("a", "curv", "eps"),
                         [(4.0, 0.4, 1e-3), (0.5, 3.0, 1e-3), (10.0, 50.0, 0.1), (2.0, 1e-3, 1e-4)])
def test_gamma_solves_the_second_order_kl_model(a: float, curv: float, eps: float) -> None:
    raw, gmax = kl_bound.solve_gamma(a, curv, eps)
    assert raw > 0
    assert a**2 * raw**2 / 4 + a * curv * raw**3 / 4 == pytest.approx(eps, rel=1e-12)
    assert gmax == pytest.approx((1 - curv * raw / (4 * a)) * raw, rel=1e-15)
    assert 0 < gmax < raw


def test_gamma_tends_to_the_first_order_value() -> None:
    a, eps = 3.0, 1e-3
    first_order = 2 * math.sqrt(eps) / a
    assert kl_bound.solve_gamma(a, 0.0, eps) == (first_order, first_order)
    raw, gmax = kl_bound.solve_gamma(a, 1e-7, eps)
    assert raw == pytest.approx(first_order, rel=1e-7) and gmax == pytest.approx(first_order, rel=1e-7)
    with pytest.raises(ValueError):
        kl_bound.solve_gamma(0.0, 1.0, eps)


@pytest.fixture(scope="module")
def real() -> tuple[Any, Any, ModelInfo]:
    return load_hf(prepare_default_model(models_dir()))


def test_jvp_matches_finite_differences_and_padding(real: tuple[Any, Any, ModelInfo]) -> None:
    """``J u`` from the nested forward-mode pass equals a central difference of the real model's logits,
    and a state computed inside a left-padded batch equals the same state alone."""
    model, tokenizer, info = real
    model.set_attn_implementation("eager")
    try:
        r = PromptRenderer(tokenizer, 2048)
        short = r.render(messages=[{"role": "user", "content": "What is 12 times 7?"}]).token_ids
        long = r.render(messages=[{"role": "user", "content": "A farmer has 3 fields of 40 cows each and sells "
                                                              "a quarter of them. How many cows are left?"}]).token_ids
        u = torch.randn(info.hidden_size, generator=torch.Generator().manual_seed(0))
        u = u / u.norm()
        layers = model.model.layers
        alone = kl_bound.shifted_logits(model, layers, kl_bound.prepare_states(model, [short], 0), 12, u)
        with kl_bound.twice_differentiable(layers):
            f0, d1, d2 = kl_bound.derivatives(alone)
        h = 0.05
        with torch.no_grad():
            fd = (alone(torch.tensor(h)) - alone(torch.tensor(-h))) / (2 * h)
        assert float((fd - d1).norm() / d1.norm()) < 2e-2
        assert float(d1.norm()) == pytest.approx(float(fd.norm()), rel=5e-3)
        assert float(d2.norm()) > 0
        batch = kl_bound.shifted_logits(model, layers, kl_bound.prepare_states(model, [long, short], 0), 12, u)
        with kl_bound.twice_differentiable(layers):
            g0, e1, _ = kl_bound.derivatives(batch)
        assert torch.allclose(g0[1], f0[0], atol=1e-3, rtol=1e-4)
        assert float((e1[1] - d1[0]).norm() / d1.norm()) < 1e-3
    finally:
        model.set_attn_implementation("sdpa")


# ---- the method: compiled ops and refusals -------------------------------------------------------------

CAL_LAYER, GAMMA_MAX = 12, 0.0123


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return model_info(prepare_default_model(models_dir()), "float32", None)


@pytest.fixture(scope="module")
def ctx(info: ModelInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResolveContext]:
    root = tmp_path_factory.mktemp("cot-store")
    store = ArtifactStore(root, info)
    v = torch.randn(info.hidden_size, generator=torch.Generator().manual_seed(1))

    def upload(name: str, tensors: dict[int, torch.Tensor], **extra: str) -> None:
        path = root / f"{name}.safetensors"
        write_artifact(path, tensors, file_header(info, "vector", method="asc", **extra))
        store.put_vector_file(name, path.read_bytes())

    upload("plain", {CAL_LAYER: v})
    calibration = json.dumps({"layer": CAL_LAYER, "gamma_max": GAMMA_MAX})
    upload("cal", {CAL_LAYER: v}, calibration=calibration)
    upload("two", {3: -v, CAL_LAYER: v}, calibration=calibration)
    store.put_pair("a-pair", "Love", "Hate")
    yield ResolveContext(Settings(max_coeff=100.0), info, store, lambda s: [], _no_states)
    store.close()


async def _no_states(prompts: Any, layers: Any) -> list[torch.Tensor]:
    raise AssertionError("cot_compress needs no hidden states")


PROMPT = PromptInfo(tuple(range(30)), 5)
WHERE = "steering.interventions.0"


async def test_compile_adds_from_the_last_prompt_token(ctx: ResolveContext) -> None:
    out = await CotCompress().compile({"vector": "plain", "gamma": 1.5}, PROMPT, ctx, WHERE)
    (op,) = out.ops
    assert (op.layer, op.scale, op.start, op.stop, op.positional, op.gain) == (CAL_LAYER, 1.5, 29, None, False, False)
    stored = ctx.store.load_vector("plain")
    assert torch.equal(op.vector.data[0], stored.tensors[CAL_LAYER])
    assert out.artifacts == ("plain@1",) and out.loop is None


async def test_auto_reads_the_calibrated_gamma_max(ctx: ResolveContext) -> None:
    out = await CotCompress().compile({"vector": "cal", "gamma": "auto"}, PROMPT, ctx, WHERE)
    assert out.ops[0].scale == GAMMA_MAX and out.detail["auto"] is True
    out = await CotCompress().compile({"vector": "two", "gamma": -2, "layer": 3}, PROMPT, ctx, WHERE)
    assert (out.ops[0].layer, out.ops[0].scale) == (3, -2.0)


@pytest.mark.parametrize(("params", "field", "needle"), [
    ({"vector": "plain", "gamma": "auto"}, "gamma", "not calibrated"),
    ({"vector": "plain", "gamma": float("nan")}, "gamma", "finite"),
    ({"vector": "plain", "gamma": float("inf")}, "gamma", "finite"),
    ({"vector": "plain", "gamma": 100.5}, "gamma", "exceeds"),
    ({"vector": "plain", "gamma": "fast"}, "gamma", "auto"),
    ({"vector": "plain", "gamma": True}, "gamma", "number"),
    ({"vector": "plain"}, "gamma", "required"),
    ({"vector": "cal", "gamma": "auto", "layer": 3}, "layer", "no entry"),
    ({"vector": "two", "gamma": "auto"}, "layer", "choose one"),
    ({"vector": "two", "gamma": "auto", "layer": 3}, "gamma", "calibrated at layer 12"),
    ({"vector": "plain", "gamma": 1, "layer": 30}, "layer", "out of range"),
    ({"vector": "a-pair", "gamma": 1}, "vector", "not a vector"),
    ({"vector": "nope", "gamma": 1}, "vector", "unknown"),
    ({"vector": "plain", "gamma": 1, "coeff": 2}, "", "unknown parameter"),
])
async def test_bad_input_names_the_field(ctx: ResolveContext, params: dict[str, Any], field: str, needle: str) -> None:
    with pytest.raises(SteerError) as e:
        await CotCompress().compile(params, PROMPT, ctx, WHERE)
    assert e.value.field == (f"{WHERE}.{field}" if field else WHERE) and needle in str(e.value)
    assert 400 <= e.value.status < 500


async def test_an_artifact_for_another_model_is_refused(ctx: ResolveContext, info: ModelInfo) -> None:
    other = ModelInfo(**{**info.__dict__, "fingerprint": "0" * 16})
    theirs = ArtifactStore(ctx.store.root, other)  # same manifest, another loaded model
    try:
        with pytest.raises(SteerError) as e:
            await CotCompress().compile({"vector": "cal", "gamma": "auto"}, PROMPT,
                                        ResolveContext(ctx.settings, other, theirs, ctx.tokenize, _no_states), WHERE)
        assert e.value.field == f"{WHERE}.vector" and e.value.code == "model_mismatch"
    finally:
        theirs.close()


# ---- the real model on the hf engine ------------------------------------------------------------------

async def test_gamma_zero_is_unsteered_bit_for_bit(hf_engine: HFEngine, ctx: ResolveContext) -> None:
    r = PromptRenderer(hf_engine.tokenizer, 2048)
    prompt = r.render(messages=[{"role": "user", "content": "Tom has 3 apples and buys 5 more. How many now?"}])
    plain = await complete(hf_engine, prompt.token_ids, 24)
    zero = await CotCompress().compile({"vector": "plain", "gamma": 0}, prompt, ctx, WHERE)
    strong = await CotCompress().compile({"vector": "plain", "gamma": 8}, prompt, ctx, WHERE)
    assert (await complete(hf_engine, prompt.token_ids, 24, zero.ops)).token_ids == plain.token_ids
    assert (await complete(hf_engine, prompt.token_ids, 24, strong.ops)).token_ids != plain.token_ids


class _NoGeneration:
    """Stands in for the engine on a second call: everything must come from the cache."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info

    def generate(self, request: Any) -> Any:
        raise AssertionError("the cache should have answered")


async def test_model_concise_pairs_and_the_chain_cache(hf_engine: HFEngine, tmp_path: Path) -> None:
    """``--concise model``: both answers of a pair are the model's own, after the same step-by-step prompt;
    the cache keeps one entry per prompt template, and a second run generates nothing."""
    r = PromptRenderer(hf_engine.tokenizer, 2048)
    problems = [gsm8k.Problem(7, "Tom has 3 apples and buys 5 more. How many now?", "3+5=<<3+5=8>>8\n#### 8")]
    cache = tmp_path / "chains.json"
    verbose = await model_chains(hf_engine, r, problems, 24, cache)
    concise = await model_chains(hf_engine, r, problems, 24, cache, CONCISE_TEMPLATE)
    direct = await complete(hf_engine, user_prompt(r, problems[0].question, CONCISE_TEMPLATE), 24)
    assert concise[7] == direct.token_ids and verbose[7] != concise[7]
    again = _NoGeneration(hf_engine.info)
    assert await model_chains(again, r, problems, 24, cache) == verbose
    assert await model_chains(again, r, problems, 24, cache, CONCISE_TEMPLATE) == concise
    pos, neg = pair_ids(r, problems, verbose, concise)
    prompt = user_prompt(r, problems[0].question, TEMPLATE)
    assert pos == [prompt + concise[7]] and neg == [prompt + verbose[7]]
    calc, _ = pair_ids(r, problems, verbose, "calc")
    assert calc == [prompt + tuple(r.tokenize("3+5=8\n#### 8"))]


# ---- data and the shipped artifact ----------------------------------------------------------------------

needs_data = pytest.mark.skipif(not gsm8k.DEFAULT_DATA.is_file(),
                                reason=f"GSM8K data not found at {gsm8k.DEFAULT_DATA} (../shared/data is absent)")


@needs_data
def test_concise_answers_from_gsm8k() -> None:
    first, second = gsm8k.read_rows(gsm8k.DEFAULT_DATA, 0, 2)
    assert (first.row, first.gold, second.row) == (0, "72", 1)
    assert gsm8k.calculations(first.answer) == "48/2=24\n48+24=72\n#### 72"
    assert gsm8k.worked(first.answer).startswith("Natalia sold 48/2 = 24 clips in May.")
    final = "so 48 + 24 = 72.\nThe answer is: 1,072 clips."
    assert metrics.ends_with_number(final) and metrics.last_number(final) == 1072.0
    assert not metrics.ends_with_number("The answer is 72.\n\nHope that helps!")


def test_repetition_share() -> None:
    assert metrics.repetition("a b c d e") == 0.0
    assert metrics.repetition("x y z x y z") == pytest.approx(1 / 4)  # grams xyz yzx zxy xyz: one repeat


@pytest.mark.skipif(not SHIPPED.is_file(), reason="vectors/asc.safetensors is not built")
def test_shipped_artifact_is_calibrated_consistently() -> None:
    import safetensors

    with safetensors.safe_open(str(SHIPPED), framework="pt") as f:
        header = f.metadata()
        (name,) = list(f.keys())
        v = f.get_tensor(name)
    cal, prov = json.loads(header["calibration"]), json.loads(header["provenance"])
    assert header["method"] == "asc" and name == f"layer.{cal['layer']}" and prov["layer"] == cal["layer"]
    _, gmax = kl_bound.solve_gamma(cal["a"], cal["L"], cal["eps"])
    assert cal["gamma_max"] == pytest.approx(gmax / float(v.norm()), rel=1e-6)
    # METHODS.md's check of the bound: the KL measured at gamma_max is near eps (not orders of magnitude off)
    assert cal["eps"] / 3 < cal["kl_at_gamma_max"]["mean"] < 3 * cal["eps"]
    rows = [prov["rows"], cal["rows"]]  # extraction and calibration rows are disjoint
    assert rows[0][1] <= rows[1][0] or rows[1][1] <= rows[0][0]
