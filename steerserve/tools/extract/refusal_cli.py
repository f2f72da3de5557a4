"""``steerserve extract refusal-direction``: a refusal ``direction`` artifact by one of two recipes.

``--recipe prompt`` is the paper's (harmful minus harmless prompts at the post-instruction positions),
``--recipe response`` the CAA-style contrast of refusal and compliant replies to the same prompts; both
choose among (layer, position) candidates with the figures ``tools.refusal`` describes, measured on
*selection* prompts: the ``--select`` rows of each file that follow the ``--train`` rows used for the means
(so the val splits stay free for evaluation). The artifact (``store.directions``) holds the unit vector,
its layer, the layer's mean residual norm as ``scale`` (``add``'s unit of ``coeff``), the candidate table
and the exact command. The data is read at run time from ``../shared/data/refusal/`` by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from steerserve.config import Settings
from steerserve.tools.common import read_prompts, require_counts, write_artifact

DATA = Path("../shared/data/refusal")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """``--harmful``, ``--harmless``, their ``-val`` files and ``--field``: the shared refusal splits, read at
    run time (the trainers of ``steerserve train`` take them alike)."""
    p.add_argument("--harmful", type=Path, default=DATA / "harmful_train.json")
    p.add_argument("--harmless", type=Path, default=DATA / "harmless_train.json")
    p.add_argument("--harmful-val", type=Path, default=DATA / "harmful_val.json")
    p.add_argument("--harmless-val", type=Path, default=DATA / "harmless_val.json")
    p.add_argument("--field", default="instruction", help="key of the prompt in JSON objects")


def add_refusal(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("refusal-direction", help="a refusal direction (prompt- or response-side recipe)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=("prompt", "response"), required=True,
                   help="prompt: harmful - harmless prompts at the post-instruction positions (the paper's); "
                        "response: refusal - compliant replies to the same prompts (CAA-style)")
    p.add_argument("--harmful", type=Path, default=DATA / "harmful_train.json", help="harmful instructions")
    p.add_argument("--harmless", type=Path, default=DATA / "harmless_train.json", help="harmless instructions")
    p.add_argument("--field", default="instruction", help="key of the prompt in JSON objects")
    p.add_argument("--train", type=int, default=64, help="rows of each file for the means (default 64)")
    p.add_argument("--select", type=int, default=8,
                   help="rows of each file after those, for the selection figures (default 8)")
    p.add_argument("--layer-step", type=int, default=2, help="candidate layers 0, step, ... below 0.8 N (default 2)")
    p.add_argument("--reply-tokens", type=int, default=6,
                   help="response: average the states over the replies' first N tokens (default 6)")
    p.add_argument("--reply-max-tokens", type=int, default=24,
                   help="response: length of the model's own (compliant) greedy replies (default 24)")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help="greedy tokens of the selection replies judged for refusal under addition "
                        "(default 16 for response, 0 = none for prompt)")
    p.add_argument("--kl-max", type=float, default=0.1,
                   help="prompt recipe: ablation KL filter in nats (default 0.1, the paper's)")
    p.add_argument("--description", default="")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    require_counts(args, ("train", "select", "layer_step", "reply_tokens", "reply_max_tokens"))
    if not (math.isfinite(args.kl_max) and args.kl_max > 0):
        raise SystemExit("--kl-max must be a positive number")
    if args.gen_tokens is None:
        args.gen_tokens = 16 if args.recipe == "response" else 0
    for path in (args.harmful, args.harmless):
        if not path.is_file():
            raise SystemExit(f"{path} not found: the refusal splits live in ../shared/data/refusal/ (see its README)")
    asyncio.run(_extract(args))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _extract(args: argparse.Namespace) -> None:
    from steerserve.bootstrap import model_path
    from steerserve.engines.hf import HFEngine
    from steerserve.evaluation.metrics import make_probes
    from steerserve.model import load_hf
    from steerserve.prompts import PromptRenderer
    from steerserve.store.directions import direction_header
    from steerserve.tools.extract import refusal as rf

    settings = Settings.from_env(model=args.model)
    model, tokenizer, info = load_hf(model_path(settings), settings.dtype)
    renderer = PromptRenderer(tokenizer, settings.max_prompt_tokens)

    def chat(p: str) -> tuple[int, ...]:
        return renderer.render(messages=[{"role": "user", "content": p}]).token_ids

    n, k = args.train, args.select
    harmful_all = read_prompts(args.harmful, args.field, n + k)
    harmless_all = read_prompts(args.harmless, args.field, n + k)
    if min(len(harmful_all), len(harmless_all)) < n + k:
        raise SystemExit(f"--train + --select = {n + k} rows needed from each file; "
                         f"got {len(harmful_all)} and {len(harmless_all)}")
    train = {"harmful": [chat(p) for p in harmful_all[:n]], "harmless": [chat(p) for p in harmless_all[:n]]}
    sel = {"harmful": [chat(p) for p in harmful_all[n:]], "harmless": [chat(p) for p in harmless_all[n:]]}
    layers = list(range(0, math.ceil(rf.LAYER_FRACTION * info.num_layers), args.layer_step))
    refusal_ids = make_probes(renderer.tokenize, (), chat=True).refusal
    provenance: dict[str, Any] = {
        "command": "steerserve " + shlex.join(sys.argv[1:]), "recipe": args.recipe,
        "harmful": str(args.harmful), "harmless": str(args.harmless), "field": args.field,
        "train_rows": [0, n], "select_rows": [n, n + k], "candidate_layers": layers, "kl_max": args.kl_max,
        "refusal_tokens": [renderer.decode([t]) for t in refusal_ids], "selection_gen_tokens": args.gen_tokens,
        "layer_convention": "layer l = output of block l; ablation removes the direction from every block's output",
    }
    engine = HFEngine(model, tokenizer, info, settings)
    await engine.start()
    try:
        if args.recipe == "prompt":
            post = rf.post_instruction_count(chat)
            _log(f"prompt recipe: states of {n} harmful / {n} harmless prompts at {len(layers)} layers, "
                 f"last {post} (post-instruction) positions...")
            s_harm = await rf.states(engine, train["harmful"], layers)
            s_safe = await rf.states(engine, train["harmless"], layers)
            cands = rf.prompt_candidates(s_harm, s_safe, layers, post)
            norms = rf.mean_norms([*s_harm, *s_safe])
            provenance.update(post_instruction_tokens=post,
                              post_instruction_text=tokenizer.decode(list(train["harmful"][0][-post:])))
        else:
            prompts = train["harmful"] + train["harmless"]
            _log(f"response recipe: greedy replies ({args.reply_max_tokens} tokens) to {len(prompts)} prompts...")
            own = await rf.generate(engine, prompts, args.reply_max_tokens)
            complying = [tuple(t for t in r if t not in engine.eos_ids) for r in own]
            refusing = [tuple(renderer.tokenize(rf.REFUSALS[i % len(rf.REFUSALS)])) for i in range(len(prompts))]
            lengths = [(len(r), len(c)) for r, c in zip(refusing, complying, strict=True)]
            if min(lc for _, lc in lengths) < 1:
                raise SystemExit("the model gave an empty reply to some prompt; cannot contrast it")
            _log(f"states of {len(prompts)} refusal and compliant replies at {len(layers)} layers...")
            s_ref = await rf.states(engine, [p + r for p, r in zip(prompts, refusing, strict=True)], layers)
            s_com = await rf.states(engine, [p + c for p, c in zip(prompts, complying, strict=True)], layers)
            cands = rf.response_candidates(s_ref, s_com, [len(p) for p in prompts], lengths, layers,
                                           args.reply_tokens)
            norms = rf.mean_norms([*s_ref, *s_com])
            provenance.update(refusal_templates=list(rf.REFUSALS), reply_tokens=args.reply_tokens,
                              reply_max_tokens=args.reply_max_tokens, prompts=len(prompts),
                              compliant_samples=[renderer.decode(list(c)) for c in complying[:2]])
        scales = {layer: float(norms[i]) for i, layer in enumerate(layers)}
        _log(f"measuring {len(cands)} candidates on {k} harmful + {k} harmless selection prompts...")

        def progress(i: int, total: int, c: rf.Candidate, f: rf.Figures) -> None:
            rate = "" if f.induced_rate_harmful is None else \
                f" rate+ {f.induced_rate_harmful:.2f}/{f.induced_rate_harmless:.2f}"
            _log(f"  [{i}/{total}] layer {c.layer} pos {c.position}: kl {f.kl_harmless:.3f} "
                 f"abl {f.ablated_score_harmful:.2f} ind {f.induced_score_harmless:.2f}/{f.induced_score_harmful:.2f}"
                 + rate)

        figs, baseline = await rf.measure(engine, cands, sel["harmful"], sel["harmless"], refusal_ids,
                                          info.num_layers, args.gen_tokens, progress)
    finally:
        await engine.stop()
    best, notes = rf.select(args.recipe, cands, figs, baseline, info.num_layers, args.kl_max)
    chosen = cands[best]
    rows = rf.table(cands, figs, scales, best)
    provenance.update(baseline={k_: round(v, 4) for k_, v in baseline.items()}, notes=notes,
                      chosen=rows[best], diff_norm=round(float(chosen.diff.norm()), 4),
                      paper_coeff=round(float(chosen.diff.norm()) / scales[chosen.layer], 4),
                      scale_meaning="the layer's mean residual norm over tokens 1.. of the extraction sequences: "
                                    "add's coeff is in units of it; paper_coeff = the unnormalised +r")
    # Declared use (what the upload vetting measures): the strength it was selected at, the unnormalised +r.
    header = direction_header(info, chosen.layer, scales[chosen.layer], args.recipe, rows, method="refusal_direction",
                              provenance=json.dumps(provenance), description=args.description,
                              declared_use=json.dumps({"coeff": provenance["paper_coeff"]}))
    write_artifact(args.out, {chosen.layer: chosen.unit().float()}, header)
    for note in notes:
        _log("note: " + note)
    print(f"wrote {args.out}: {args.recipe} recipe, layer {chosen.layer}, position {chosen.position}, scale "
          f"{scales[chosen.layer]:.2f}, |r| = {float(chosen.diff.norm()):.2f} "
          f"(coeff {provenance['paper_coeff']} = +r); "
          f"baseline {json.dumps(provenance['baseline'])}; chosen {json.dumps(rows[best])}")
