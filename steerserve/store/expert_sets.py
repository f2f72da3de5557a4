"""The ``expert_set`` artifact: chosen experts of an MoE model per MoE layer (``steerserve extract ftri``), which
``expert_mask`` disables (or forces) by name.

An expert set is a safetensors file with these tensors:

- ``layer.<l>``: 1-D integer tensor of distinct expert ids in ``[0, E)`` for MoE layer ``l`` (at least one
  layer; at most ``E - top_k`` ids per layer, so that the set can be disabled in either mode);
- ``scores`` (optional): ``[N, E]`` floating point, the score table it was chosen from (``N`` the model's
  layer count; rows of dense layers are 0);

and this metadata besides the usual model keys (``file_header``):

- ``kind``: ``"expert_set"``; ``num_experts``, ``top_k``: the MoE layout it was made for (must match);
- ``by`` (optional): ``"weight"`` or ``"count"`` (what fTRI summed); ``classes`` (optional): JSON object
  (target class, the others, prompt counts); ``provenance``: JSON, the exact command and data.

Validation (``check_expert_set``) refuses each failure with a 400 naming the field: ``metadata.kind`` (the
loaded model is dense), ``metadata.<key>``, ``tensors`` (no layer), ``tensors.<name>`` (unknown, a dense
layer, a wrong dtype or shape, an id out of range or repeated, too many ids).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from steerserve.errors import SteerError
from steerserve.model_info import ModelInfo, MoEInfo
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.route_op import encode_row
from steerserve.store.formats import file_header

EXPERT_SET_KEYS = ("num_experts", "top_k", "by", "classes")  # metadata only an expert set carries
BY = ("weight", "count")


@dataclass(frozen=True, eq=False)
class ExpertSet:
    """Expert ids per MoE layer, and the ``[N, E]`` score table they were chosen from (if the file has one)."""

    experts: dict[int, tuple[int, ...]]
    scores: torch.Tensor | None = None


def expert_set_header(model: ModelInfo, by: str, classes: Mapping[str, object], **extra: str) -> dict[str, str]:
    """The safetensors metadata of an expert-set file (``extra``: provenance, description, method...)."""

    moe = _moe(model)
    return file_header(model, "expert_set", num_experts=str(moe.num_experts), top_k=str(moe.top_k), by=by,
                       classes=json.dumps(dict(classes), allow_nan=False), **extra)


def expert_set_tensors(experts: Mapping[int, Sequence[int]],
                       scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors (as ``check_expert_set`` wants them)."""
    out = {f"layer.{layer}": torch.tensor(list(ids), dtype=torch.int64) for layer, ids in sorted(experts.items())}
    if scores is not None:
        out["scores"] = scores.detach().to("cpu", torch.float32).contiguous()
    return out


def check_expert_set(model: ModelInfo, header: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> ExpertSet:
    """The set if every check passes (see the module docstring); else a 400 naming the field."""
    moe = _moe(model)
    for key, have in (("num_experts", moe.num_experts), ("top_k", moe.top_k)):
        if header.get(key) != str(have):
            raise SteerError(f"must be the loaded model's {key} {have}, got {header.get(key)!r}",
                             field=f"metadata.{key}")
    if "by" in header and header["by"] not in BY:
        raise SteerError(f"must be one of {list(BY)}, got {header['by']!r}", field="metadata.by")
    if "classes" in header:
        try:
            ok = isinstance(json.loads(header["classes"]), dict)
        except ValueError:
            ok = False
        if not ok:
            raise SteerError("must be a JSON object", field="metadata.classes")
    experts: dict[int, tuple[int, ...]] = {}
    scores = None
    e, n = moe.num_experts, model.num_layers
    for name, t in tensors.items():
        f = f"tensors.{name}"
        if name == "scores":
            if not t.is_floating_point() or tuple(t.shape) != (n, e):
                raise SteerError(f"must be a floating point [{n}, {e}] table, got {t.dtype} {list(t.shape)}", field=f)
            scores = t.detach().to("cpu", torch.float32).contiguous()
            if not bool(torch.isfinite(scores).all()):
                raise SteerError("contains NaN or infinite values", field=f)
            continue
        layer = _layer(name)
        if layer is None:
            raise SteerError("unknown tensor; an expert set holds 'layer.<l>' tensors and 'scores'", field=f)
        if layer not in moe.layers:
            raise SteerError(f"layer {layer} is not an MoE layer of the loaded model (MoE layers: {list(moe.layers)})",
                             field=f)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() != 1 or t.numel() == 0:
            raise SteerError(f"must be a non-empty 1-D integer tensor of expert ids, got {t.dtype} {list(t.shape)}",
                             field=f)
        ids = tuple(int(x) for x in t.tolist())
        bad = [x for x in ids if not 0 <= x < e]
        if bad:
            raise SteerError(f"expert id(s) {bad} out of range [0, {e})", field=f)
        if len(set(ids)) != len(ids):
            raise SteerError("repeats an expert id", field=f)
        if len(ids) > e - moe.top_k:
            raise SteerError(f"holds {len(ids)} experts; at most E - top_k = {e - moe.top_k} per layer", field=f)
        experts[layer] = ids
    if not experts:
        raise SteerError("an expert set needs at least one 'layer.<l>' tensor", field="tensors")
    return ExpertSet(experts, scores)


def mask_ops(model: ModelInfo, experts: Mapping[int, Sequence[int]]) -> tuple[SteerOp, ...]:
    """The set disabled in mask mode at every position: what the upload vetting measures."""
    moe = _moe(model)
    return tuple(SteerOp(OpKind.ROUTE, layer, VectorRef.of(encode_row(model.hidden_size, moe.num_experts, ids)), 1.0)
                 for layer, ids in sorted(experts.items()))


def _moe(model: ModelInfo) -> MoEInfo:
    if model.moe is None:
        raise SteerError(f"an expert set needs an MoE model; the loaded model {model.name!r} is dense",
                         field="metadata.kind")
    return model.moe


def _layer(name: str) -> int | None:
    head, _, tail = name.partition(".")
    if head != "layer" or not tail.isascii() or not tail.isdigit() or (len(tail) > 1 and tail[0] == "0"):
        return None
    return int(tail)
