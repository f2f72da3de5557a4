"""Steering cost on either engine, measured side by side in one run: two conditions, same requests.

``--compare steering`` (default): N concurrent requests unsteered vs the same N requests each with its
own random vector on every decoder layer (so the batch holds N x layers distinct vectors).
``--compare specs``: the N requests all sharing ONE steering spec vs each with its own distinct spec
(same layers, same coefficient): cost must not depend on how many distinct specs share a batch.
``--compare loop``: unsteered vs the same N requests each with its own CLOSED-LOOP spec: what
``entropic`` with ``target_entropy`` compiles to (one vector at ``--loop-layer`` from the last prompt token
on, its scale times the request's gain register, which the sampler-side step moves toward the request's
own target entropy every step): the cost of the registers, the entropy step and the gain multiply.
``--compare clamp``: unsteered vs the same N requests each clamping its own ``--clamp-features`` SAE features
(random unit encoder and decoder rows, ReLU, targets 2-6) at ``--loop-layer`` on every position: what
``sae_feature`` with ``mode: "clamp"`` compiles to (a CLAMP op per feature: each token's activation read on
the device from the encoder row, then ``(target - a) * W_dec[i]`` added).
``--compare safeswitch``: unsteered vs the same N requests, every other one with SafeSwitch (the probes
``--probes`` and head ``--head`` files, e.g. the shipped ones): the probes on the device, the pilot held
back in the front end and, for a flagged request, the regeneration with the refusal head. The prompts are
harmless, so unflagged requests must give the unsteered text exactly (the report counts differences).

Each round runs both conditions back to back (the order flips every round, so slow drift of the machine
falls on both sides equally). A condition submits all N requests at once so the engine decodes them in
one continuous batch; its throughput is generated tokens divided by the wall time from submission to
the last finish. Decoding is greedy with ``ignore_eos``: every request generates exactly max_tokens, so
both conditions do the same amount of work and only the steering differs.

    python benchmarks/bench_steering.py --engine vllm --requests 16 --max-tokens 64 --rounds 3
    python benchmarks/bench_steering.py --engine vllm --compare specs --requests 32
    python benchmarks/bench_steering.py --engine vllm --compare loop --requests 16
    python benchmarks/bench_steering.py --engine vllm --compare clamp --requests 16
    python benchmarks/bench_steering.py --engine vllm --compare safeswitch --requests 16
    python benchmarks/bench_steering.py --engine hf --requests 8

The vectors are unit-norm per layer with a small coefficient (``add`` semantics, every position), so the
text stays close to the unsteered one; the report says how many outputs the steering changed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from steerserve.config import Settings
from steerserve.engines.base import Engine, GenerationRequest, SamplingParams
from steerserve.engines.switching import switching
from steerserve.model import load_hf, model_info, prepare_default_model
from steerserve.prompts import PromptRenderer
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.safeswitch import ProbePair, SafeSwitchSpec

PROMPTS = (
    "Tell me about your weekend.",
    "Describe the weather.",
    "Write a sentence about my neighbour.",
    "Explain how a bicycle works.",
    "Give me a recipe for pancakes.",
    "What is the capital of France?",
    "Write a short story about a robot.",
    "List some tips for studying.",
    "Why is the sky blue?",
    "Write a poem about autumn.",
    "How do I make a paper plane?",
    "Describe your favourite city.",
    "What should I pack for a hike?",
    "Summarise the plot of a fairy tale.",
    "Give me three facts about octopuses.",
    "How does a refrigerator keep food cold?",
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
    p.add_argument("--engine", choices=("hf", "vllm"), default="vllm", help="engine to measure (default: vllm)")
    p.add_argument("--probes", type=Path, default=Path("vectors/safeswitch_probes.safetensors"),
                   help="probe file (--compare safeswitch)")
    p.add_argument("--head", type=Path, default=Path("vectors/refusal_head.safetensors"),
                   help="refusal-head file (--compare safeswitch)")
    p.add_argument("--compare", choices=("steering", "specs", "loop", "clamp", "safeswitch"), default="steering",
                   help="steering: unsteered vs distinct vectors; specs: one shared spec vs distinct specs; "
                        "loop: unsteered vs distinct closed-loop specs; clamp: vs distinct SAE feature clamps")
    p.add_argument("--loop-layer", type=int, default=15,
                   help="layer of the closed-loop vector (--compare loop) or of the clamps (--compare clamp)")
    p.add_argument("--clamp-features", type=int, default=2, help="features each request clamps (--compare clamp)")
    p.add_argument("--requests", type=int, default=16, help="concurrent requests per condition")
    p.add_argument("--max-tokens", type=int, default=64, help="max new tokens per request (greedy)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs both conditions")
    p.add_argument("--model", type=Path, default=None,
                   help="transformers model directory (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--coeff", type=float, default=0.5, help="scale of each unit steering vector")
    p.add_argument("--max-batch", type=int, default=64, help="the engine's batch limit (Settings.max_batch)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random steering vectors")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch default)")
    return p.parse_args(argv)


def default_model_dir() -> Path:
    """The same cache the tests use, so a prepared model is reused rather than rebuilt."""
    return Path(os.environ.get("STEERSERVE_TEST_MODELS", Path.home() / ".cache" / "steerserve" / "models"))


def build_requests(engine: Engine, render: PromptRenderer, n: int, max_tokens: int, coeff: float, seed: int,
                   vectors: int, tag: str, loop_layer: int | None = None,
                   clamps: int = 0) -> list[GenerationRequest]:
    """``n`` chat requests over the fixed prompts (cycled). ``vectors``: 0 = unsteered, 1 = all requests
    share one spec, n = each request has its own; a spec is a unit vector per layer on every layer, or with
    ``loop_layer`` a closed-loop spec (one vector there, gain-scaled, its own target entropy)."""
    if loop_layer is not None and clamps:
        return build_clamp_requests(engine, render, n, max_tokens, seed, vectors, tag, loop_layer, clamps)
    if loop_layer is not None:
        return build_loop_requests(engine, render, n, max_tokens, seed, vectors, tag, loop_layer)
    layers, hidden = engine.info.num_layers, engine.info.hidden_size
    gen = torch.Generator().manual_seed(seed)  # same vectors every round: only timing varies
    specs = []
    for _ in range(vectors):
        v = torch.randn(layers, hidden, generator=gen)
        v = v / v.norm(dim=-1, keepdim=True)  # unit per layer, so coeff is the added norm
        specs.append(tuple(SteerOp(OpKind.ADD, layer, VectorRef.of(v[layer]), coeff) for layer in range(layers)))
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = []
    for i in range(n):
        ids = render.render(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]).token_ids
        ops = specs[i % vectors] if vectors else ()
        out.append(GenerationRequest(f"{tag}-{i}", ids, sampling, ops))
    return out


def build_loop_requests(engine: Engine, render: PromptRenderer, n: int, max_tokens: int, seed: int, vectors: int,
                        tag: str, layer: int) -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(seed)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = []
    for i in range(n):
        ids = render.render(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]).token_ids
        ops: tuple[SteerOp, ...] = ()
        loop = None
        if vectors:
            v = torch.randn(engine.info.hidden_size, generator=gen)
            ops = (SteerOp(OpKind.ADD, layer, VectorRef.of(v / v.norm() * 8.0), 1.0, len(ids) - 1, gain=True),)
            loop = LoopSpec(target=0.5 + 2.0 * i / max(n - 1, 1))  # 0.5 .. 2.5 bits, one per request
        out.append(GenerationRequest(f"{tag}-{i}", ids, sampling, ops, loop))
    return out


def build_clamp_requests(engine: Engine, render: PromptRenderer, n: int, max_tokens: int, seed: int, vectors: int,
                         tag: str, layer: int, clamps: int) -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(seed)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    hidden = engine.info.hidden_size
    out = []
    for i in range(n):
        ids = render.render(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]).token_ids
        ops: list[SteerOp] = []
        for k in range(clamps if vectors else 0):
            enc, dec = torch.randn(hidden, generator=gen), torch.randn(hidden, generator=gen)
            rows = torch.stack([enc / enc.norm(), dec / dec.norm(), torch.zeros(hidden)])  # ReLU, offset 0
            ops.append(SteerOp(OpKind.CLAMP, layer, VectorRef.of(rows), 2.0 + 4.0 * k / max(clamps - 1, 1)))
        out.append(GenerationRequest(f"{tag}-{i}", ids, sampling, tuple(ops)))
    return out


async def make_engine(args: argparse.Namespace) -> tuple[Engine, PromptRenderer]:
    path = args.model if args.model is not None else prepare_default_model(default_model_dir())
    info = model_info(path)
    # The bank must hold every request's per-layer vectors at once, or requests would queue for rows
    # and the steered condition would measure waiting, not steering.
    settings = Settings(max_batch=args.max_batch, bank_slots=max(512, args.requests * info.num_layers + 1))
    if args.requests > args.max_batch:
        print(f"note: {args.requests} requests > max batch {args.max_batch}; some will wait for a slot")
    engine: Engine
    if args.engine == "hf":
        from steerserve.engines.hf import HFEngine

        model, tokenizer, info = load_hf(path)
        engine = HFEngine(model, tokenizer, info, settings)
    else:
        from transformers import AutoTokenizer

        from steerserve.engines.vllm.engine import VLLMEngine

        tokenizer = AutoTokenizer.from_pretrained(path)
        engine = VLLMEngine(path, tokenizer, info, settings)
    await engine.start()
    return engine, PromptRenderer(tokenizer, settings.max_prompt_tokens)


def load_safeswitch(engine: Engine, probes: Path, head: Path) -> SafeSwitchSpec:
    """The probes and head files, checked against the model as an upload would be."""
    from safetensors import safe_open

    from steerserve.store.safeswitch import check_head, check_probes

    def read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    stage1, stage2, threshold = check_probes(engine.info, *read(probes))
    return SafeSwitchSpec(ProbePair(stage1, stage2), check_head(engine.info, *read(head)), threshold)


async def run_batch(engine: Engine, requests: list[GenerationRequest],
                    switch: SafeSwitchSpec | None = None) -> RoundResult:
    """Submit every request at once and wait for all of them; time from submission to the last finish.
    Requests with probes run through SafeSwitch's front end (``switch``: their head and threshold)."""

    async def one(req: GenerationRequest) -> tuple[int, str]:
        text, count, reason = "", 0, None
        outputs = engine.generate(req)
        if req.probes is not None and switch is not None:
            outputs = switching(engine, dataclasses.replace(req, probes=None), switch)
        async for out in outputs:
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
    engine, render = await make_engine(args)
    n = args.requests
    names = ("one spec", f"{n} specs") if args.compare == "specs" else ("unsteered", "steered")
    counts = (1, n) if args.compare == "specs" else (0, n)
    loop_layer = args.loop_layer if args.compare in ("loop", "clamp") else None
    clamps = args.clamp_features if args.compare == "clamp" else 0
    switch = load_safeswitch(engine, args.probes, args.head) if args.compare == "safeswitch" else None
    try:
        def make(vectors: int, tag: str) -> list[GenerationRequest]:
            if switch is not None:  # every other request with the probes
                plain = build_requests(engine, render, n, args.max_tokens, args.coeff, args.seed, 0, tag)
                return [dataclasses.replace(r, probes=switch.probes) if vectors and i % 2 == 0 else r
                        for i, r in enumerate(plain)]
            return build_requests(engine, render, n, args.max_tokens, args.coeff, args.seed, vectors, tag,
                                  loop_layer, clamps)

        conditions = dict(zip(names, counts, strict=True))
        # Warm-up: lazy initialisation, allocator growth, and the bank loads of every vector.
        for name, vectors in conditions.items():
            await run_batch(engine, make(vectors, f"warm-{name}"), switch)
        results: dict[str, list[RoundResult]] = {name: [] for name in conditions}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                res = await run_batch(engine, make(conditions[name], f"r{r}-{name}"), switch)
                results[name].append(res)
                print(f"round {r + 1} {name:>9}: {res.total:5d} tokens in {res.seconds:6.2f} s "
                      f"= {res.tok_per_s:7.1f} tok/s", flush=True)
    finally:
        await engine.stop()
    report(args, engine.info.name, engine.info.num_layers, results)
    return 0


