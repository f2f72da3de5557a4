"""CoT compression (``cot_compress``) on GSM8K train rows: generated length, answer rate, accuracy, repetition.

Runs on the hf engine in one process: every (setting, question) request is queued at once and the engine
batches them; each finished generation is appended to ``--out`` (jsonl), so an interrupted run resumes
where it stopped, and the table is computed from that file. Settings: ``unsteered``; ``asc:NAME g=X`` for
each ``--vector NAME=PATH`` and each ``--gammas`` value (``auto`` = the artifact's calibrated gamma_max);
``random g=X``: a seeded random vector of the same norm at the same layer as the first vector; ``prompt``:
the unsteered model with ``--concise-prompt`` appended to the question. Greedy, ``--max-tokens`` budget.

Metrics: median and p90 generated tokens (end-of-sequence included, as the API counts them); answer rate =
finished within the budget with a number on the last non-empty line; accuracy = that number equals the
gold answer; repetition = mean share of repeated word 3-grams. Example (the final table)::

    PYTHONPATH=. python benchmarks/asc_gsm8k.py --offset 5000 --n 200 --vector asc=vectors/asc.safetensors \
        --gammas 0,auto,1,2,3 --random-gammas 2 --out /tmp/asc_final.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from steerserve.config import Settings
from steerserve.engines.hf import HFEngine
from steerserve.methods import resolve
from steerserve.model import load_hf, prepare_default_model
from steerserve.prompts import PromptRenderer
from steerserve.spec import ResolveContext, SteerSpec
from steerserve.store.artifacts import ArtifactStore, file_header
from steerserve.tools.extract.asc import complete
from steerserve.tools.gsm8k import CONCISE_INSTRUCTION as CONCISE_PROMPT
from steerserve.tools.gsm8k import DEFAULT_DATA, Problem, final_number, read_rows, repetition, same_number


def settings_list(args: argparse.Namespace, names: list[str]) -> list[tuple[str, str, dict[str, Any] | None]]:
    """``(label, user template, steering)`` for every row of the table."""
    out: list[tuple[str, str, dict[str, Any] | None]] = [("unsteered", "{question}", None)]
    for name in names:
        for g in parse_gammas(args.vector_gammas.get(name, args.gammas)):
            spec = {"interventions": [{"method": "cot_compress", "vector": name, "gamma": g}]}
            out.append((f"asc:{name} g={g}", "{question}", spec))
    for g in (float(x) for x in args.random_gammas.split(",") if x):
        spec = {"interventions": [{"method": "cot_compress", "vector": "random", "gamma": g}]}
        out.append((f"random g={g}", "{question}", spec))
    if args.concise_prompt:
        out.append(("prompt", "{question}\n" + args.concise_prompt, None))
    return out


def parse_gammas(text: str) -> list[float | str]:
    return [g if g == "auto" else float(g) for g in text.split(",") if g]


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    tokens = sorted(r["tokens"] for r in rows)
    return {"n": len(rows), "median": statistics.median(tokens),
            "p90": tokens[min(len(tokens) - 1, int(0.9 * len(tokens)))], "mean": statistics.fmean(tokens),
            "at_budget": statistics.fmean(r["finish"] == "length" for r in rows),
            "answer_rate": statistics.fmean(r["answered"] for r in rows),
            "accuracy": statistics.fmean(r["correct"] for r in rows),
            "repetition": statistics.fmean(r["repetition"] for r in rows)}


async def main(args: argparse.Namespace) -> None:
    problems = read_rows(args.data, args.offset, args.n)
    model, tokenizer, info = load_hf(prepare_default_model(Settings().models_dir))
    settings = Settings(max_batch=args.batch, home=Path(tempfile.mkdtemp(prefix="asc-eval-")))
    store = ArtifactStore(settings.store_dir, info)
    names = []
    args.vector_gammas = {}
    for item in args.vector:
        name, path = item.split("=", 1)
        if ":" in path:  # NAME=PATH:GAMMAS overrides --gammas for this vector
            path, args.vector_gammas[name] = path.split(":", 1)
        store.put_vector_file(name, Path(path).read_bytes())
        names.append(name)
    if args.random_gammas:  # same layer and norm as the first vector, seeded
        ref = store.load_vector(names[0])
        (layer, v), = ref.tensors.items()
        r = torch.randn(v.shape, generator=torch.Generator().manual_seed(args.seed))
        data = safetensors.torch.save({f"layer.{layer}": r / r.norm() * v.norm()}, metadata=file_header(info, "vector"))
        store.put_vector_file("random", data)
    renderer = PromptRenderer(tokenizer, settings.max_prompt_tokens)
    engine = HFEngine(model, tokenizer, info, settings)
    ctx = ResolveContext(settings, info, store, renderer.tokenize, engine.hidden_states)
    done = set()
    if args.out.exists():
        done = {(r["setting"], r["row"]) for r in map(json.loads, args.out.read_text().splitlines())}
    table = settings_list(args, names)
    out = args.out.open("a")

    async def one(label: str, template: str, steering: dict[str, Any] | None, p: Problem) -> None:
        prompt = renderer.render(messages=[{"role": "user", "content": template.format(question=p.question)}])
        resolved = await resolve(SteerSpec.from_dict(steering), prompt, ctx)
        c = await complete(engine, prompt.token_ids, args.max_tokens, resolved.ops)
        pred = final_number(c.text)
        answered = c.finish_reason == "stop" and pred is not None
        row = {"setting": label, "row": p.row, "tokens": c.completion_tokens, "finish": c.finish_reason,
               "answered": answered, "correct": answered and same_number(pred or "", p.gold),
               "repetition": repetition(c.text), "pred": pred, "gold": p.gold, "text": c.text,
               "applied": [a.detail for a in resolved.applied]}
        out.write(json.dumps(row) + "\n")
        out.flush()

    await engine.start()
    try:
        await asyncio.gather(*(one(label, t, s, p) for label, t, s in table for p in problems
                               if (label, p.row) not in done))
    finally:
        await engine.stop()
        out.close()
    rows = [json.loads(line) for line in args.out.read_text().splitlines()]
    rows = [r for r in rows if r["row"] in {p.row for p in problems}]
    print(f"rows [{args.offset}, {args.offset + len(problems)}), budget {args.max_tokens}, greedy")
    print("| setting | n | median tokens | p90 | mean | at budget | answer rate | accuracy | repetition |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, _, _ in table:
        s = summarise([r for r in rows if r["setting"] == label])
        print(f"| {label} | {s['n']} | {s['median']:g} | {s['p90']} | {s['mean']:.1f} | {s['at_budget']:.0%} | "
              f"{s['answer_rate']:.0%} | {s['accuracy']:.1%} | {s['repetition']:.3f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--offset", type=int, default=5000, help="first row (keep apart from extraction/calibration)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--vector", action="append", default=[], help="NAME=PATH[:GAMMAS] of a one-layer vector artifact")
    p.add_argument("--gammas", default="0,auto,1,2", help="gammas for every --vector ('auto' = gamma_max)")
    p.add_argument("--random-gammas", default="", help="gammas for a random vector like the first --vector")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concise-prompt", default=CONCISE_PROMPT, help="prompt baseline ('' to skip it)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", type=Path, required=True, help="results jsonl (appended; a rerun resumes)")
    a = p.parse_args()
    if not a.data.is_file():
        sys.exit(f"GSM8K data not found at {a.data}: pass --data")
    asyncio.run(main(a))
