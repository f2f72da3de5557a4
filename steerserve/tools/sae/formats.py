"""Reading the SAE formats people publish into our ``store.sae.Sae`` (serving never needs their libraries).

- **SAELens** (what Neuronpedia serves, converted Gemma Scope included): a folder with ``cfg.json`` and
  ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``,
  ``threshold`` for JumpReLU). ``cfg.json``: ``architecture`` (``standard`` = ReLU, ``jumprelu``, ``topk``
  with ``k``), ``d_in``, ``d_sae``, ``hook_name``, ``apply_b_dec_to_input``, ``normalize_activations``.
- **EleutherAI sparsify**: a folder (named after its hookpoint, e.g. ``layers.6``) with ``cfg.json``
  (``k``, ``num_latents``, ...) and ``sae.safetensors`` (``encoder.weight [d_sae, d_in]``,
  ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``); TopK, encoder reads ``x - b_dec``.
- **Gemma Scope**: ``params.npz`` (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``); JumpReLU on
  ``x``; the layer is not in the file (``--layer``).

Hook sites map onto our layer convention (the residual stream after block ``L``): SAELens'
``blocks.L.hook_resid_post`` is ``L`` and ``blocks.L.hook_resid_pre`` is ``L - 1``; sparsify's ``layers.L``
(a decoder layer's output) is ``L``. Anything else (attention or MLP outputs, ``resid_pre`` of block 0, the
embeddings) is refused: the runtime steers the residual stream only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from steerserve.errors import SteerError
from steerserve.store.sae import Sae

_SAELENS_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(post|pre)")
_SPARSIFY_HOOK = re.compile(r"(?:model\.)?(?:layers|h)\.(\d+)")


def layer_of_hook(hook: str, field: str) -> int:
    """Our layer for a SAELens hook name or a sparsify hookpoint; else a 400 naming ``field``."""
    m = _SAELENS_HOOK.fullmatch(hook)
    if m is not None:
        block = int(m[1])
        layer = block if m[2] == "post" else block - 1
        if layer >= 0:
            return layer
    m = _SPARSIFY_HOOK.fullmatch(hook)
    if m is not None:
        return int(m[1])
    raise SteerError(f"hook {hook!r} is not a residual-stream site steerserve steers (blocks.L.hook_resid_post, "
                     "blocks.L.hook_resid_pre with L >= 1, or layers.L)", field=field)


def _cfg(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except (OSError, ValueError) as exc:
        raise SteerError(f"cannot read {folder / 'cfg.json'}: {exc}", field="cfg.json") from None
    if not isinstance(cfg, dict):
        raise SteerError("must be a JSON object", field="cfg.json")
    return cfg


def read_saelens(folder: Path, layer: int | None = None) -> tuple[Sae, str]:
    """A SAELens folder as a ``Sae`` (``layer`` overrides the hook's), and a one-line source description."""
    cfg = _cfg(folder)
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none"):
        raise SteerError(f"normalize_activations {norm!r} is not supported (the SAE expects rescaled inputs)",
                         field="cfg.json.normalize_activations")
    arch = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}.get(
        str(cfg.get("architecture", "standard")))
    if arch is None:
        raise SteerError(f"architecture {cfg.get('architecture')!r} is not one of standard, jumprelu, topk",
                         field="cfg.json.architecture")
    t = safetensors.torch.load_file(str(folder / "sae_weights.safetensors"))
    hook = str(cfg.get("hook_name", ""))
    at = layer if layer is not None else layer_of_hook(hook, "cfg.json.hook_name")
    k = int(cfg["k"]) if arch == "topk" and "k" in cfg else None
    sae = Sae(at, arch, k, bool(cfg.get("apply_b_dec_to_input", True)), t["W_enc"], t["b_enc"], t["W_dec"],
              t["b_dec"], t.get("threshold") if arch == "jumprelu" else None, {})
    return sae, f"SAELens {folder.name} ({hook or 'no hook name'}, {arch})"


def read_sparsify(folder: Path, layer: int | None = None) -> tuple[Sae, str]:
    """An EleutherAI sparsify folder (TopK) as a ``Sae``; its hookpoint is the folder's name."""
    cfg = _cfg(folder)
    t = safetensors.torch.load_file(str(folder / "sae.safetensors"))
    at = layer if layer is not None else layer_of_hook(folder.name, "hookpoint")
    enc = t["encoder.weight"]  # [d_sae, d_in]
    sae = Sae(at, "topk", int(cfg["k"]), True, enc.T.contiguous(), t["encoder.bias"], t["W_dec"], t["b_dec"], None,
              {})
    return sae, f"sparsify {folder.name} (k={cfg['k']})"


def read_gemmascope(path: Path, layer: int | None) -> tuple[Sae, str]:
    """Gemma Scope's ``params.npz`` (JumpReLU on ``x``); ``layer`` is required."""
    if layer is None:
        raise SteerError("is required for a Gemma Scope params.npz (the file does not say)", field="layer")
    with np.load(path) as npz:
        t = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz.files}
    return Sae(layer, "jumprelu", None, False, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t["threshold"], {}), \
        f"Gemma Scope {path.parent.name}/{path.name}"


def read_any(path: Path, layer: int | None = None) -> tuple[Sae, str]:
    """Whichever format ``path`` is (a folder with ``sae_weights.safetensors`` or ``sae.safetensors``, or an
    ``.npz``); a missing tensor is a 400 naming it."""
    try:
        if path.is_file() and path.suffix == ".npz":
            return read_gemmascope(path, layer)
        if (path / "sae_weights.safetensors").is_file():
            return read_saelens(path, layer)
        if (path / "sae.safetensors").is_file():
            return read_sparsify(path, layer)
    except KeyError as exc:
        raise SteerError(f"the file has no tensor {exc}", field="tensors") from None
    raise SteerError("not a SAELens folder (cfg.json, sae_weights.safetensors), a sparsify folder (cfg.json, "
                     "sae.safetensors) or a Gemma Scope params.npz", field="path")