def report(args: argparse.Namespace, model: str, layers: int, results: dict[str, list[RoundResult]]) -> None:
    (base_name, base_rs), (test_name, test_rs) = results.items()  # the reference condition first
    med = {name: statistics.median(r.tok_per_s for r in rs) for name, rs in results.items()}
    differ = sum(a != b for a, b in zip(base_rs[0].texts, test_rs[0].texts, strict=True))
    print()
    print(f"engine {args.engine}, model {model}, {args.requests} concurrent requests, greedy, ignore_eos, "
          f"max_tokens {args.max_tokens}, {args.rounds} rounds")
    if args.compare == "safeswitch":
        print(f"compare: unsteered vs every other request with SafeSwitch ({args.probes.name}, {args.head.name})")
    elif args.compare == "loop":
        print(f"compare: unsteered vs a distinct closed-loop spec per request (a norm-8 random vector at layer "
              f"{args.loop_layer} from the last prompt token, times its gain; targets 0.5-2.5 bits)")
    elif args.compare == "clamp":
        print(f"compare: unsteered vs {args.clamp_features} distinct SAE feature clamps per request at layer "
              f"{args.loop_layer}, every position (random unit encoder/decoder rows, ReLU, targets 2-6)")
    else:
        what = ("unsteered vs a distinct random unit vector per request" if args.compare == "steering"
                else "all requests sharing one spec vs a distinct spec per request")
        print(f"compare: {what}; add on all {layers} layers, every position, coeff {args.coeff}")
    print()
    print(f"{'condition':<10} {'tokens/round':>12} {'median s':>9} {'median tok/s':>13} {'all rounds tok/s':>28}")
    for name, rs in results.items():
        per_round = ", ".join(f"{r.tok_per_s:.1f}" for r in rs)
        print(f"{name:<10} {rs[0].total:>12d} {statistics.median(r.seconds for r in rs):>9.2f} "
              f"{med[name]:>13.1f} {per_round:>28}")
    print()
    print(f"ratio {test_name}/{base_name} (median tok/s): {med[test_name] / med[base_name]:.3f}")
    # Each round's two runs are back to back, so their ratio cancels slow drift of a shared machine.
    paired = [t.tok_per_s / b.tok_per_s for t, b in zip(test_rs, base_rs, strict=True)]
    print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in paired)} (median {statistics.median(paired):.3f})")
    print(f"outputs of '{test_name}' that differ from '{base_name}': {differ}/{args.requests}")


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(bench(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
