"""``steerserve extract asc``: a chain-of-thought compression vector (ASC, Azizi et al., 2507.04742).

Pairs come from GSM8K train rows ``[offset, offset + pairs)``. For each question ``q``, rendered with the
chat template as the user message ``TEMPLATE.format(question=q)``:

- concise (``--concise``): ``model`` (the default) = the model's *own* greedy answer to the question with
  "Be concise: give only the short calculation and the final answer." (``gsm8k.CONCISE_INSTRUCTION``)
  instead of "Let's think step by step" (placed after the step-by-step prompt, so
  the pair differs only in the answer's style, and both answers are text this model writes); ``calc`` =
  the dataset's calculator annotations and ``#### N``; ``worked`` = the dataset's worked solution without
  annotations;
- verbose: ``q`` + the model's own greedy chain for that prompt (``--max-tokens``, end-of-sequence token
  left out), generated here with the hf engine, concurrently and batched.

The vector is the mean over pairs of ``pool(state_l(q_i + concise_i)) - pool(state_l(q_i + verbose_i))`` at
one layer ``l`` (the output of decoder block ``l``, the project-wide convention). ``--pooling answer`` (the
default) takes the mean over the answer's tokens; ``last`` takes the answer's last token, as the ASC
paper does (on this model the last token encodes "the answer ends here" more than a concise style, and the
dataset's terse notation is text the model cannot continue: both made replies longer, see
``vectors/README.md``). It is stored unnormalised, so ``gamma = 1`` adds the whole mean difference;
``+gamma`` points towards the concise answers. ``--chains FILE`` keeps the model's chains between runs (a
layer sweep generates once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerserve.config import Settings
from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.prompts import PromptRenderer
from steerserve.runtime.plan import SteerOp
from steerserve.store.formats import file_header
from steerserve.tools.gsm8k import CONCISE, CONCISE_INSTRUCTION, DEFAULT_DATA, DataMissing, Problem, read_rows, shown

TEMPLATE = "{question}\nLet's think step by step."
CONCISE_TEMPLATE = "{question}\n" + CONCISE_INSTRUCTION  # the prompt the ``model`` concise answers answer


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]  # generated tokens, the end-of-sequence token not included
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort"
    completion_tokens: int  # as the API counts them (an end-of-sequence token counts)


async def complete(engine: Any, prompt_ids: Sequence[int], max_tokens: int,
                   ops: tuple[SteerOp, ...] = ()) -> Completion:
    """One greedy generation on an engine (``engines.base.Engine``), gathered from its stream."""
    request = GenerationRequest(uuid.uuid4().hex, tuple(prompt_ids), SamplingParams(max_tokens, 0.0), ops)
    ids: list[int] = []
    text, reason, count = [], None, 0
    async for out in engine.generate(request):
        ids.extend(out.token_ids)
        text.append(out.text)
        reason, count = out.finish_reason, out.completion_tokens
        if out.extra.get("error"):
            raise RuntimeError(f"generation failed: {out.extra['error']}")
    return Completion(tuple(ids), "".join(text), reason, count)


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("asc", help="a chain-of-thought compression vector from GSM8K (ASC)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"GSM8K train.jsonl (default: {DEFAULT_DATA})")
    p.add_argument("--offset", type=int, default=0, help="first row used (0-based line number)")
    p.add_argument("--pairs", type=int, default=64, help="number of rows (pairs) used")
    p.add_argument("--layer", type=int, default=12, help="the layer of the vector (output of block l)")
    p.add_argument("--concise", choices=sorted([*CONCISE, "model"]), default="model",
                   help="how the concise answer is built (default: the model's own answer to the concise prompt)")
    p.add_argument("--pooling", choices=("last", "answer"), default="answer",
                   help="state of the answer's last token (ASC) or mean over the answer's tokens (default)")
    p.add_argument("--max-tokens", type=int, default=256, help="length budget of the model's own chains")
    p.add_argument("--chains", type=Path, default=None, help="JSON cache of the model's chains (read, then updated)")
    p.add_argument("--description", default="chain-of-thought compression (ASC): concise minus verbose answers")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    p.set_defaults(func=run)


def user_prompt(renderer: PromptRenderer, question: str, template: str = TEMPLATE) -> tuple[int, ...]:
    """The chat-templated prompt both answers of a pair follow, and the verbose chain is generated for."""
    return renderer.render(messages=[{"role": "user", "content": template.format(question=question)}]).token_ids


async def model_chains(engine: Any, renderer: PromptRenderer, problems: Sequence[Problem], max_tokens: int,
                       cache: Path | None = None, template: str = TEMPLATE) -> dict[int, tuple[int, ...]]:
    """``{row: chain ids}``: the model's greedy answers to ``template``, from ``cache`` where it has them
    (same model and budget; one entry per template), otherwise generated concurrently (the engine batches
    them) and added to it."""
    key = {"model_fingerprint": engine.info.fingerprint, "max_tokens": max_tokens}
    saved: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if any(saved.get(k) != v for k, v in key.items()) or not isinstance(saved.get("templates"), dict):
            saved = {}
    known = {int(r): tuple(ids) for r, ids in saved.get("templates", {}).get(template, {}).items()}
    todo = [p for p in problems if p.row not in known]
    if todo:
        print(f"generating the model's own chains for {len(todo)} questions ({max_tokens} tokens, greedy)...",
              file=sys.stderr)
        done = await asyncio.gather(*(complete(engine, user_prompt(renderer, p.question, template), max_tokens)
                                      for p in todo))
        known.update({p.row: c.token_ids for p, c in zip(todo, done, strict=True)})
        if cache is not None:
            templates = {**saved.get("templates", {}),
                         template: {str(r): list(ids) for r, ids in sorted(known.items())}}
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({**key, "templates": templates}))
    return {p.row: known[p.row] for p in problems}


def pair_ids(renderer: PromptRenderer, problems: Sequence[Problem], chains: dict[int, tuple[int, ...]],
             concise: str | dict[int, tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Token ids of (prompt + concise answer) and (prompt + the model's chain), pair by pair. ``concise`` is
    a ``gsm8k.CONCISE`` name (built from the dataset's answer) or the model's own concise answers by row."""
    pos, neg = [], []
    for p in problems:
        prompt = user_prompt(renderer, p.question)
        answer = concise[p.row] if isinstance(concise, dict) else tuple(renderer.tokenize(CONCISE[concise](p.answer)))
        pos.append(prompt + answer)
        neg.append(prompt + chains[p.row])
    return pos, neg


