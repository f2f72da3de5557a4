"""Cost of the router point (MoE expert masks) on vLLM, measured side by side in one run.

N concurrent requests unmasked vs the same N requests each with its own DISTINCT expert mask on every MoE
layer (request i disables a different set of experts per layer, so the batch holds N x layers distinct mask
rows and every token of every step goes through the masked routing). Each round runs both conditions back
to back, the order flipping every round; a condition submits all N at once (one continuous batch) and its
throughput is generated tokens over the wall time from submission to the last finish. Greedy with
``ignore_eos``: both conditions generate exactly the same number of tokens.

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/bench_moe.py --model PATH_TO_MOE_CHECKPOINT
    python benchmarks/bench_moe.py --build qwen3_moe   # builds the tiny test checkpoint (tests/moe_models.py)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steerserve.config import Settings  # noqa: E402
from steerserve.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from steerserve.model import model_info, prepare_default_model  # noqa: E402
from steerserve.model_info import ModelInfo  # noqa: E402
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef  # noqa: E402
from steerserve.runtime.route_op import encode_row  # noqa: E402

# --build sizes: config overrides on tests/moe_models.py's checkpoints. "small" has 8 MoE layers of 16 experts
# at hidden 1024 (about 0.4 B parameters, fp32): a step costs what a small real MoE's does on this CPU.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {"hidden_size": 1024, "num_attention_heads": 16, "head_dim": 64, "num_hidden_layers": 8,
              "intermediate_size": 1024, "moe_intermediate_size": 512, "num_experts": 16},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a local MoE checkpoint directory")
    p.add_argument("--build", choices=("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"),
                   help="build this tiny random test checkpoint into a temp dir and use it")
    p.add_argument("--size", choices=tuple(SIZES), default="tiny",
                   help="with --build: the test checkpoint's own size, or a larger random one (a real step's cost)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mode", choices=("mask", "zero"), default="mask",
                   help="mask: disable experts (the batch then routes to other experts: the model's own work "
                        "changes too); zero: drop experts after selection (the same experts run, only their "
                        "weights change: the router point's own cost)")
    return p.parse_args(argv)


def requests(info: ModelInfo, n: int, prompt_tokens: int, max_tokens: int, masked: bool,
             mode: str = "mask") -> list[GenerationRequest]:
    """``n`` requests with seeded random prompts; when ``masked``, each with its own mask on every MoE layer
    (``mode`` "mask": disabled experts; "zero": dropped after selection)."""
    assert info.moe is not None
    moe, rng = info.moe, random.Random(0)
    out = []
    for _ in range(n):
        prompt = tuple(rng.randrange(3, info.vocab_size) for _ in range(prompt_tokens))
        ops: list[SteerOp] = []
        if masked:
            for layer in moe.layers:  # a distinct set of disabled experts per (request, layer)
                off = rng.sample(range(moe.num_experts), max(1, (moe.num_experts - moe.top_k) // 2))
                row = encode_row(info.hidden_size, moe.num_experts, off=off if mode == "mask" else (),
                                 drop=off if mode == "zero" else (), forced=())
                ops.append(SteerOp(OpKind.ROUTE, layer, VectorRef.of(row), 1.0))
        out.append(GenerationRequest(uuid.uuid4().hex, prompt,
                                     SamplingParams(max_tokens=max_tokens, ignore_eos=True), tuple(ops)))
    return out


async def run_batch(engine: object, reqs: list[GenerationRequest]) -> tuple[int, float]:
    async def one(req: GenerationRequest) -> int:
        return sum(len(o.token_ids) for o in [o async for o in engine.generate(req)])  # type: ignore[attr-defined]

    t = time.perf_counter()
    tokens = await asyncio.gather(*(one(r) for r in reqs))
    return sum(tokens), time.perf_counter() - t


async def bench(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from steerserve.engines.vllm.engine import VLLMEngine

    path = args.model
    if args.build:
        from tests.moe_models import build

        path = build(args.build, Path(tempfile.mkdtemp()) / args.build, prepare_default_model(
            Path(os.environ.get("STEERSERVE_TEST_MODELS", Path.home() / ".cache/steerserve/models"))),
            **SIZES[args.size])
    info = model_info(path)
    if info.moe is None:
        raise SystemExit(f"{path} is not a MoE model")
    rows = args.requests * len(info.moe.layers) + 1
    settings = Settings(bank_slots=max(rows + 1, 64), max_batch=args.requests, engine_args={"max_model_len": 512})
    engine = VLLMEngine(path, AutoTokenizer.from_pretrained(path), info, settings)
    await engine.start()
    try:
        await run_batch(engine, requests(info, args.requests, args.prompt_tokens, 4, True, args.mode))  # warm-up
        results: dict[str, list[float]] = {"unmasked": [], "masked": []}
        for r in range(args.rounds):
            order = ["unmasked", "masked"] if r % 2 == 0 else ["masked", "unmasked"]
            for name in order:
                reqs = requests(info, args.requests, args.prompt_tokens, args.max_tokens, name == "masked", args.mode)
                tokens, seconds = await run_batch(engine, reqs)
                results[name].append(tokens / seconds)
                print(f"round {r + 1} {name:>8}: {tokens} tokens in {seconds:6.2f} s = {tokens / seconds:7.1f} tok/s")
    finally:
        await engine.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    paired = [m / u for m, u in zip(results["masked"], results["unmasked"], strict=True)]
    print(f"\nmodel {info.architecture} ({len(info.moe.layers)} MoE layers, {info.moe.num_experts} experts, "
          f"top-{info.moe.top_k}), vllm, {args.requests} concurrent requests, greedy, ignore_eos, "
          f"max_tokens {args.max_tokens}, {args.rounds} rounds; masked = a distinct {args.mode} mask per request "
          f"on every MoE layer")
    print(f"median tok/s: unmasked {med['unmasked']:.1f}, masked {med['masked']:.1f}")
    print(f"ratio masked/unmasked (median tok/s): {med['masked'] / med['unmasked']:.3f}; per round: "
          f"{', '.join(f'{x:.3f}' for x in paired)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(bench(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
