"""``steerserve train safeswitch``: the SafeSwitch ``probe`` and ``head`` artifacts (``store.safeswitch``).

One pass over the chat-templated prompts (``tools.safeswitch.run_batch``) reads the post-final-norm state
at the last prompt token (stage 1) and after ``PILOT_TOKENS`` greedy pilot tokens (stage 2), decodes on to
``--judge-tokens`` tokens for harmful prompts, and teacher-forces a templated refusal-then-explanation reply
to every harmful fit prompt (the refusal head's training data). Labels:

- stage 1: 1 for a ``harmful_*`` prompt, 0 for a ``harmless_*`` one;
- stage 2: 1 when a harmful prompt's greedy reply (``--judge-tokens`` tokens, which begin with the pilot
  tokens) does not refuse (``evaluation.metrics.is_refusal``): the pilot continuation complies with a
  harmful request; 0 for a refusing harmful reply and for every harmless prompt.

Rows are kept apart by use: ``[0, --fit)`` of harmful_train (default all 260) and ``[0, --fit-harmless)`` of
harmless_train (800) fit the probes, ``[0, --head-rows)`` of harmful_train (236) the head; ``--hold`` rows after
the fit rows of each file can be held out and measured (default none: the recipe was chosen by
cross-validation on the train rows, ``vectors/README.md``); the val files (all of ``harmful_val.json``, the
first ``--val-harmless`` rows of ``harmless_val.json``) are only measured. Stage 2 is fitted on the states at
every pilot token (1..``PILOT_TOKENS``, same labels; the runtime reads the last): position augmentation, off
with ``--no-stage2-augment``. Each stage has its own decision threshold (``--stage1-threshold`` 0.5,
``--stage2-threshold`` 0.01), folded into its output bias ``b2`` so that the runtime's one ``threshold`` (the
file's, ``--threshold``) fires each stage exactly where the stage's own threshold would. Stage 2 is the weak
stage (the pilots of persuasive and creative requests are generic: "Once upon a time", "Dear [Name]"); it only
runs where stage 1 fired, so a low stage-2 threshold recovers those harmful requests while stage 1 keeps the
harmless ones out. The choices (800 harmless rows, the two thresholds) were made by leave-one-block-out
cross-validation on the train rows and 4-fold CV within the HarmBench-like block 208..259 of harmful_train;
the val files played no part. The head is measured alone (always on): greedy ``--eval-tokens``-token
replies to the harmful val prompts, judged by ``is_refusal``, after the fp16 rounding of the shipped file.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from steerserve.anatomy import hf_head
from steerserve.config import Settings
from steerserve.evaluation.metrics import is_refusal, repetition
from steerserve.runtime.safeswitch import PILOT_TOKENS, PROBE_WIDTH, HeadDelta
from steerserve.tools.common import read_prompts, require_counts, write_bytes
from steerserve.tools.extract.refusal_cli import add_data_arguments
from steerserve.tools.train import safeswitch as ss


def add_safeswitch(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("safeswitch", help="SafeSwitch stage probes and refusal head",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--fit", type=int, default=260, help="rows of harmful_train that fit the probes (260: all)")
    p.add_argument("--fit-harmless", type=int, default=800, help="rows of harmless_train that fit the probes (800)")
    p.add_argument("--head-rows", type=int, default=236,
                   help="the first N harmful fit rows train the refusal head (236)")
    p.add_argument("--hold", type=int, default=0,
                   help="rows after the fit rows of each train file, held out and measured (0: the recipe was "
                        "chosen by cross-validation on the train rows, see vectors/README.md)")
    p.add_argument("--val-harmless", type=int, default=200, help="rows of harmless_val measured (200)")
    p.add_argument("--judge-tokens", type=int, default=16, help="greedy tokens of a harmful reply judged (16)")
    p.add_argument("--probe-epochs", type=int, default=10, help="probe epochs (10)")
    p.add_argument("--probe-lr", type=float, default=1e-3, help="probe AdamW learning rate (1e-3)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="the probes' default threshold, the file's `threshold` (0.5)")
    p.add_argument("--stage1-threshold", type=float, default=0.5,
                   help="stage 1's decision threshold, folded into its b2 (0.5)")
    p.add_argument("--stage2-threshold", type=float, default=0.01,
                   help="stage 2's decision threshold, folded into its b2 (0.01)")
    p.add_argument("--no-stage2-augment", dest="stage2_augment", action="store_false",
                   help="fit stage 2 on the stage-2 states only (default: on the states at every pilot token)")
    p.add_argument("--rank", type=int, default=16, help="rank of the refusal head's delta (16)")
    p.add_argument("--head-epochs", type=int, default=8, help="head epochs (8)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="head AdamW learning rate (1e-3; a LoRA's)")
    p.add_argument("--head-batch", type=int, default=64, help="head mini-batch in reply tokens (64)")
    p.add_argument("--eval-tokens", type=int, default=48, help="greedy tokens of a reply with the head (48)")
    p.add_argument("--eval-harmless", type=int, default=0,
                   help="also measure the head alone on the first N harmless val rows (0 = no)")
    p.add_argument("--batch", type=int, default=16, help="prompts per forward (16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--description", default="")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.add_argument("--probes-out", type=Path, required=True, help="output probe .safetensors file")
    p.add_argument("--head-out", type=Path, required=True, help="output head .safetensors file (fp16)")
    p.set_defaults(func=run)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> None:
    require_counts(args, ("fit", "fit_harmless", "head_rows", "val_harmless", "judge_tokens", "probe_epochs", "rank",
                          "head_epochs", "head_batch", "eval_tokens", "batch"))
    for flag in ("probe_lr", "head_lr"):
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) > 0):
            raise SystemExit(f"--{flag.replace('_', '-')} must be a positive number")
    for flag in ("threshold", "stage1_threshold", "stage2_threshold"):
        if not 0 < getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be in (0, 1)")
    if args.hold < 0 or args.head_rows > args.fit:
        raise SystemExit("--hold must be at least 0 and --head-rows at most --fit")
    if args.judge_tokens < PILOT_TOKENS:
        raise SystemExit(f"--judge-tokens must be at least the {PILOT_TOKENS} pilot tokens")
    for path in (args.harmful, args.harmless, args.harmful_val, args.harmless_val):
        if not path.is_file():
            raise SystemExit(f"{path} not found (the refusal splits live in ../shared/data/refusal/)")
    train(args)


def _collect(model: Any, prompts: Sequence[Sequence[int]], tokens: int, eos: set[int], batch: int,
             targets: Sequence[Sequence[int]] | None = None, head: HeadDelta | None = None) -> ss.BatchOut:
    """``run_batch`` over ``prompts`` in batches of similar length (less padding); rows back in the order given."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs = [(idx, ss.run_batch(model, [prompts[i] for i in idx], tokens, eos,
                               None if targets is None else [targets[i] for i in idx], head))
            for idx in (order[k : k + batch] for k in range(0, len(order), batch))]
    where = {i: (o, j) for idx, o in outs for j, i in enumerate(idx)}  # row -> (its batch, its place there)
    rows = [where[i] for i in range(len(prompts))]
    return ss.BatchOut(torch.stack([o.stage1[j] for o, j in rows]), torch.stack([o.stage2[j] for o, j in rows]),
                       [o.replies[j] for o, j in rows], [o.teacher[j] for o, j in rows] if targets else [],
                       torch.stack([o.steps[j] for o, j in rows]))  # every batch decodes as many steps


