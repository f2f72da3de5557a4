"""``steerserve extract KIND``: make steering artifacts offline. ``mean-diff`` (here): a mean-difference
vector file from prompt files; ``random`` (here): a seeded random control with the layers and norms of
another vector file; the other kinds register their own sub-command in ``add_parser``.

Prompt files: ``.txt`` (one prompt per line), ``.json`` (a list of strings, or of objects with ``--field``)
or ``.jsonl`` (objects with ``--field``). The output is a safetensors artifact (tensors ``layer.<i>``)
whose metadata records the model, the layer convention and how it was made; upload it with
``POST /admin/vectors`` or drop it into ``vectors/`` to have the server import it at start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from steerserve.config import Settings
from steerserve.store.formats import file_header
from steerserve.tools.common import read_prompts, write_artifact
from steerserve.tools.extract import asc
from steerserve.tools.extract.east_cli import add_east
from steerserve.tools.extract.ftri import add_ftri
from steerserve.tools.extract.refusal_cli import add_refusal


def add_parser(sub: argparse._SubParsersAction) -> None:
    extract = sub.add_parser("extract", help="make a steering artifact offline (mean-diff, ...)",
                             description="Make a steering artifact offline with the hf engine.")
    kinds = extract.add_subparsers(dest="kind", metavar="KIND", required=True)
    add_mean_diff(kinds)
    add_east(kinds)
    asc.add_parser(kinds)
    add_random(kinds)
    add_refusal(kinds)
    add_ftri(kinds)


def add_mean_diff(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("mean-diff", help="a mean-difference steering vector from prompt files")
    p.add_argument("--positive", type=Path, required=True, help="prompts of the wanted behaviour")
    p.add_argument("--negative", type=Path, required=True, help="contrasting prompts")
    p.add_argument("--field", default="instruction", help="key of the prompt in JSON objects")
    p.add_argument("--limit", type=int, default=None, help="use at most N prompts from each file")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    p.add_argument("--pooling", choices=("mean", "last"), default="mean",
                   help="mean over prompt tokens, or the last token (refusal-direction recipe)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    p.add_argument("--description", default="")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    p.set_defaults(func=run)


def add_random(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("random", help="a seeded random control vector shaped like another vector file",
                         description="A random direction per layer (seeded Gaussian), scaled to the norm of "
                                     "--like's vector at that layer: the control for a steering effect. No model "
                                     "is loaded; the file is for the same model as --like.")
    p.add_argument("--like", type=Path, required=True, help="the vector artifact whose layers and norms to copy")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    p.set_defaults(func=run_random)


def random_like(vectors: Mapping[int, torch.Tensor], seed: int) -> dict[int, torch.Tensor]:
    """For each layer a seeded Gaussian direction with that layer's vector norm (layers in sorted order,
    so the result depends on the seed and the shapes alone)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in sorted(vectors):
        v = vectors[layer].float()
        r = torch.randn(v.shape, generator=gen)
        out[layer] = r / r.norm() * v.norm()
    return out


def run_random(args: argparse.Namespace) -> None:
    with safetensors.safe_open(str(args.like), framework="pt") as f:
        header = dict(f.metadata() or {})
        vectors = {int(k.split(".", 1)[1]): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    keep = ("kind", "model_fingerprint", "model_name", "hidden_size", "num_layers", "layer_convention")
    provenance = {"command": "steerserve " + shlex.join(sys.argv[1:]), "like": str(args.like), "seed": args.seed}
    out_header = {k: header[k] for k in keep if k in header}  # not --like's method, provenance or calibration
    out_header.update(method="random", provenance=json.dumps(provenance),
                      description=f"seeded random control (seed {args.seed}) with the norms of {args.like.name}")
    write_artifact(args.out, random_like(vectors, args.seed), out_header)
    print(f"wrote {args.out} ({len(vectors)} layers, seed {args.seed})")


def run(args: argparse.Namespace) -> None:
    asyncio.run(_extract(args))


async def _extract(args: argparse.Namespace) -> None:
    from steerserve.bootstrap import model_path
    from steerserve.engines.hf import HFEngine
    from steerserve.model import load_hf
    from steerserve.prompts import PromptRenderer
    from steerserve.tools.extract.mean_diff import mean_difference

    settings = Settings.from_env(model=args.model)
    model, tokenizer, info = load_hf(model_path(settings), settings.dtype)
    layers = list(range(info.num_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    renderer = PromptRenderer(tokenizer, settings.max_prompt_tokens)

    def ids(p: str) -> tuple[int, ...]:
        info_ = renderer.render(messages=[{"role": "user", "content": p}]) if args.chat else renderer.render(p)
        return info_.token_ids

    pos = read_prompts(args.positive, args.field, args.limit)
    neg = read_prompts(args.negative, args.field, args.limit)
    engine = HFEngine(model, tokenizer, info, settings)
    await engine.start()
    try:
        print(f"extracting from {len(pos)} positive / {len(neg)} negative prompts at {len(layers)} layers...",
              file=sys.stderr)
        vectors = await mean_difference(engine.hidden_states, [ids(p) for p in pos], [ids(p) for p in neg],
                                        layers, args.pooling)
    finally:
        await engine.stop()
    provenance = {"command": "steerserve " + shlex.join(sys.argv[1:]), "positive": str(args.positive),
                  "negative": str(args.negative), "counts": [len(pos), len(neg)], "pooling": args.pooling,
                  "chat_template": args.chat}
    header = file_header(info, "vector", method="mean_diff", provenance=json.dumps(provenance),
                         description=args.description)
    write_artifact(args.out, vectors, header)
    norms = ", ".join(f"{k}:{float(v.norm()):.2f}" for k, v in list(vectors.items())[:6])
    print(f"wrote {args.out} ({len(vectors)} layers; norms {norms}{' ...' if len(vectors) > 6 else ''})")
