"""EAST: the extraction math, the decision situations, the ``entropic`` method's compilation and errors, and
its effect on the default model (the shipped ``vectors/east.safetensors``)."""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from steerserve.config import Settings
from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.errors import SteerError
from steerserve.methods import resolve
from steerserve.methods.entropic import DEFAULT_BETA_MAX, Entropic
from steerserve.model_info import ModelInfo
from steerserve.prompts import PromptRenderer
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.plan import OpKind
from steerserve.spec import PromptInfo, ResolveContext, SteerSpec
from steerserve.store.artifacts import ArtifactStore
from steerserve.tools.extract import east
from steerserve.tools.extract.east_cli import held_out

SHIPPED = Path(__file__).resolve().parents[1] / "vectors" / "east.safetensors"
MODEL = ModelInfo(name="tiny", architecture="LlamaForCausalLM", num_layers=4, hidden_size=8, vocab_size=100,
                  max_model_len=128, dtype="float32", fingerprint="fp-1")
WHERE = "steering.interventions.0"
PROMPT = PromptInfo(tuple(range(10, 17)), 2)  # 7 tokens: the last prompt token is at position 6


# ---- the extraction math ---------------------------------------------------------------------------------


def test_east_direction_is_entropy_weighted_and_centred_per_run() -> None:
    # run 0: mean (2, 0), centred rows (-1, 0), (1, 0), H 1 and 3 -> (2, 0)
    # run 1: mean (0, 6), centred rows (0, -1), (0, 1), H 2 and 0 -> (0, -2); sum H = 6
    states = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [0.0, 7.0]])
    h = torch.tensor([1.0, 3.0, 2.0, 0.0])
    u = east.east_direction(states, h, [0, 0, 1, 1])
    assert torch.allclose(u, torch.tensor([2.0, -2.0], dtype=torch.float64) / 6)
    # Centring over all rows at once (one global mean (1, 3)) would give (4, -8) / 6 here.
    # Per-run centring: a constant offset per run changes nothing, whatever the runs' order.
    shifted = states + torch.tensor([[10.0, -4.0], [10.0, -4.0], [-3.0, 8.0], [-3.0, 8.0]])
    assert torch.allclose(east.east_direction(shifted, h, [0, 0, 1, 1]), u)
    assert torch.allclose(east.east_direction(shifted[[2, 0, 3, 1]], h[[2, 0, 3, 1]], [1, 0, 1, 0]), u)


def test_choice_entropy_renormalises_over_the_options() -> None:
    logits = torch.tensor([[5.0, 0.3, 0.3, -2.0], [0.0, math.log(3.0), 0.0, 9.0]])
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # options 1 and 2 of row 1: odds 3 to 1
    got = east.choice_entropy(logits, (1, 2))  # the tokens outside the options (logit 9 included) do not count
    assert torch.allclose(got, torch.tensor([1.0, h], dtype=torch.float64))
    assert math.isclose(float(east.choice_entropy(logits[1], (1, 0))), h, rel_tol=1e-6)  # log(3) in float32


def test_situations_are_seeded_runs_whose_history_grows() -> None:
    a, b = east.situations(3, 4, seed=7), east.situations(3, 4, seed=7)
    assert a == b and a != east.situations(3, 4, seed=8)
    assert [(s.run, s.step) for s in a] == [(k, t) for k in range(3) for t in range(4)]
    for s in a:
        rounds = [line for line in s.user.splitlines() if line.split(":")[0].split(" ")[-1].isdigit()]
        assert len(rounds) == s.step  # step t shows the t rounds played before it
        if s.step > 1:  # a run is one game: its earlier history is kept word for word
            before = a[a.index(s) - 1].user.split("\n\n")[1]
            assert s.user.split("\n\n")[1].startswith(before)


# ---- the method ----------------------------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ResolveContext]:
    store = ArtifactStore(tmp_path / "store", MODEL)
    g = torch.Generator().manual_seed(0)
    store.put_vector("one", {2: torch.randn(8, generator=g)}, method="east")
    store.put_vector("many", {1: torch.randn(8, generator=g), 3: torch.randn(8, generator=g)})
    store.put_pair("pair", "a", "b")
    other = ArtifactStore(tmp_path / "store", dataclasses.replace(MODEL, fingerprint="fp-2"))
    other.put_vector("foreign", {2: torch.ones(8)})
    other.close()

    async def no_states(*_: Any) -> list[torch.Tensor]:
        raise AssertionError("not needed")

    def tokenize(text: str) -> list[int]:  # up to two characters are one token (" A" = one id), else two
        return [sum(map(ord, text)) % 100] if len(text) <= 2 else [1, 2]

    yield ResolveContext(Settings(), MODEL, store, tokenize, no_states)
    store.close()