async def asc_vectors(hidden_states: Any, concise_ids: Sequence[Sequence[int]],
                      verbose_ids: Sequence[Sequence[int]], layers: Sequence[int], pooling: str = "last",
                      prompt_lens: Sequence[int] = (), batch: int = 16) -> dict[int, torch.Tensor]:
    """``{layer: [hidden]}``: mean over pairs of the difference of pooled states: the answer's last token
    (``"last"``, ASC) or the mean over the answer's tokens (``"answer"``; needs each pair's prompt length).
    Equal counts, so the difference of the two means is the mean of the pairwise differences."""
    means = []
    for seqs in (concise_ids, verbose_ids):
        pooled: list[torch.Tensor] = []
        for i in range(0, len(seqs), batch):  # bounded chunks: the engine stays responsive between them
            for j, states in enumerate(await hidden_states(seqs[i : i + batch], layers)):  # [len, L, H]
                pooled.append(states[-1] if pooling == "last" else states[prompt_lens[i + j]:].mean(dim=0))
        means.append(torch.stack(pooled).mean(dim=0))  # [L, H]
    diff = means[0] - means[1]
    return {layer: diff[k].clone() for k, layer in enumerate(layers)}


def run(args: argparse.Namespace) -> int:
    try:
        problems = read_rows(args.data, args.offset, args.pairs)
    except DataMissing as exc:
        print(f"steerserve extract asc: {exc}; nothing done", file=sys.stderr)
        return 2
    return asyncio.run(_extract(args, problems))


async def _extract(args: argparse.Namespace, problems: list[Problem]) -> int:
    from steerserve.bootstrap import model_path
    from steerserve.engines.hf import HFEngine
    from steerserve.model import load_hf
    from steerserve.tools.common import write_artifact

    settings = Settings.from_env(model=args.model)
    model, tokenizer, info = load_hf(model_path(settings), settings.dtype)
    if not 0 <= args.layer < info.num_layers:
        print(f"steerserve extract asc: --layer {args.layer} is outside [0, {info.num_layers})", file=sys.stderr)
        return 2
    renderer = PromptRenderer(tokenizer, settings.max_prompt_tokens)
    engine = HFEngine(model, tokenizer, info, settings)
    await engine.start()
    try:
        chains = await model_chains(engine, renderer, problems, args.max_tokens, args.chains)
        concise: str | dict[int, tuple[int, ...]] = args.concise
        if args.concise == "model":
            concise = await model_chains(engine, renderer, problems, args.max_tokens, args.chains, CONCISE_TEMPLATE)
        pos, neg = pair_ids(renderer, problems, chains, concise)
        prompt_lens = [len(user_prompt(renderer, p.question)) for p in problems]
        print(f"extracting from {len(pos)} pairs at layer {args.layer}...", file=sys.stderr)
        vectors = await asc_vectors(engine.hidden_states, pos, neg, [args.layer], args.pooling, prompt_lens)
    finally:
        await engine.stop()
    provenance = {
        "command": "steerserve " + shlex.join(sys.argv[1:]), "data": shown(args.data),
        "rows": [problems[0].row, problems[-1].row + 1], "pairs": len(problems), "layer": args.layer,
        "concise": args.concise, "pooling": args.pooling, "user_template": TEMPLATE,
        **({"concise_template": CONCISE_TEMPLATE} if args.concise == "model" else {}),
        "chain_max_tokens": args.max_tokens,
        "sign": "+gamma points from the model's own chains towards the concise answers",
        "mean_tokens": {"concise": sum(len(x) - n for x, n in zip(pos, prompt_lens, strict=True)) / len(pos),
                        "verbose": sum(len(c) for c in chains.values()) / len(chains)},
        "chains_at_budget": sum(len(c) >= args.max_tokens for c in chains.values()),
    }
    header = file_header(info, "vector", method="asc", provenance=json.dumps(provenance),
                         description=args.description)
    write_artifact(args.out, vectors, header)
    print(f"wrote {args.out} (layer {args.layer}, norm {float(vectors[args.layer].norm()):.2f})")
    return 0