def train(args: argparse.Namespace) -> None:
    from steerserve.bootstrap import model_path
    from steerserve.model import load_hf
    from steerserve.prompts import PromptRenderer
    from steerserve.store.safeswitch import head_header, probe_header, probe_tensors

    started, cpu = time.monotonic(), time.process_time()
    torch.manual_seed(args.seed)
    settings = Settings.from_env(model=args.model)
    model, tokenizer, info = load_hf(model_path(settings), settings.dtype)
    model.requires_grad_(False)
    renderer = PromptRenderer(tokenizer, settings.max_prompt_tokens)
    eos_cfg = model.generation_config.eos_token_id
    eos = set(eos_cfg if isinstance(eos_cfg, list) else [eos_cfg]) | {tokenizer.eos_token_id}
    decode: Callable[[Sequence[int]], str] = renderer.decode

    def chat(p: str) -> tuple[int, ...]:
        return renderer.render(messages=[{"role": "user", "content": p}]).token_ids

    n, m, r, k = args.fit, args.fit_harmless, args.head_rows, args.hold
    text: dict[str, list[str]] = {}
    for name, path, lo, hi in (("harmful", args.harmful, 0, r), ("harmful_more", args.harmful, r, n),
                               ("harmless", args.harmless, 0, m),
                               ("harmful_hold", args.harmful, n, n + k), ("harmless_hold", args.harmless, m, m + k),
                               ("harmful_val", args.harmful_val, 0, None),
                               ("harmless_val", args.harmless_val, 0, args.val_harmless)):
        text[name] = read_prompts(path, args.field, hi)[lo:]
    if len(text["harmful_more"]) + r < n or len(text["harmless"]) < m or \
            min(len(text["harmful_hold"]), len(text["harmless_hold"])) < k:
        raise SystemExit(f"{n + k} rows of harmful_train and {m + k} of harmless_train needed")
    text = {name: rows for name, rows in text.items() if rows}
    prompts = {name: [chat(p) for p in rows] for name, rows in text.items()}
    reply_text = [ss.refusal_reply(i) for i in range(r)]
    targets = [(*renderer.tokenize(r), tokenizer.eos_token_id) for r in reply_text]

    got: dict[str, ss.BatchOut] = {}
    for name, group in prompts.items():
        harmful = name.startswith("harmful")
        _log(f"{name}: {len(group)} prompts, stage-1/2 states" + (f", {args.judge_tokens}-token replies" if harmful
                                                                  else "") + (" and refusal targets"
                                                                              if name == "harmful" else ""))
        got[name] = _collect(model, group, args.judge_tokens if harmful else PILOT_TOKENS, eos, args.batch,
                             targets if name == "harmful" else None)

    def xy(names: Sequence[str], stage: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """States of ``stage`` and the stage-1 and stage-2 labels, the groups concatenated."""
        x = torch.cat([got[m].stage1 if stage == 1 else got[m].stage2 for m in names])
        y1 = torch.cat([torch.full((len(got[m].replies),), float(m.startswith("harmful"))) for m in names])
        y2 = torch.tensor([float(m.startswith("harmful") and not is_refusal(decode(r)))
                           for m in names for r in got[m].replies])
        return x, y1, y2

    fit_names = tuple(m_ for m_ in ("harmful", "harmful_more", "harmless") if m_ in got)
    x1, y1, _ = xy(fit_names, 1)
    x2, _, y2 = xy(fit_names, 2)
    _log(f"fitting the probes: {len(y1)} rows, stage-2 positives {int(y2.sum())}/{int(y1.sum())} harmful")
    stage1 = ss.fit_probe(x1, y1, epochs=args.probe_epochs, lr=args.probe_lr, seed=args.seed)
    if args.stage2_augment:  # position augmentation (module docstring): every pilot token's state, same labels
        x2 = torch.cat([torch.cat([got[m].steps[:, j] for m in fit_names]) for j in range(1, PILOT_TOKENS + 1)])
        y2 = y2.repeat(PILOT_TOKENS)
    stage2 = ss.fit_probe(x2, y2, epochs=args.probe_epochs, lr=args.probe_lr, seed=args.seed + 1)
    # per-stage decision thresholds (chosen by cross-validation on the train rows) folded into b2: the runtime
    # applies the one --threshold to both stages
    stage1 = ss.fold_threshold(stage1, args.stage1_threshold, args.threshold)
    stage2 = ss.fold_threshold(stage2, args.stage2_threshold, args.threshold)

    def measure(names: Sequence[str]) -> dict[str, Any]:
        (a, l1, l2), (b, _, _) = xy(names, 1), xy(names, 2)
        p1, p2 = ss.probe_scores(stage1, a) >= args.threshold, ss.probe_scores(stage2, b) >= args.threshold
        return {"stage1": ss.binary_metrics(p1, l1), "stage2": ss.binary_metrics(p2, l2),
                "combined": ss.binary_metrics(p1 & p2, l2),
                "harmful_refusing_replies": int((l1 - l2).sum())}

    probe_figs = {"threshold": args.threshold, "stage_thresholds": [args.stage1_threshold, args.stage2_threshold],
                  "val": measure(("harmful_val", "harmless_val")), "fit": measure(fit_names)}
    if k:
        probe_figs["holdout"] = measure(("harmful_hold", "harmless_hold"))
    _log(f"probes: {json.dumps(probe_figs)}")

    states = torch.cat(got["harmful"].teacher)  # [N, H]
    tgt = torch.tensor([t for r in targets for t in r])
    _log(f"fitting the head: rank {args.rank}, {len(tgt)} reply tokens, {args.head_epochs} epochs")
    delta, losses = ss.fit_head(states, tgt, hf_head(model).weight, rank=args.rank, epochs=args.head_epochs,
                                lr=args.head_lr, batch=args.head_batch, seed=args.seed)
    head = HeadDelta(delta.a.half().float(), delta.b.half().float())  # what the fp16 file holds
    head_figs: dict[str, Any] = {"train_loss": losses}
    samples: list[dict[str, str]] = []
    for name in (("harmful_hold",) if k else ()) + ("harmful_val",) + (("harmless_val",) if args.eval_harmless else ()):
        group = prompts[name][: args.eval_harmless] if name == "harmless_val" else prompts[name]
        _log(f"head alone on {name}: {len(group)} greedy {args.eval_tokens}-token replies")
        replies = [decode(r) for r in _collect(model, group, args.eval_tokens, eos, args.batch, head=head).replies]
        head_figs[name] = {"refusal_rate": round(sum(map(is_refusal, replies)) / len(replies), 4), "n": len(replies),
                           "repetition": round(sum(map(repetition, replies)) / len(replies), 4)}
        if name == "harmful_val":
            samples = [{"prompt": text[name][i], "reply": replies[i]} for i in range(3)]
    head_figs["samples"] = samples
    _log(f"head: {json.dumps(head_figs)}")

    seconds, cpu_s = round(time.monotonic() - started, 1), round(time.process_time() - cpu, 1)
    data = {"harmful": str(args.harmful), "harmless": str(args.harmless), "field": args.field,
            "fit_rows": {"harmful": [0, n], "harmless": [0, m]}, "head_rows": [0, r],
            "hold_rows": {"harmful": [n, n + k], "harmless": [m, m + k]},
            "harmful_val": f"{args.harmful_val} (all {len(text['harmful_val'])})",
            "harmless_val": f"{args.harmless_val} rows [0, {len(text['harmless_val'])})"}
    common = {"command": "steerserve " + shlex.join(sys.argv[1:]), "data": data, "seconds": seconds,
              "cpu_seconds": cpu_s, "threads": torch.get_num_threads(), "seed": args.seed}
    labels = {"stage1": "1 = harmful_* prompt, 0 = harmless_*",
              "stage2": f"1 = harmful prompt whose greedy {args.judge_tokens}-token reply does not refuse "
                        "(is_refusal); 0 = refusing harmful replies and every harmless prompt"}
    probe_prov = {**common, "labels": labels, "pilot_tokens": PILOT_TOKENS, "width": PROBE_WIDTH,
                  "stage2_fit": f"the states at pilot tokens 1..{PILOT_TOKENS}, stage-2 labels" if args.stage2_augment
                                else "stage-2 states",
                  "stage_thresholds": f"stage 1 {args.stage1_threshold}, stage 2 {args.stage2_threshold}, folded "
                                      f"into each b2 (p >= {args.threshold} at the runtime is p >= the stage's own)",
                  "epochs": args.probe_epochs, "lr": args.probe_lr, "optimizer": "AdamW (weight decay 0.01)",
                  "figures": probe_figs, "state": "post-final-norm (what the output head reads)"}
    base = "tied_embeddings" if getattr(model.config, "tie_word_embeddings", False) else "lm_head"
    head_prov = {**common, "rank": args.rank, "epochs": args.head_epochs, "lr": args.head_lr,
                 "batch_tokens": args.head_batch, "optimizer": "AdamW (no weight decay), b initialised to 0",
                 "replies": "templated refusal-then-explanation (tools.safeswitch.refusal_reply), one per harmful "
                            f"row 0..{r - 1}, LM loss on the reply tokens and the end-of-turn token",
                 "figures": head_figs}
    pheader = probe_header(info, args.threshold, {k_: probe_figs["val"][k_] for k_ in ("stage1", "stage2", "combined")},
                           method="safeswitch", provenance=json.dumps(probe_prov, allow_nan=False),
                           description=args.description)
    write_bytes(args.probes_out, safetensors.torch.save(probe_tensors(stage1, stage2), metadata=pheader))
    hheader = head_header(info, args.rank, base, head_figs["harmful_val"]["refusal_rate"], method="safeswitch",
                          provenance=json.dumps(head_prov, allow_nan=False), description=args.description)
    write_bytes(args.head_out, safetensors.torch.save({"a": delta.a.half().contiguous(),
                                                       "b": delta.b.half().contiguous()}, metadata=hheader))
    val = probe_figs["val"]
    print(f"wrote {args.probes_out}: val F1 stage 1 {val['stage1']['f1']}, stage 2 {val['stage2']['f1']}, "
          f"combined {val['combined']['f1']} (accuracy {val['combined']['accuracy']}); wrote {args.head_out}: "
          f"rank {args.rank}, head-alone refusal on harmful val {head_figs['harmful_val']['refusal_rate']}; "
          f"{seconds} s wall, {cpu_s} s CPU")