async def compile_(ctx: ResolveContext, **params: Any) -> Any:
    return await Entropic().compile(params, PROMPT, ctx, WHERE)


async def test_open_loop_adds_beta_u_from_the_last_prompt_token_on(ctx: ResolveContext) -> None:
    c = await compile_(ctx, vector="one", beta=0.25)
    (op,) = c.ops
    stored = ctx.store.load_vector("one")
    assert (op.kind, op.layer, op.scale, op.start, op.stop, op.gain, op.positional) == (
        OpKind.ADD, 2, 0.25, 6, None, False, False)
    assert torch.equal(op.vector.data[0], stored.tensors[2])
    assert c.loop is None and c.artifacts == ("one@1",) and c.detail == {"layer": 2, "beta": 0.25}
    (op3,) = (await compile_(ctx, vector="many", beta=-1, layer=3)).ops
    assert (op3.layer, op3.scale) == (3, -1.0)


async def test_closed_loop_scales_beta_max_by_the_gain_toward_the_target(ctx: ResolveContext) -> None:
    c = await compile_(ctx, vector="one", target_entropy=0.6)
    (op,) = c.ops
    assert (op.layer, op.scale, op.start, op.stop, op.gain) == (2, DEFAULT_BETA_MAX, 6, None, True)
    assert c.loop is not None and c.loop.target == 0.6 and (c.loop.low, c.loop.high) == (-1.0, 1.0)
    c2 = await compile_(ctx, vector="one", target_entropy=3, beta_max=0.75)
    assert c2.ops[0].scale == 0.75 and c2.loop is not None and c2.loop.target == 3.0
    spec = SteerSpec.from_dict({"interventions": [{"method": "entropic", "vector": "one", "target_entropy": 0.3}]})
    resolved = await resolve(spec, PROMPT, ctx)
    assert resolved.loop == LoopSpec(target=0.3) and resolved.ops[0].gain
    twice = SteerSpec.from_dict({"interventions": [{"method": "entropic", "vector": "one", "target_entropy": 0.3}] * 2})
    with pytest.raises(SteerError) as e:
        await resolve(twice, PROMPT, ctx)
    assert e.value.field == "steering.interventions.1"


async def test_closed_loop_over_options_measures_their_tokens(ctx: ResolveContext) -> None:
    c = await compile_(ctx, vector="one", target_entropy=0.6, options=[" A", " B", " C"], initial_gain=-0.25,
                       kp=0.125, ki=0)
    assert c.loop == LoopSpec(target=0.6, initial=-0.25, kp=0.125, ki=0.0, options=(97, 98, 99))
    assert c.detail["options"] == [" A", " B", " C"]


