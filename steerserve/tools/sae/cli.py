"""``steerserve sae import PATH --name N [--layer L]``: a published SAE into the artifact store, no server.

``PATH`` is a SAELens folder, an EleutherAI sparsify folder or a Gemma Scope ``params.npz`` (``formats``).
The dictionary is converted to our ``sae`` file (``store.sae``) and stored with an upload's checks: the model's
hidden size and layers, finite values, a residual-stream hook. A file of any width may be imported here; the
admin upload (``POST /admin/vectors``) takes one up to the server's upload limit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import safetensors.torch
import torch

from steerserve.errors import SteerError
from steerserve.model_info import ModelInfo
from steerserve.tools.vectors.cli import open_store, store_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("sae", help="import sparse-autoencoder dictionaries (SAELens, sparsify, Gemma Scope)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="store a SAELens/sparsify folder or a Gemma Scope params.npz")
    imp.add_argument("path", type=Path, help="the SAE's folder, or a params.npz")
    imp.add_argument("--name", required=True, help="artifact name")
    imp.add_argument("--layer", type=int, default=None,
                     help="our layer (the residual stream after block L); default: from the SAE's hook name")
    imp.add_argument("--description", default="", help="description stored with it")
    store_arguments(imp)
    imp.set_defaults(func=run_import)


def sae_bytes(path: Path, layer: int | None, model: ModelInfo, labels: dict[int, str] | None = None, *,
              dtype: torch.dtype | None = None, **extra: str) -> bytes:
    """The ``sae`` file of the SAE at ``path`` for ``model``, with ``labels`` (feature -> label) if given, the
    tensors cast to ``dtype`` if given, and ``extra`` metadata (``method``, ``provenance``, ``description``)."""
    import dataclasses

    from steerserve.store.sae import sae_header
    from steerserve.tools.sae.formats import read_any

    sae, source = read_any(path, layer)
    if labels:
        sae = dataclasses.replace(sae, labels=labels)
    header = sae_header(model, sae, source, **extra)
    return safetensors.torch.save({k: (v if dtype is None else v.to(dtype)).contiguous()
                                   for k, v in sae.tensors().items()}, metadata=header)


def run_import(args: argparse.Namespace) -> int:
    store, _, _ = open_store(args, norms=False)
    try:
        data = sae_bytes(args.path, args.layer, store.model)
        meta = store.put_vector_file(args.name, data, description=args.description,
                                     provenance={"source": f"steerserve sae import {args.path.name}"})
    except SteerError as exc:
        print(f"steerserve sae: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"imported {meta.ref()} (sae, layer {meta.layers[0]}) from {args.path}")
    return 0
