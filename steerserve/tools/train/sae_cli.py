"""``steerserve train sae --layer L --out FILE``: a TopK SAE for the residual stream after block ``L``.

Offline, on a CPU: the corpus (``sae_data``: Alpaca instructions, GSM8K worked answers and the model's own
sampled replies to topic prompts, all chat-templated) is run through the frozen model once, up to block
``L``; the activations stay in memory and a sparsify TopK SAE (``sae.fit``) trains on them for several
epochs. Whole sequences (``--hold``) are held out: fraction of variance explained (FVE), mean L0 and dead
features (never firing on a held-out token) are measured on them, on the fp16 dictionary as stored. Every
live feature is labelled from its top-activating tokens and contexts (``sae.labels``, metadata
``sae_labels``). The output is a ``sae`` artifact (``store.sae``; written through sparsify's folder format
and ``tools.sae.cli.sae_bytes``, as ``steerserve sae import`` would), with ``FILE.figures.json`` and
``FILE.figures.md`` beside it. Requires the ``train`` extra (``pip install 'steerserve[train]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from steerserve.store.db import header_metadata
from steerserve.tools.common import require_counts, write_bytes
from steerserve.tools.gsm8k import DEFAULT_DATA

DATA = DEFAULT_DATA.parents[1]  # ../shared/data


def add_sae(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("sae", help="a TopK sparse autoencoder on one layer (sparsify), labelled",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, required=True, help="the residual stream after decoder block L")
    p.add_argument("--out", type=Path, required=True, help="output sae .safetensors file (fp16)")
    p.add_argument("--d-sae", type=int, default=4096, help="features (4096)")
    p.add_argument("--k", type=int, default=32, help="active features per token (32)")
    p.add_argument("--epochs", type=int, default=8, help="passes over the cached activations (8)")
    p.add_argument("--batch", type=int, default=2048, help="tokens per SAE step (2048)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: sparsify's for the width)")
    p.add_argument("--auxk-alpha", type=float, default=1 / 32, help="weight of the AuxK loss (1/32)")
    p.add_argument("--dead-after", type=int, default=100_000,
                   help="a latent silent for this many training tokens is dead for the AuxK loss (100000)")
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (../shared/data)")
    p.add_argument("--alpaca", type=int, default=2000, help="Alpaca instructions (harmless_train rows; 2000)")
    p.add_argument("--gsm8k", type=int, default=600, help="GSM8K train rows with worked answers (600)")
    p.add_argument("--generate", type=int, default=-1,
                   help="topic prompts the model replies to (sampled; -1: all of sae_data's, 0: none)")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens per sampled reply (64)")
    p.add_argument("--gen-batch", type=int, default=32, help="prompts per generate call (32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence at most (256)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass (4096)")
    p.add_argument("--hold", type=float, default=0.05, help="fraction of sequences held out (0.05)")
    p.add_argument("--examples", type=int, default=24, help="top-activating tokens per feature for its label (24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--description", default="")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.set_defaults(func=run)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def corpus(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[list[list[int]], dict[str, int]]:
    """The chat-templated token sequences and how many came from each source; a missing file is skipped."""
    from steerserve.tools.train import sae_data as sd

    convs: list[list[dict[str, str]]] = []
    counts: dict[str, int] = {}
    sources = (("alpaca", lambda: [[{"role": "user", "content": p}]
                                   for p in sd.instructions(args.data / "refusal" / "harmless_train.json",
                                                            args.alpaca)] if args.alpaca else []),
               ("gsm8k", lambda: [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                                  for q, a in sd.gsm8k_turns(args.data / "gsm8k" / "train.jsonl", args.gsm8k)]
                                 if args.gsm8k else []))
    for name, read in sources:
        try:
            got = read()
        except sd.DataMissing as exc:
            _log(f"skipping {name}: {exc}")
            got = []
        convs += got
        counts[name] = len(got)
    prompts = sd.topic_prompts()
    prompts = prompts if args.generate < 0 else prompts[: args.generate]
    if prompts:
        _log(f"sampling the model's replies to {len(prompts)} topic prompts ({args.gen_tokens} tokens each)")
        replies = sd.sample_replies(model, tokenizer, prompts, args.gen_tokens, args.gen_batch, args.seed)
        convs += [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                  for p, r in zip(prompts, replies, strict=True)]
    counts["generated"] = len(prompts)
    if not convs:
        raise SystemExit("no corpus: the shared data is absent (--data) and --generate is 0")
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"])[: args.seq_len] for t in texts], counts


def run(args: argparse.Namespace) -> None:
    require_counts(args, ("d_sae", "k", "epochs", "batch", "gen_tokens", "gen_batch", "seq_len", "batch_tokens",
                          "examples"))
    if args.k > args.d_sae or not 0 < args.hold < 1:
        raise SystemExit("--k must be at most --d-sae and --hold in (0, 1)")
    from steerserve.bootstrap import model_path
    from steerserve.config import Settings
    from steerserve.model import load_hf
    from steerserve.store.sae import check_sae
    from steerserve.tools.sae.cli import sae_bytes
    from steerserve.tools.sae.formats import read_sparsify
    from steerserve.tools.train import sae as ts
    from steerserve.tools.train import sae_data as sd

    started = time.monotonic()
    settings = Settings.from_env(model=args.model)
    model, tokenizer, info = load_hf(model_path(settings), settings.dtype)
    model.requires_grad_(False)
    if not 0 <= args.layer < info.num_layers:
        raise SystemExit(f"--layer must be in [0, {info.num_layers - 1}]")
    seqs, counts = corpus(args, model, tokenizer)
    skip = sd.shared_prefix(seqs)
    t0 = time.monotonic()
    acts = sd.collect(model, seqs, args.layer, skip, args.batch_tokens, _log)
    t_acts = time.monotonic() - t0
    train_rows, held_rows = sd.split(acts, args.hold, args.seed)
    _log(f"{len(acts.x)} tokens from {len(seqs)} sequences ({counts}) after a {skip}-token shared prefix, "
         f"{t_acts:.0f} s ({len(acts.x) / t_acts:.0f} tok/s); {len(train_rows)} train, {len(held_rows)} held out")
    t0 = time.monotonic()
    trained = ts.fit(acts.x[train_rows], args.d_sae, args.k, args.epochs, args.batch, args.seed, args.lr,
                     args.auxk_alpha, args.dead_after, _log)
    t_fit = time.monotonic() - t0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"layers.{args.layer}"  # sparsify's own folder format, read as an import reads it
        trained.save_to_disk(folder)
        sae, _ = read_sparsify(folder)
        stored = dataclasses.replace(sae, **{f: getattr(sae, f).half().float()  # what the fp16 file holds
                                             for f in ("w_enc", "b_enc", "w_dec", "b_dec")})
        figs = ts.measure(stored, acts.x[held_rows])
        train_figs = ts.measure(stored, acts.x[train_rows[:50_000]])
        _log(f"held out: FVE {figs.fve}, L0 {figs.l0}, dead {figs.dead}/{args.d_sae}; train FVE {train_figs.fve}")
        examples = ts.top_examples(stored, acts.x, args.examples)
        decode = tokenizer.decode
        labels = ts.labels(examples, acts, decode)
        seconds = round(time.monotonic() - started, 1)
        figures: dict[str, Any] = {
            "command": "steerserve " + shlex.join(sys.argv[1:]), "layer": args.layer, "d_sae": args.d_sae,
            "k": args.k, "epochs": args.epochs, "batch_tokens": args.batch, "seed": args.seed,
            "library": "eai-sparsify (SparseCoder, SignSGD + ScheduleFreeWrapper, AuxK)",
            "corpus": {"sequences": counts, "tokens": len(acts.x), "train_tokens": len(train_rows),
                       "held_out_tokens": len(held_rows), "shared_prefix_skipped": skip, "seq_len": args.seq_len,
                       "data": "../shared/data: refusal/harmless_train.json (Alpaca), gsm8k/train.jsonl; the "
                               "model's own sampled replies (T=0.8, top-p 0.95) to steerserve.tools.train."
                               "sae_data.topic_prompts()"},
            "held_out": {"fve": figs.fve, "l0": figs.l0, "dead": figs.dead,
                         "dead_fraction": round(figs.dead / args.d_sae, 4)},
            "train_sample": {"fve": train_figs.fve, "l0": train_figs.l0, "tokens": train_figs.tokens},
            "live_features_labelled": len(labels),
            "seconds": {"total": seconds, "activations": round(t_acts, 1), "sae_training": round(t_fit, 1)},
            "throughput": {"activation_tok_s": round(len(acts.x) / t_acts),
                           "sae_train_tok_s": round(len(train_rows) * args.epochs / t_fit)},
            "threads": torch.get_num_threads(),
            "topic_features": {topic: [[f, lab, ts.snippet(acts, examples[f][0], decode)]
                                       for f, lab in sorted(labels.items(), key=lambda kv: -len(examples[kv[0]]))
                                       if lab.startswith(topic + ":")][:8] for topic in ts.LEXICON},
        }
        prov = {key: figures[key] for key in ("command", "layer", "d_sae", "k", "epochs", "library", "corpus",
                                              "held_out", "seconds")}
        data = sae_bytes(folder, args.layer, info, labels, dtype=torch.float16, method="sparsify_topk",
                         provenance=json.dumps(prov), description=args.description)
    check_sae(info, header_metadata(data), safetensors.torch.load(data))  # what an import would check
    write_bytes(args.out, data)
    base = args.out.with_suffix("")
    write_bytes(base.with_name(base.name + ".figures.json"), (json.dumps(figures, indent=1) + "\n").encode())
    write_bytes(base.with_name(base.name + ".figures.md"), _markdown(figures).encode())
    print(f"wrote {args.out} ({len(data) / 2**20:.1f} MiB): layer {args.layer}, d_sae {args.d_sae}, k {args.k}; "
          f"held-out FVE {figs.fve}, L0 {figs.l0}, dead {figs.dead} ({figures['held_out']['dead_fraction']:.1%}); "
          f"{len(labels)} features labelled; {seconds} s")


def _markdown(f: dict[str, Any]) -> str:
    """The figures as a short markdown page."""
    h, c = f["held_out"], f["corpus"]
    lines = [f"# SAE at layer {f['layer']} (d_sae {f['d_sae']}, k {f['k']})", "", f"`{f['command']}`", "",
             "| held-out FVE | L0 | dead | tokens (train / held out) | time (total / activations / SAE) |",
             "|---|---|---|---|---|",
             f"| {h['fve']} | {h['l0']} | {h['dead']} ({h['dead_fraction']:.1%}) | {c['train_tokens']} / "
             f"{c['held_out_tokens']} | {f['seconds']['total']} s / {f['seconds']['activations']} s / "
             f"{f['seconds']['sae_training']} s |", "", "## Topic features (label; top-activating context)", ""]
    for topic, rows in f["topic_features"].items():
        lines += [f"- **{topic}**: " + ("none found" if not rows else "")]
        lines += [f"  - `{i}` {lab} — `{ctx}`" for i, lab, ctx in rows]
    return "\n".join(lines) + "\n"