@pytest.mark.parametrize(("params", "field", "code"), [
    ({"vector": "one", "beta": float("nan")}, "beta", "invalid"),
    ({"vector": "one", "beta": float("inf")}, "beta", "invalid"),
    ({"vector": "one", "beta": 1e6}, "beta", "invalid"),
    ({"vector": "one", "beta": "0.5"}, "beta", "invalid"),
    ({"vector": "one", "beta": True}, "beta", "invalid"),
    ({"vector": "one"}, "beta", "invalid"),
    ({"vector": "one", "beta": 0.1, "target_entropy": 0.5}, "target_entropy", "invalid"),
    ({"vector": "one", "target_entropy": 0}, "target_entropy", "invalid"),
    ({"vector": "one", "target_entropy": -0.5}, "target_entropy", "invalid"),
    ({"vector": "one", "target_entropy": math.log2(100)}, "target_entropy", "invalid"),
    ({"vector": "one", "target_entropy": float("nan")}, "target_entropy", "invalid"),
    ({"vector": "one", "target_entropy": float("inf")}, "target_entropy", "invalid"),
    ({"vector": "one", "target_entropy": None}, "target_entropy", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "beta_max": 0}, "beta_max", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "beta_max": float("nan")}, "beta_max", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "beta_max": 1e6}, "beta_max", "invalid"),
    ({"vector": "one", "beta": 0.5, "beta_max": 1}, "beta_max", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "options": " A"}, "options", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "options": [" A"]}, "options", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "options": [" A"] * 9}, "options", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "options": [" A", 2]}, "options[1]", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "options": [" A", " yes"]}, "options[1]", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "options": [" A", " A"]}, "options[1]", "invalid"),
    ({"vector": "one", "target_entropy": 1.0, "options": [" A", " B"]}, "target_entropy", "invalid"),
    ({"vector": "one", "beta": 0.5, "options": [" A", " B"]}, "options", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "initial_gain": 1.5}, "initial_gain", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "initial_gain": float("nan")}, "initial_gain", "invalid"),
    ({"vector": "one", "beta": 0.5, "initial_gain": 0.5}, "initial_gain", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "kp": -0.1}, "kp", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "ki": 5}, "ki", "invalid"),
    ({"vector": "one", "target_entropy": 0.5, "ki": float("inf")}, "ki", "invalid"),
    ({"vector": "one", "beta": 0.5, "kp": 0.5}, "kp", "invalid"),
    ({"beta": 0.5}, "vector", "invalid"),
    ({"vector": "nope", "beta": 0.5}, "vector", "unknown_artifact"),
    ({"vector": "pair", "beta": 0.5}, "vector", "wrong_kind"),
    ({"vector": "foreign", "beta": 0.5}, "vector", "model_mismatch"),
    ({"vector": "many", "beta": 0.5}, "layer", "invalid"),
    ({"vector": "one", "beta": 0.5, "layer": 1}, "layer", "invalid"),
    ({"vector": "one", "beta": 0.5, "layer": 4}, "layer", "invalid"),
    ({"vector": "one", "beta": 0.5, "coeff": 1}, "", "invalid"),
])
async def test_bad_input_names_the_field(ctx: ResolveContext, params: dict[str, Any], field: str,
                                         code: str) -> None:
    with pytest.raises(SteerError) as e:
        await compile_(ctx, **params)
    assert (e.value.field, e.value.code, e.value.status) == (f"{WHERE}.{field}".rstrip("."), code, 400), str(e.value)


# ---- on the default model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> bytes:
    if not SHIPPED.exists():
        pytest.skip(f"{SHIPPED} is missing")
    return SHIPPED.read_bytes()


async def _resolve(engine: HFEngine, tmp_path: Path, data: bytes, prompt: PromptInfo, **params: Any) -> Any:
    store = ArtifactStore(tmp_path / "real", engine.info)
    try:
        if not store.list():
            store.put_vector_file("east", data)
        ctx = ResolveContext(Settings(), engine.info, store, lambda s: [1], engine.hidden_states)
        spec = SteerSpec.from_dict({"interventions": [{"method": "entropic", "vector": "east", **params}]})
        return (await resolve(spec, prompt, ctx)).ops
    finally:
        store.close()


def _held_out(engine: HFEngine, n: int) -> list[PromptInfo]:
    renderer = PromptRenderer(engine.tokenizer, 4096)
    return [renderer.render(str(r["prompt"])) for r in held_out(engine.tokenizer, n, 1, seed=2)]


async def test_beta_zero_is_unsteered_bit_for_bit(hf_engine: HFEngine, shipped: bytes, tmp_path: Path) -> None:
    async def tokens(prompt: PromptInfo, ops: Any) -> tuple[int, ...]:
        req = GenerationRequest(uuid.uuid4().hex, prompt.token_ids, SamplingParams(max_tokens=8, temperature=0.8,
                                                                                     seed=3), tuple(ops))
        return tuple([t async for out in hf_engine.generate(req) for t in out.token_ids])

    for prompt in _held_out(hf_engine, 2):
        zero = await _resolve(hf_engine, tmp_path, shipped, prompt, beta=0)
        assert zero and zero[0].scale == 0.0
        assert await tokens(prompt, zero) == await tokens(prompt, ())
        plain, steered = await east.score(hf_engine, [prompt.token_ids], [15]), await east.score(
            hf_engine, [prompt.token_ids], [15], zero)
        assert torch.equal(plain[0].logits, steered[0].logits)


async def test_shipped_vector_raises_choice_entropy_on_held_out_situations(
    hf_engine: HFEngine, shipped: bytes, tmp_path: Path
) -> None:
    options = east.option_ids(hf_engine.tokenizer)
    plain, steered = [], []
    for prompt in _held_out(hf_engine, 8):
        ops = await _resolve(hf_engine, tmp_path, shipped, prompt, beta=0.5)
        plain.append((await east.score(hf_engine, [prompt.token_ids], [0]))[0].logits)
        steered.append((await east.score(hf_engine, [prompt.token_ids], [0], ops))[0].logits)
    h0 = float(east.choice_entropy(torch.stack(plain), options).mean())
    h1 = float(east.choice_entropy(torch.stack(steered), options).mean())
    assert h1 > h0 + 0.05, (h0, h1)
