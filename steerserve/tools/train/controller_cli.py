"""``steerserve train controller``: a refusal ``controller`` artifact (Guiding Giants, the paper's version).

The controller reads four layers ``k-3..k`` at the last token of the chat-templated prompt and gives a
scale ``s`` and per-layer weights ``w``; serving then adds ``alpha * s * w_l * scale_l * r`` at every layer
of every generated token and at the layers above ``k`` of the last prompt token (``runtime.controller``).
This command fits it (``tools.controller_train``: ``s`` by BCE; ``w`` fixed, by default 0.5 at the
direction's layer and ~0 elsewhere, or with ``--w-mode end_to_end`` trained through the patched forward of
the frozen model), chooses the default ``alpha`` on *selection* rows by patched greedy generation,
measures the validation AUROC of ``s`` and writes the artifact (``store.controllers``). The defaults make
the shipped ``vectors/refusal_controller.safetensors``; ``vectors/README.md`` has its figures and why
``w`` is fixed.

Rows of ``harmful_train.json`` and ``harmless_train.json`` are kept apart by use: ``[0, --fit)`` fit ``s``
(the first ``--e2e-prompts`` of them also fit ``w``), ``[--fit, --fit + --select)`` choose alpha; the val
files (``harmful_val.json``, the first ``--val-harmless`` rows of ``harmless_val.json``) only give the
AUROC. ``r`` is the unit vector of ``--direction`` (a ``direction`` artifact); ``scale_l`` is the mean
residual norm at layer ``l`` over tokens 1.. of the stage-2 sequences (prompt + target reply, unpatched),
as a direction's ``scale`` is measured. The data is read at run time from ``../shared/data/refusal/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from steerserve.config import Settings
from steerserve.tools.common import read_prompts, require_counts
from steerserve.tools.extract.refusal_cli import add_data_arguments


def add_controller(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("controller", help="a refusal controller (Guiding Giants, the paper's version)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(p)
    p.add_argument("--fit", type=int, default=200, help="rows of each train file that fit the controller (200)")
    p.add_argument("--select", type=int, default=60, help="rows after those that choose alpha (60)")
    p.add_argument("--val-harmless", type=int, default=200, help="rows of harmless_val for the AUROC (200)")
    p.add_argument("--direction", type=Path, default=Path("vectors/refusal_direction.safetensors"),
                   help="the direction artifact whose unit vector the controller scales")
    p.add_argument("--read-top", default="below-direction",
                   help="k, the last of the four read layers k-3..k: 'below-direction' (default: the direction's "
                        "layer - 1, so that layer of the last prompt token takes the patch), 'last' (the paper's "
                        "last four layers) or a layer index")
    p.add_argument("--epochs", type=int, default=10, help="stage 1 (s) epochs (10)")
    p.add_argument("--lr", type=float, default=5e-5, help="stage 1 AdamW learning rate (5e-5, the paper's)")
    p.add_argument("--batch", type=int, default=16, help="stage 1 mini-batch (16)")
    p.add_argument("--reg", type=float, default=0.01,
                   help="stage 1 regulariser on w: reg * mean(logit(w)^2), holding w near 0.5 (0.01)")
    p.add_argument("--w-mode", choices=("end_to_end", "fixed"), default="fixed",
                   help="end_to_end: train w through the patched forward (stage 2); fixed (default): set w "
                        "(see the README: end-to-end w did not give a usable controller on the default model)")
    p.add_argument("--fixed-w", type=float, default=0.5, help="--w-mode fixed: w on the --fixed-layers (0.5)")
    p.add_argument("--fixed-layers", default="direction",
                   help="--w-mode fixed: 'direction' (the direction's own layer, default), 'all', or "
                        "comma-separated layers that get --fixed-w; the others get w ~ 0")
    p.add_argument("--e2e-init-w", type=float, default=None,
                   help="stage 2: start every w at this value (the head's weights zeroed) instead of stage 1's")
    p.add_argument("--e2e-prompts", type=int, default=48, help="stage 2: fit rows of each file (48)")
    p.add_argument("--e2e-epochs", type=int, default=4, help="stage 2 epochs (4)")
    p.add_argument("--e2e-lr", type=float, default=1e-2, help="stage 2 AdamW learning rate on the w head (1e-2)")
    p.add_argument("--e2e-batch", type=int, default=8, help="stage 2 batch, half harmful (8)")
    p.add_argument("--e2e-reg", type=float, default=0.1, help="stage 2 L1 regulariser on w (0.1)")
    p.add_argument("--reply-tokens", type=int, default=16, help="stage 2: length of the harmless greedy replies")
    p.add_argument("--refusal-tokens", type=int, default=None,
                   help="stage 2: score only the templated refusals' tokens 1..K (their onset; default: all)")
    p.add_argument("--alpha-train", type=float, default=0.1, help="stage 2 patch strength (0.1)")
    p.add_argument("--alphas", default="0.5,0.6,0.7,0.8,0.9,1",
                   help="alphas tried on the selection rows, ascending until harmful refusal reaches the target")
    p.add_argument("--gen-tokens", type=int, default=48, help="greedy tokens judged on the selection rows (48)")
    p.add_argument("--min-harmful", type=float, default=0.8, help="alpha target: harmful refusal at least (0.8)")
    p.add_argument("--max-harmless", type=float, default=0.1, help="alpha target: harmless refusal at most (0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--description", default="")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.add_argument("--states-cache", type=Path, default=None,
                   help="keep the controller inputs (states of every prompt) in this file and reuse them while "
                        "the model, layers and prompts are the same")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    p.set_defaults(func=run)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> None:
    require_counts(args, ("fit", "select", "val_harmless", "epochs", "batch", "e2e_prompts", "e2e_epochs",
                          "e2e_batch", "reply_tokens", "gen_tokens"))
    try:
        args.alpha_list = sorted({float(a) for a in args.alphas.split(",")})
    except ValueError:
        raise SystemExit("--alphas must be comma-separated numbers") from None
    for flag in ("lr", "e2e_lr", "alpha_train"):
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) > 0):
            raise SystemExit(f"--{flag.replace('_', '-')} must be a positive number")
    if not all(math.isfinite(a) and a > 0 for a in args.alpha_list):
        raise SystemExit("--alphas must be positive numbers")
    if args.refusal_tokens is not None and args.refusal_tokens < 1:
        raise SystemExit("--refusal-tokens must be at least 1")
    if args.e2e_prompts > args.fit:
        raise SystemExit("--e2e-prompts must not exceed --fit (stage 2 fits on fit rows only)")
    for flag in ("fixed_w", "e2e_init_w"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be in (0, 1) (w is a sigmoid)")
    if args.fixed_layers not in ("direction", "all"):
        try:
            args.fixed_list = sorted({int(x) for x in args.fixed_layers.split(",")})
        except ValueError:
            raise SystemExit("--fixed-layers must be 'direction', 'all' or comma-separated layer indices") from None
    for path in (args.harmful, args.harmless, args.harmful_val, args.harmless_val, args.direction):
        if not path.is_file():
            raise SystemExit(f"{path} not found (the refusal splits live in ../shared/data/refusal/)")
    train(args)


def _direction(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """The unit vector of a direction artifact and what to record about it."""
    data = path.read_bytes()
    with safetensors.safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
        (key,) = list(f.keys())
        vec = f.get_tensor(key).float()
    if header.get("kind") != "direction":
        raise SystemExit(f"{path} is not a direction artifact (kind {header.get('kind')!r})")
    return vec / vec.norm(), {"name": path.stem, "sha256": hashlib.sha256(data).hexdigest(),
                              "layer": int(header["layer"]), "scale": float(header["scale"])}


def train(args: argparse.Namespace) -> None:
    from steerserve.bootstrap import model_path
    from steerserve.model import load_hf
    from steerserve.prompts import PromptRenderer
    from steerserve.tools.train.controller_run import WIDTH, Tools, fit_and_select

    started, cpu = time.monotonic(), time.process_time()
    torch.manual_seed(args.seed)
    settings = Settings.from_env(model=args.model)
    model, tokenizer, info = load_hf(model_path(settings), settings.dtype)
    model.requires_grad_(False)  # frozen: gradients flow to the controller only
    renderer = PromptRenderer(tokenizer, settings.max_prompt_tokens)
    direction, source = _direction(args.direction)
    if args.fixed_layers in ("direction", "all"):
        args.fixed_list = [source["layer"]] if args.fixed_layers == "direction" else None
    if direction.shape != (info.hidden_size,):
        raise SystemExit(f"{args.direction} has hidden size {direction.shape[0]}, the model {info.hidden_size}")

    def chat(p: str) -> tuple[int, ...]:
        return renderer.render(messages=[{"role": "user", "content": p}]).token_ids

    n, k = args.fit, args.select
    rows: dict[str, list[tuple[int, ...]]] = {}
    for name, path, limit in (("harmful", args.harmful, n + k), ("harmless", args.harmless, n + k),
                              ("harmful_val", args.harmful_val, None),
                              ("harmless_val", args.harmless_val, args.val_harmless)):
        rows[name] = [chat(p) for p in read_prompts(path, args.field, limit)]
    if min(len(rows["harmful"]), len(rows["harmless"])) < n + k:
        raise SystemExit(f"--fit + --select = {n + k} rows needed from each train file")
    eos = sorted({int(t) for t in ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    top = {"below-direction": source["layer"] - 1, "last": info.num_layers - 1}.get(args.read_top)
    if top is None:
        top = int(args.read_top) if args.read_top.isdigit() else -1
    if not 3 <= top < info.num_layers:
        raise SystemExit(f"--read-top must be 'below-direction', 'last' or a layer in [3, {info.num_layers})")
    read_layers = list(range(top - 3, top + 1))
    tools = Tools(model, renderer, pad, eos, info.fingerprint)
    result = fit_and_select(args, tools, rows, read_layers, direction, _log)
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu
    provenance: dict[str, Any] = {
        "command": "steerserve " + shlex.join(sys.argv[1:]),
        "data": {"harmful": str(args.harmful), "harmless": str(args.harmless), "field": args.field,
                 "fit_rows": [0, n], "select_rows": [n, n + k], "e2e_rows": [0, args.e2e_prompts],
                 "val": {"harmful": f"{args.harmful_val} (all {len(rows['harmful_val'])})",
                         "harmless": f"{args.harmless_val} rows [0, {len(rows['harmless_val'])})"}},
        "direction": source, "read_layers": read_layers, "width": WIDTH, "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "threads": torch.get_num_threads(), **result.provenance}
    header_extra = {"method": "refusal_controller", "provenance": json.dumps(provenance, allow_nan=False),
                    "description": args.description}
    from steerserve.store.controllers import controller_header

    header = controller_header(info, read_layers, result.alpha, args.w_mode, result.auroc, source,
                               **header_extra)
    tensors = {**result.tensors, "direction": direction.contiguous(), "scales": result.scales.contiguous()}
    _write(args.out, tensors, header)
    sel = result.chosen
    print(f"wrote {args.out}: alpha {result.alpha:g} ({result.note}), w_mode {args.w_mode}, val AUROC of s "
          f"{result.auroc:.4f} ({len(rows['harmful_val'])} harmful vs {len(rows['harmless_val'])} harmless); "
          f"selection at alpha {result.alpha:g}: harmful refusal {sel['harmful_refusal']:.3f}, harmless "
          f"{sel['harmless_refusal']:.3f}, repetition {sel['harmful_repetition']:.3f}/"
          f"{sel['harmless_repetition']:.3f}; {seconds / 60:.1f} min wall, {cpu / 60:.1f} min CPU, "
          f"{torch.get_num_threads()} thread(s)")


def _write(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    from steerserve.tools.common import write_bytes

    write_bytes(path, safetensors.torch.save(tensors, metadata=header))
