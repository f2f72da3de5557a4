"""``steerserve vectors import|export``: steering vectors into and out of the artifact store, no server needed.

- ``steerserve vectors import FILE [--name N] [--description D]``: a steerserve safetensors file or a
  llama.cpp / repeng GGUF control vector (told apart by its first bytes; ``store.gguf_io`` for the layer
  mapping) becomes the next version of ``N`` (default: the file's stem), with an upload's checks: the model's
  shapes and fingerprint, the kind's own checks and the norm policy (typical norms measured once per model,
  as ``serve`` does). The KL vetting needs the serving engine: ``POST /admin/vectors`` runs it, this command
  does not (as ``serve``'s start-up import of ``--vectors-dir`` does not).
- ``steerserve vectors export NAME[@V] --out FILE.gguf|FILE.safetensors [--format F] [--drop-layer-0]``:
  the vector or direction in either format with its self-describing metadata (``store.formats.export_artifact``,
  which ``GET /admin/vectors/{name}/export`` serves too).

The store is the one ``serve`` opens for the model: ``--store`` (default ``$STEERSERVE_HOME/store``) /
the model's fingerprint. A running server may share it (SQLite serialises the writers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from steerserve.config import Settings
from steerserve.errors import SteerError
from steerserve.model_info import ModelInfo
from steerserve.store.artifacts import ArtifactStore
from steerserve.store.formats import FORMATS, export_artifact


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("vectors", help="import or export steering vectors (safetensors, GGUF control vectors)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="store a safetensors or GGUF vector file as the next version of a name")
    imp.add_argument("file", type=Path, help="a .safetensors artifact or a .gguf control vector")
    imp.add_argument("--name", default=None, help="artifact name (default: the file's stem)")
    imp.add_argument("--description", default="", help="description stored with it")
    exp = sub.add_parser("export", help="write a stored vector as .safetensors or a .gguf control vector")
    exp.add_argument("name", help="NAME (latest version) or NAME@V")
    exp.add_argument("--out", type=Path, required=True, help="output file; its suffix picks the format")
    exp.add_argument("--format", choices=FORMATS, default=None, help="overrides the suffix")
    exp.add_argument("--drop-layer-0", action="store_true",
                     help="GGUF: leave layer 0 out (llama.cpp refuses a control vector that has one)")
    for q in (imp, exp):
        store_arguments(q)
    imp.set_defaults(func=run_import)
    exp.set_defaults(func=run_export)


def store_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--store``: the store ``open_store`` opens, as ``serve`` would for that model."""
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.add_argument("--store", type=Path, default=None, metavar="DIR",
                   help="store root (default: $STEERSERVE_HOME/store); the model's store is DIR/<fingerprint>")


def open_store(args: argparse.Namespace, *, norms: bool) -> tuple[ArtifactStore, Settings, Path]:
    """The model's artifact store as ``serve`` opens it (with the norm policy when ``norms``); no model load
    unless the typical norms were never measured."""
    from steerserve.bootstrap import model_path
    from steerserve.model import model_info

    settings = Settings.from_env(model=args.model)
    path = model_path(settings, lambda msg: print(msg, file=sys.stderr))
    info = model_info(path, settings.dtype, settings.model_name)
    store = ArtifactStore((args.store or settings.store_dir) / info.fingerprint, info)
    store.max_description_chars = settings.max_description_chars
    if norms:
        from steerserve.tools import norms as norms_mod

        typical = norms_mod.load_or_measure(store.root, info.fingerprint, lambda: _measure(path, settings, info))
        store.set_norm_policy(typical, settings.max_vector_norm_ratio)
    return store, settings, path


def _measure(path: Path, settings: Settings, info: ModelInfo) -> list[float]:
    """The typical residual norms, measured on the hf model as ``bootstrap`` does (once per model)."""
    from steerserve.model import load_hf
    from steerserve.prompts import PromptRenderer
    from steerserve.tools import norms

    print(f"measuring {info.name}'s typical activation norms (once per model)...", file=sys.stderr)
    model, tokenizer, _ = load_hf(path, "float32")
    renderer = PromptRenderer(tokenizer, settings.max_prompt_tokens, settings.max_prompt_chars)
    return norms.measure_hf(model, renderer.tokenize, info.num_layers)


def _fail(exc: SteerError) -> int:
    print(f"steerserve vectors: {exc}", file=sys.stderr)  # str() names the field
    return 2


def run_import(args: argparse.Namespace) -> int:
    data = args.file.read_bytes()
    store, _, _ = open_store(args, norms=True)
    try:
        meta = store.put_vector_file(args.name or args.file.stem, data, description=args.description,
                                     provenance={"source": f"steerserve vectors import {args.file.name}"})
    except SteerError as exc:
        return _fail(exc)
    finally:
        store.close()
    print(f"imported {meta.ref()} ({meta.kind}, layers {list(meta.layers)}) from {args.file}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    fmt = args.format or args.out.suffix.removeprefix(".").lower()
    if fmt not in FORMATS:
        print(f"steerserve vectors: --out must end in .gguf or .safetensors, or give --format ({args.out})",
              file=sys.stderr)
        return 2
    store, _, _ = open_store(args, norms=False)
    try:
        meta, out = export_artifact(store, args.name, fmt, drop_layer_0=args.drop_layer_0)
    except SteerError as exc:
        return _fail(exc)
    finally:
        store.close()
    from steerserve.tools.common import write_bytes

    write_bytes(args.out, out)
    layers = [k for k in meta.layers if not (k == 0 and fmt == "gguf" and args.drop_layer_0)]
    print(f"wrote {args.out} ({fmt}, {meta.ref()}, layers {layers})")
    return 0
