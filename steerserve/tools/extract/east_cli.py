"""``steerserve extract east``: the EAST vector from procedurally generated decision situations.

Writes a one-layer vector artifact (``layer.<l>``, norm = the layer's mean residual norm on the decision
prompts, so that the ``entropic`` method's ``beta`` is in units of it) whose metadata records how it was
made. ``--eval-out`` also writes held-out situations (another seed, never used for extraction) as a JSON
list of ``{"prompt": RAW_TEXT, "run": k, "step": t}``: the prompt already holds the chat template and
the answer's first words, so send it as a raw ``prompt``, not as a chat message; the options are
``" A"`` and ``" B"``. ``--games-out`` writes held-out *multi-decision* prompts in the same record form
(another seed; each prompt is a game so far as a plain log the model continues, no chat template, see
``east.game_text``; send it raw): the data for the closed loop with ``options``, one decision per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path

from steerserve.config import Settings
from steerserve.store.formats import file_header
from steerserve.tools.common import require_counts, write_artifact

DEFAULT_LAYER = 18  # best of 6..24 on held-out seed-1 situations (see vectors/README.md)


def add_east(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("east", help="an entropic-steering (EAST) vector from bandit decision prompts",
                         description="Entropy-weighted, per-run-centred mean of the states at the last prompt "
                                     "token of two-armed bandit decision prompts (method 'entropic').")
    p.add_argument("--layer", type=int, default=DEFAULT_LAYER, help=f"layer (default {DEFAULT_LAYER})")
    p.add_argument("--runs", type=int, default=64, help="games to extract from (default 64)")
    p.add_argument("--steps", type=int, default=8, help="decisions per game (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the extraction games (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    p.add_argument("--eval-out", type=Path, default=None, metavar="FILE.json",
                   help="also write held-out decision prompts (raw text) for evaluation")
    p.add_argument("--eval-seed", type=int, default=None, help="seed of the held-out games (default seed+1)")
    p.add_argument("--eval-runs", type=int, default=40, help="held-out games (default 40)")
    p.add_argument("--eval-steps", type=int, default=1,
                   help="held-out decisions per game, taken at random steps (default 1)")
    p.add_argument("--games-out", type=Path, default=None, metavar="FILE.json",
                   help="also write held-out multi-decision prompts (raw text), for the closed loop")
    p.add_argument("--games-seed", type=int, default=None, help="seed of those games (default seed+2)")
    p.add_argument("--games", type=int, default=40, help="multi-decision games (default 40)")
    p.add_argument("--description", default="")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    require_counts(args, ("runs", "steps", "eval_runs", "eval_steps", "games"))
    if args.eval_seed is None:
        args.eval_seed = args.seed + 1
    if args.games_seed is None:
        args.games_seed = args.seed + 2
    if args.eval_out is not None and args.eval_seed == args.seed or args.games_out is not None \
            and args.games_seed == args.seed:
        raise SystemExit("--eval-seed/--games-seed must differ from --seed: held-out games must not be extraction ones")
    asyncio.run(_extract(args))


def held_out(tokenizer: object, runs: int, steps: int, seed: int) -> list[dict[str, object]]:
    """``runs`` held-out games, ``steps`` decisions of each at distinct random steps (0 .. 7), as eval records."""
    import random

    from steerserve.tools.extract.east import prompt_text, situations

    horizon = max(8, steps)
    pick = random.Random(seed)
    chosen = {k: set(pick.sample(range(horizon), steps)) for k in range(runs)}
    return [{"prompt": prompt_text(tokenizer, s), "run": s.run, "step": s.step}
            for s in situations(runs, horizon, seed) if s.step in chosen[s.run]]


def held_out_games(games: int, seed: int) -> list[dict[str, object]]:
    """``games`` held-out multi-decision prompts, each after 3..7 rounds already played, as eval records."""
    import random

    from steerserve.tools.extract.east import game_text, situations

    pick = random.Random(seed)
    played = {k: pick.randint(3, 7) for k in range(games)}
    return [{"prompt": game_text(s), "run": s.run, "step": s.step}
            for s in situations(games, 8, seed) if s.step == played[s.run]]


async def _extract(args: argparse.Namespace) -> None:
    from steerserve.bootstrap import model_path
    from steerserve.engines.hf import HFEngine
    from steerserve.model import load_hf
    from steerserve.prompts import PromptRenderer
    from steerserve.tools.extract.east import FRAMINGS, OPTIONS, extract, option_ids, prompt_text, situations

    settings = Settings.from_env(model=args.model)
    model, tokenizer, info = load_hf(model_path(settings), settings.dtype)
    if not 0 <= args.layer < info.num_layers:
        raise SystemExit(f"--layer must be in [0, {info.num_layers - 1}]")
    options = option_ids(tokenizer, OPTIONS)
    renderer = PromptRenderer(tokenizer, settings.max_prompt_tokens)
    games = situations(args.runs, args.steps, args.seed)
    prompts = [renderer.render(prompt_text(tokenizer, s)).token_ids for s in games]
    engine = HFEngine(model, tokenizer, info, settings)
    await engine.start()
    try:
        print(f"extracting from {len(games)} decisions ({args.runs} games x {args.steps}) at layer {args.layer}...",
              file=sys.stderr)
        ex = await extract(engine, prompts, [s.run for s in games], [args.layer], options)
    finally:
        await engine.stop()
    norm = ex.norms[args.layer]
    provenance = {"command": "steerserve " + shlex.join(sys.argv[1:]), "layer": args.layer, "seed": args.seed,
                  "runs": args.runs, "steps": args.steps, "count": len(games), "framings": len(FRAMINGS),
                  "options": list(OPTIONS), "mean_choice_entropy_bits": round(ex.mean_entropy, 4),
                  "mean_residual_norm": round(norm, 4),
                  "scale": "unit direction x the layer's mean residual norm over tokens 1.. of the decision "
                           "prompts: beta is in units of that norm",
                  "state": "last prompt token (chat template + the answer's first words)",
                  "centring": "per run"}
    header = file_header(info, "vector", method="east", provenance=json.dumps(provenance),
                         description=args.description)
    write_artifact(args.out, ex.vectors, header)
    print(f"wrote {args.out} (layer {args.layer}, norm {norm:.2f}; unsteered choice entropy "
          f"{ex.mean_entropy:.3f} bits over {len(games)} decisions)")
    if args.eval_out is not None:
        records = held_out(tokenizer, args.eval_runs, args.eval_steps, args.eval_seed)
        args.eval_out.parent.mkdir(parents=True, exist_ok=True)
        args.eval_out.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.eval_out} ({len(records)} held-out decisions, seed {args.eval_seed}; send each "
              f"'prompt' raw, options {list(OPTIONS)})")
    if args.games_out is not None:
        records = held_out_games(args.games, args.games_seed)
        args.games_out.parent.mkdir(parents=True, exist_ok=True)
        args.games_out.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.games_out} ({len(records)} held-out games, seed {args.games_seed}; send each "
              f"'prompt' raw, options {list(OPTIONS)})")
