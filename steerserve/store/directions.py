"""The ``direction`` artifact: one unit vector at one layer, with the scale that gives ``coeff`` its unit.

A direction file is a safetensors file with exactly one tensor, ``layer.<l>`` (``[hidden]``, unit L2 norm),
and this metadata besides the usual model keys (``file_header``):

- ``kind``: ``"direction"``;
- ``layer``: ``l`` again (the layer the direction was chosen at; it must match the tensor's name);
- ``scale``: the layer's mean residual-stream norm on the extraction prompts (tokens 1.., the attention
  sink excluded). ``add`` adds ``coeff x scale x unit``, so ``coeff`` is in units of a typical state's
  length at that layer (as ``entropic``'s ``beta``); ``ablate`` uses the unit vector alone;
- ``recipe``: how it was made (e.g. ``"prompt"`` or ``"response"``, see ``tools.refusal``);
- ``candidates``: the JSON list of candidates it was chosen from, with their selection figures;
- ``provenance``: JSON, the exact command and data.

Validation (``check_direction``) refuses, naming the field: a file with other than one tensor, a ``layer``
that is missing, not an integer or not the tensor's layer, a norm off 1 by more than ``UNIT_TOLERANCE``,
a missing or non-positive ``scale``, and ``candidates`` that are not a JSON list. Shape, dtype, finiteness
and the layer range are ``vetting.check_vectors``' checks, run first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from steerserve.errors import SteerError
from steerserve.model_info import ModelInfo
from steerserve.store.formats import file_header

UNIT_TOLERANCE = 1e-3  # |norm - 1|: float32 storage and a cast from float64 stay far inside it
# Metadata keys that only a direction carries.
DIRECTION_KEYS = ("layer", "scale", "recipe", "candidates")


def direction_header(model: ModelInfo, layer: int, scale: float, recipe: str,
                     candidates: Sequence[Mapping[str, Any]], **extra: str) -> dict[str, str]:
    """The safetensors metadata of a direction file (``extra``: provenance, description, method...)."""

    return file_header(model, "direction", layer=str(layer), scale=repr(float(scale)), recipe=recipe,
                       candidates=json.dumps(list(candidates), allow_nan=False), **extra)


def check_direction(header: Mapping[str, str], vecs: Mapping[int, torch.Tensor]) -> tuple[int, float]:
    """``(layer, scale)`` of a direction whose tensors already passed ``check_vectors``; else a 400."""
    if len(vecs) != 1:
        raise SteerError(f"a direction holds exactly one tensor 'layer.<l>', got {len(vecs)}", field="tensors")
    ((have, unit),) = vecs.items()
    raw = header.get("layer")
    if raw is None or not (raw.isascii() and raw.isdigit()):
        raise SteerError(f"must be the direction's layer index, got {raw!r}", field="metadata.layer")
    if int(raw) != have:
        raise SteerError(f"layer {raw} does not match the tensor's layer {have}", field="metadata.layer")
    norm = float(unit.double().norm())
    if abs(norm - 1.0) > UNIT_TOLERANCE:
        raise SteerError(f"a direction must be a unit vector; its norm is {norm:.6g}", field=f"tensors.layer.{have}")
    try:
        scale = float(header.get("scale", "nan"))
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise SteerError(f"must be a finite positive number (the layer's mean residual norm), got "
                         f"{header.get('scale')!r}", field="metadata.scale")
    if "candidates" in header:
        try:
            table = json.loads(header["candidates"])
        except ValueError:
            table = None
        if not isinstance(table, list):
            raise SteerError("must be a JSON list of candidates", field="metadata.candidates")
    return have, scale
