"""Vetting of uploaded vectors against the loaded model and the server's policy, before anything is stored.

Refused, naming the field (``tensors.layer.<i>``) and giving the figures: layers outside the model, tensors
that are not 1-D floating point of the model's hidden size, any NaN or infinite value (after the cast to
float32), an all-zero layer (no direction: ablation would divide by zero) and, with a ``NormPolicy``, a
layer whose norm exceeds ``max_ratio`` x the model's typical residual-stream norm there (``tools.norms``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from steerserve.errors import SteerError
from steerserve.model_info import ModelInfo


@dataclass(frozen=True)
class NormPolicy:
    """``typical_norms[l]``: the model's typical residual-stream norm after block ``l`` (None: no limit)."""

    typical_norms: tuple[float, ...] | None = None
    max_ratio: float = float("inf")

    def limit(self, layer: int) -> float | None:
        return None if self.typical_norms is None else self.max_ratio * self.typical_norms[layer]


def metadata_number(header: Mapping[str, str], key: str) -> float:
    """``header[key]`` as a finite float; else a 400 naming ``metadata.<key>``."""
    try:
        x = float(header.get(key, "nan"))
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise SteerError(f"must be a finite number, got {header.get(key)!r}", field=f"metadata.{key}")
    return x


def check_vectors(model: ModelInfo, tensors: Mapping[int, torch.Tensor], hidden_size: int | None,
                  num_layers: int | None, policy: NormPolicy) -> dict[int, torch.Tensor]:
    """``{layer: [hidden] float32}`` of ``tensors`` if every check passes; else a 400 naming the field.
    ``hidden_size``/``num_layers``: what the producer declared, if anything."""
    m = model
    if hidden_size is not None and hidden_size != m.hidden_size:
        raise SteerError(f"hidden size {hidden_size} does not match the loaded model's {m.hidden_size}",
                         field="hidden_size")
    if num_layers is not None and num_layers != m.num_layers:
        raise SteerError(f"layer count {num_layers} does not match the loaded model's {m.num_layers}",
                         field="num_layers")
    if not isinstance(tensors, Mapping) or not tensors:
        raise SteerError("must hold at least one layer's vector", field="tensors")
    out: dict[int, torch.Tensor] = {}
    for layer, t in tensors.items():
        f = f"tensors.layer.{layer}"
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < m.num_layers:
            raise SteerError(f"layer {layer!r} is outside the model's range [0, {m.num_layers})", field=f)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 1:
            raise SteerError("must be a 1-D floating-point tensor", field=f)
        if t.shape[0] != m.hidden_size:
            raise SteerError(f"hidden size {t.shape[0]} does not match the loaded model's "
                             f"{m.hidden_size}", field=f)
        v = t.detach().to("cpu", torch.float32).contiguous()
        # Checked after the cast: a finite float64 can still overflow to inf in float32.
        if not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise SteerError(f"contains {bad} NaN or infinite value(s) (in float32)", field=f)
        norm = float(v.double().norm())
        if norm == 0.0:
            raise SteerError("is all zeros: it has no direction (ablation would divide by zero); leave the "
                             "layer out instead", field=f)
        limit = policy.limit(layer)
        if limit is not None and norm > limit:
            typical, ratio = policy.typical_norms[layer], policy.max_ratio  # type: ignore[index]
            raise SteerError(f"norm {norm:.4g} exceeds {ratio:g} x the model's typical activation norm at "
                             f"layer {layer} ({typical:.4g}), i.e. {ratio * typical:.4g}", field=f)
        out[layer] = v
    return out
