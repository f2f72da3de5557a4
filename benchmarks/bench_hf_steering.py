"""Steering overhead of the hf engine: N concurrent requests, each with its own vector on every layer,
against the same N requests unsteered, measured side by side in one run.

Each round runs both conditions back to back (the order flips every round, so slow drift of the machine
-- thermal, other processes -- falls on both sides equally). A condition submits all N requests at once
so the engine decodes them in one continuous batch; its throughput is the tokens actually generated
divided by the wall time from submission to the last request finishing. Decoding is greedy, so every
round of a condition generates the same tokens and the rounds differ only in timing.

    python benchmarks/bench_hf_steering.py --requests 8 --max-tokens 64 --rounds 3

The steered requests use ``add`` semantics: request ``i`` adds ``coeff * v_i[layer]`` at every position
(prompt and generated) of every decoder layer, where ``v_i`` is a random unit vector per layer -- so the
batch holds ``N * num_layers`` distinct vectors, as N users each sending their own stored multi-layer
vector would. The coefficient is small so that the steered text stays close to the unsteered one and
both conditions generate comparable numbers of tokens (the table prints both counts).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from steerserve.config import Settings
from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.model import load_hf, prepare_default_model
from steerserve.prompts import PromptRenderer
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef

PROMPTS = (
    "Tell me about your weekend.",
    "Describe the weather.",
    "Write a sentence about my neighbour.",
    "Explain how a bicycle works.",
    "Give me a recipe for pancakes.",
    "What is the capital of France?",
    "Write a short story about a robot.",
    "List some tips for studying.",
)


@dataclass(frozen=True)
class RoundResult:
    """One condition in one round: generated tokens (per request) and wall time for the whole batch."""

    tokens: tuple[int, ...]
    texts: tuple[str, ...]
    seconds: float

    @property
    def total(self) -> int:
        return sum(self.tokens)

    @property
    def tok_per_s(self) -> float:
        return self.total / self.seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=8, help="concurrent requests per condition")
    p.add_argument("--max-tokens", type=int, default=64, help="max new tokens per request (greedy)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs both conditions")
    p.add_argument("--model", type=Path, default=None,
                   help="transformers model directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--coeff", type=float, default=0.5, help="scale of each unit steering vector")
    p.add_argument("--max-batch", type=int, default=16, help="the engine's batch limit (Settings.max_batch)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random steering vectors")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch default)")
    return p.parse_args(argv)


def default_model_dir() -> Path:
    """The same cache the tests use, so a prepared model is reused rather than rebuilt."""
    return Path(os.environ.get("STEERSERVE_TEST_MODELS", Path.home() / ".cache" / "steerserve" / "models"))


def build_requests(engine: HFEngine, n: int, max_tokens: int, coeff: float, seed: int,
                   steered: bool, tag: str) -> list[GenerationRequest]:
    """``n`` chat requests over the fixed prompts (cycled); steered ones carry their own vector per layer."""
    render = PromptRenderer(engine.tokenizer, engine.settings.max_prompt_tokens).render
    layers, hidden = engine.info.num_layers, engine.info.hidden_size
    gen = torch.Generator().manual_seed(seed)  # same vectors every round: only timing varies
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    out = []
    for i in range(n):
        ids = render(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]).token_ids
        ops: tuple[SteerOp, ...] = ()
        if steered:
            v = torch.randn(layers, hidden, generator=gen)
            v = v / v.norm(dim=-1, keepdim=True)  # unit per layer, so coeff is the added norm
            ops = tuple(SteerOp(OpKind.ADD, layer, VectorRef.of(v[layer]), coeff) for layer in range(layers))
        out.append(GenerationRequest(f"{tag}-{i}", ids, sampling, ops))
    return out


async def run_batch(engine: HFEngine, requests: list[GenerationRequest]) -> RoundResult:
    """Submit every request at once and wait for all of them; time from submission to the last finish."""

    async def one(req: GenerationRequest) -> tuple[int, str]:
        text, count, reason = "", 0, None
        async for out in engine.generate(req):
            text += out.text
            count = out.completion_tokens
            reason = out.finish_reason
        if reason == "abort":  # an engine failure would otherwise look like a fast round
            raise RuntimeError(f"request {req.request_id} was aborted")
        return count, text

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in requests))
    seconds = time.perf_counter() - t0
    return RoundResult(tuple(c for c, _ in results), tuple(t for _, t in results), seconds)


async def bench(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = args.model if args.model is not None else prepare_default_model(default_model_dir())
    model, tokenizer, info = load_hf(path)
    # The bank must hold every request's per-layer vectors at once, or requests would queue for rows
    # and the steered condition would measure waiting, not steering.
    rows = args.requests * info.num_layers
    settings = Settings(max_batch=args.max_batch, bank_slots=max(512, rows + 1))
    if args.requests > args.max_batch:
        print(f"note: {args.requests} requests > max batch {args.max_batch}; some will wait for a slot")
    engine = HFEngine(model, tokenizer, info, settings)
    await engine.start()
    try:
        conditions = {
            "unsteered": lambda tag: build_requests(engine, args.requests, args.max_tokens, args.coeff,
                                                    args.seed, False, tag),
            "steered": lambda tag: build_requests(engine, args.requests, args.max_tokens, args.coeff,
                                                  args.seed, True, tag),
        }
        # Warm-up: first calls pay for allocator growth and lazy initialisation in torch.
        for name, make in conditions.items():
            await run_batch(engine, make(f"warm-{name}")[:2])
        results: dict[str, list[RoundResult]] = {name: [] for name in conditions}
        names = list(conditions)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                res = await run_batch(engine, conditions[name](f"r{r}-{name}"))
                results[name].append(res)
                print(f"round {r + 1} {name:>9}: {res.total:5d} tokens in {res.seconds:6.2f} s "
                      f"= {res.tok_per_s:7.1f} tok/s", flush=True)
    finally:
        await engine.stop()
    report(args, info.name, info.num_layers, results)
    return 0


def report(args: argparse.Namespace, model: str, layers: int, results: dict[str, list[RoundResult]]) -> None:
    med = {name: statistics.median(r.tok_per_s for r in rs) for name, rs in results.items()}
    base, steer = results["unsteered"][0], results["steered"][0]
    differ = sum(a != b for a, b in zip(base.texts, steer.texts, strict=True))
    print()
    print(f"model {model}, {args.requests} concurrent requests, greedy, max_tokens {args.max_tokens}, "
          f"{args.rounds} rounds, torch threads {torch.get_num_threads()}")
    print(f"steered: add, a distinct random unit vector per request and layer on all {layers} layers, "
          f"coeff {args.coeff}")
    print()
    print(f"{'condition':<10} {'tokens/round':>12} {'per request (min-max)':>22} {'median s':>9} "
          f"{'median tok/s':>13} {'all rounds tok/s':>24}")
    for name, rs in results.items():
        toks = rs[0].tokens
        per_round = ", ".join(f"{r.tok_per_s:.1f}" for r in rs)
        print(f"{name:<10} {rs[0].total:>12d} {f'{min(toks)}-{max(toks)}':>22} "
              f"{statistics.median(r.seconds for r in rs):>9.2f} {med[name]:>13.1f} {per_round:>24}")
    print()
    print(f"ratio steered/unsteered (median tok/s): {med['steered'] / med['unsteered']:.3f}")
    # Each round's two runs are back to back, so their ratio cancels slow drift of a shared machine.
    paired = [s.tok_per_s / u.tok_per_s for s, u in zip(results["steered"], results["unsteered"], strict=True)]
    print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in paired)} (median {statistics.median(paired):.3f})")
    print(f"steered outputs that differ from unsteered: {differ}/{args.requests} "
          "(non-zero shows the steering is live)")


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(bench(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
