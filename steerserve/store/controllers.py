"""The ``controller`` artifact: a refusal controller (``runtime.controller``), its direction and patch scales.

A controller file is a safetensors file with exactly these tensors (floating point; stored fp16 or fp32,
loaded as fp32):

- ``w1 [D, 4H]``, ``b1 [D]``, ``w2 [1 + N, D]``, ``b2 [1 + N]``: ``Linear(4H, D) - ReLU - Linear(D, 1 + N)``
  on the concatenated states of the four read layers at the last prompt token (input standardisation
  folded into ``w1``/``b1``); ``H``/``N`` are the model's hidden size and layer count;
- ``direction [H]``: the unit refusal direction the controller scales;
- ``scales [N]``: per layer, the mean residual-stream norm (positive), the unit of ``alpha``;

and this metadata besides the usual model keys (``file_header``):

- ``kind``: ``"controller"``;
- ``read_layers``: a JSON list of four distinct ascending layer indices in ``[0, N)``;
- ``alpha``: the default strength (finite, positive): the patch is ``alpha * s * w_l * scales[l] * direction``
  at layer ``l`` and every generated token;
- ``w_mode``: ``"end_to_end"`` (the per-layer weights were trained through the patched forward) or
  ``"fixed"``;
- ``auroc`` (optional): the validation AUROC of ``s`` (harmful vs harmless), in ``[0, 1]``;
- ``direction`` (optional): JSON object naming the source direction (name, sha256);
- ``provenance``: JSON, the exact command and data rows.

Validation (``check_controller``) refuses each failure with a 400 naming the field: ``tensors`` (a missing
or unknown tensor), ``tensors.<name>`` (not floating point, wrong shape, non-finite, a direction off unit
norm, a non-positive scale) and ``metadata.<key>`` (missing or malformed). The model keys
(``hidden_size``, ``num_layers``, ``model_fingerprint``) are the store's common checks, run first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from steerserve.errors import SteerError
from steerserve.model_info import ModelInfo
from steerserve.runtime.controller import READ_LAYERS, ControllerWeights
from steerserve.store.directions import UNIT_TOLERANCE
from steerserve.store.formats import file_header
from steerserve.store.vetting import metadata_number

TENSORS = ("w1", "b1", "w2", "b2", "direction", "scales")
W_MODES = ("end_to_end", "fixed")
# Metadata keys that only a controller carries.
CONTROLLER_KEYS = ("read_layers", "alpha", "w_mode", "auroc", "direction")


def controller_header(model: ModelInfo, read_layers: Sequence[int], alpha: float, w_mode: str,
                      auroc: float | None = None, direction: Mapping[str, Any] | None = None,
                      **extra: str) -> dict[str, str]:
    """The safetensors metadata of a controller file (``extra``: provenance, description, method...)."""

    header = file_header(model, "controller", read_layers=json.dumps([int(x) for x in read_layers]),
                         alpha=repr(float(alpha)), w_mode=w_mode, **extra)
    if auroc is not None:
        header["auroc"] = repr(float(auroc))
    if direction is not None:
        header["direction"] = json.dumps(dict(direction), allow_nan=False)
    return header


def check_controller(model: ModelInfo, header: Mapping[str, str],
                     tensors: Mapping[str, torch.Tensor]) -> tuple[ControllerWeights, float]:
    """The controller (fp32 weights) and its default ``alpha`` if every check passes; else a 400 naming the
    field. ``tensors``: the file's tensors by name, as stored."""
    missing = [t for t in TENSORS if t not in tensors]
    unknown = sorted(set(tensors) - set(TENSORS))
    if missing or unknown:
        raise SteerError(f"a controller holds exactly the tensors {list(TENSORS)}; missing {missing}, "
                         f"unknown {unknown}", field="tensors")
    h, n = model.hidden_size, model.num_layers
    t = {name: _float32(name, tensors[name]) for name in TENSORS}
    d = t["w1"].shape[0] if t["w1"].dim() == 2 else -1
    want = {"w1": (d, READ_LAYERS * h), "b1": (d,), "w2": (1 + n, d), "b2": (1 + n,), "direction": (h,),
            "scales": (n,)}
    for name, shape in want.items():
        if tuple(t[name].shape) != shape or d < 1:
            raise SteerError(f"shape {list(t[name].shape)} should be {_shape_text(name)} = {list(shape)} for "
                             f"the loaded model (H {h}, N {n}, D {d})", field=f"tensors.{name}")
    norm = float(t["direction"].double().norm())
    if abs(norm - 1.0) > UNIT_TOLERANCE:
        raise SteerError(f"must be a unit vector; its norm is {norm:.6g}", field="tensors.direction")
    if not bool((t["scales"] > 0).all()):
        raise SteerError("every layer's scale (mean residual norm) must be positive", field="tensors.scales")
    read_layers = _read_layers(header.get("read_layers"), n)
    alpha = metadata_number(header, "alpha")
    if not alpha > 0:
        raise SteerError(f"must be a finite positive number, got {header.get('alpha')!r}", field="metadata.alpha")
    if header.get("w_mode") not in W_MODES:
        raise SteerError(f"must be one of {list(W_MODES)}, got {header.get('w_mode')!r}", field="metadata.w_mode")
    if "auroc" in header and not 0.0 <= metadata_number(header, "auroc") <= 1.0:
        raise SteerError(f"must be a number in [0, 1], got {header['auroc']!r}", field="metadata.auroc")
    if "direction" in header and not isinstance(_json(header["direction"]), dict):
        raise SteerError("must be a JSON object naming the source direction", field="metadata.direction")
    weights = ControllerWeights(t["w1"], t["b1"], t["w2"], t["b2"], read_layers, t["direction"], t["scales"])
    return weights, alpha


def _float32(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise SteerError("must be a floating-point tensor", field=f"tensors.{name}")
    v = x.detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(v).all()):  # after the cast: a finite float64 can overflow float32
        raise SteerError(f"contains {int((~torch.isfinite(v)).sum())} NaN or infinite value(s) (in float32)",
                         field=f"tensors.{name}")
    return v


def _shape_text(name: str) -> str:
    return {"w1": "[D, 4H]", "b1": "[D]", "w2": "[1 + N, D]", "b2": "[1 + N]", "direction": "[H]",
            "scales": "[N]"}[name]


def _read_layers(raw: str | None, n: int) -> tuple[int, ...]:
    value = _json(raw) if raw is not None else None
    ok = (isinstance(value, list) and len(value) == READ_LAYERS
          and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n for x in value)
          and value == sorted(set(value)))
    if not ok:
        raise SteerError(f"must be a JSON list of {READ_LAYERS} distinct ascending layer indices in [0, {n}), "
                         f"got {raw!r}", field="metadata.read_layers")
    return tuple(value)  # type: ignore[arg-type]  # checked above: a list of ints


def _json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
