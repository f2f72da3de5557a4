"""An uploaded artifact file, read and checked against the loaded model before anything is stored.

``read_upload`` takes safetensors bytes and returns what the store commits (``Upload``) or raises a 400
naming the field: unknown metadata keys, a kind that cannot be uploaded, another model's fingerprint or
shapes, and each kind's own checks (``vetting``, ``directions``, ``controllers``, ``safeswitch``). It also
says what the artifact does at its **declared strength** (``Declared``), which the server then measures on
calibration prompts before the commit (``methods.vetting``: the KL budget of the admin-side threat model).

Declared strength, per kind:
- ``vector``: metadata ``declared_use``, JSON ``{"coeff": c, "layers": [..]}``: the largest ``|coeff|`` the
  producer declares it for and the layers it is added at together (default: every layer in the file); without
  it, the calibrated ``gamma_max`` (``steerserve calibrate``), else 1, at every layer in the file;
- ``direction``: ``declared_use``'s ``coeff`` (in ``add``'s units: typical-norm lengths at its layer), else 1;
- ``controller``: its ``alpha``, run as served (its in-graph decision included);
- ``head``: the head's delta on the model's logits; ``probe``: nothing (probes read, they do not steer);
- ``expert_set``: its experts disabled in mask mode at every position (``ops``; ``store.expert_sets``);
- ``sae``: nothing (a dictionary steers only through the features a request names, at the strengths the
  request's policy allows).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import safetensors.torch
import torch

from steerserve.errors import SteerError
from steerserve.model_info import LAYER_CONVENTION, ModelInfo
from steerserve.runtime.controller import ControllerWeights
from steerserve.runtime.plan import SteerOp
from steerserve.runtime.safeswitch import HeadDelta
from steerserve.store import db
from steerserve.store.controllers import CONTROLLER_KEYS, check_controller
from steerserve.store.directions import DIRECTION_KEYS, check_direction
from steerserve.store.expert_sets import EXPERT_SET_KEYS, check_expert_set, mask_ops
from steerserve.store.formats import DESCRIPTIVE_KEYS, HOOK_SITE
from steerserve.store.sae import SAE_KEYS, check_sae
from steerserve.store.safeswitch import HEAD_KEYS, PROBE_KEYS, check_head, check_probes
from steerserve.store.vetting import NormPolicy, check_vectors

TENSOR_RE = re.compile(r"layer\.(0|[1-9][0-9]*)")  # no leading zeros: "layer.01" would alias "layer.1"
# What a file upload may be (/admin/vectors).
FILE_KINDS = ("vector", "direction", "controller", "probe", "head", "expert_set", "sae")
STRENGTH_KEY = "declared_use"  # a vector's or direction's declared largest |coeff| and its layers (JSON)
# Metadata an uploaded file may carry. The first three, hook_site and model_architecture are checked against
# the model; the rest are what the store writes itself, accepted so that an exported artifact can be uploaded
# again.
_ALLOWED = {"hidden_size", "num_layers", "model_fingerprint", "kind", "model_name", "method",
            "layer_convention", "format", "provenance", "description", "calibration", STRENGTH_KEY, *DESCRIPTIVE_KEYS,
            *DIRECTION_KEYS, *PROBE_KEYS, *HEAD_KEYS, *CONTROLLER_KEYS, *EXPERT_SET_KEYS, *SAE_KEYS}
_OWNED = (("direction", DIRECTION_KEYS), ("controller", CONTROLLER_KEYS), ("probe", PROBE_KEYS), ("head", HEAD_KEYS),
          ("expert_set", EXPERT_SET_KEYS), ("sae", SAE_KEYS))


@dataclass(frozen=True, eq=False)
class Declared:
    """What an artifact does at its declared strength (see the module docstring); ``methods.vetting`` runs it."""

    kind: str
    strength: float | None = None  # vector/direction: the declared |coeff|; controller: its alpha
    vectors: Mapping[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # layer -> [H], at coeff 1
    controller: ControllerWeights | None = None
    head: HeadDelta | None = None
    ops: tuple[SteerOp, ...] = ()  # expert_set: ROUTE ops run as they are (every position)


@dataclass(frozen=True, eq=False)
class Upload:
    """A checked file: what ``ArtifactStore._commit`` stores, and its ``Declared`` effect."""

    kind: str
    header: Mapping[str, str]  # the file's metadata
    vectors: dict[int, torch.Tensor]  # per-layer vectors (vector, direction); else empty
    layers: tuple[int, ...] | None  # the manifest's layers when not the vectors' (a controller's read layers)
    declared: Declared


def read_upload(model: ModelInfo, data: bytes, policy: NormPolicy) -> Upload:
    """``data`` (safetensors bytes) checked against ``model`` and ``policy``; else a 400 naming the field."""
    try:
        loaded, header = safetensors.torch.load(data), db.header_metadata(data)
    except Exception as e:  # the parser's errors are many and untyped; all mean a bad upload
        raise SteerError(f"not a valid safetensors file: {e}", field="file") from None
    for key in header:
        if key not in _ALLOWED:
            raise SteerError(f"unknown metadata key {key!r}; allowed: {sorted(_ALLOWED)}", field=f"metadata.{key}")
    kind = header.get("kind", "vector")
    if kind not in FILE_KINDS:
        raise SteerError(f"kind {kind!r} cannot be uploaded as a file; expected one of {list(FILE_KINDS)}",
                         field="metadata.kind")
    for owner, keys in (*_OWNED, ("vector or direction", (STRENGTH_KEY,))):
        for key in keys:
            if kind not in owner.split(" or ") and key in header:
                raise SteerError(f"only a {owner!r} file carries this key", field=f"metadata.{key}")
    expected = {"layer_convention": LAYER_CONVENTION, "model_fingerprint": model.fingerprint, "hook_site": HOOK_SITE,
                "model_architecture": model.architecture}
    for key, want in expected.items():
        if header.get(key, want) != want:
            f, whose = ("model_fingerprint", "the loaded model's") if key == "model_fingerprint" else (
                f"metadata.{key}", "the expected")
            raise SteerError(f"{key} {header[key]!r} does not match {whose} {want!r}", field=f)
    declared: dict[str, int] = {}
    for key, have in (("hidden_size", model.hidden_size), ("num_layers", model.num_layers)):
        if key in header:
            if not (header[key].isascii() and header[key].isdigit()):
                raise SteerError(f"must be a non-negative integer, got {header[key]!r}", field=key)
            declared[key] = int(header[key])
            if declared[key] != have:
                raise SteerError(f"{key} {declared[key]} does not match the loaded model's {have}", field=key)
    if kind == "probe":
        check_probes(model, header, loaded)
        return Upload(kind, header, {}, None, Declared(kind))
    if kind == "sae":
        return Upload(kind, header, {}, (check_sae(model, header, loaded).layer,), Declared(kind))
    if kind == "head":
        return Upload(kind, header, {}, None, Declared(kind, head=check_head(model, header, loaded)))
    if kind == "expert_set":
        experts = check_expert_set(model, header, loaded).experts
        return Upload(kind, header, {}, tuple(sorted(experts)), Declared(kind, ops=mask_ops(model, experts)))
    if kind == "controller":
        weights, alpha = check_controller(model, header, loaded)
        return Upload(kind, header, {}, weights.read_layers, Declared(kind, alpha, controller=weights))
    by_layer: dict[int, torch.Tensor] = {}
    for tname, t in loaded.items():
        m = TENSOR_RE.fullmatch(tname)
        if m is None:
            raise SteerError(f"tensor {tname!r} must be named 'layer.<i>' (0-based layer index)",
                             field=f"tensors.{tname}")
        by_layer[int(m[1])] = t
    vecs = check_vectors(model, by_layer, declared.get("hidden_size"), declared.get("num_layers"), policy)
    coeff, layers = declared_use(header, sorted(vecs))
    added = {layer: vecs[layer] for layer in layers}
    if kind == "direction":
        layer, scale = check_direction(header, vecs)
        added = {layer: vecs[layer] * scale}  # add's coeff 1 is one typical norm along the unit vector
    return Upload(kind, header, vecs, None, Declared(kind, coeff, added))


def declared_use(header: Mapping[str, str], have: list[int]) -> tuple[float, list[int]]:
    """A vector's or direction's declared ``(|coeff|, layers)`` (see the module docstring); else a 400 naming
    ``metadata.declared_use``."""
    f = f"metadata.{STRENGTH_KEY}"
    if STRENGTH_KEY not in header:
        try:
            gamma = json.loads(header.get("calibration", "{}")).get("gamma_max")
        except (ValueError, AttributeError):
            gamma = None
        return (float(gamma) if isinstance(gamma, (int, float)) and gamma > 0 else 1.0), have
    try:
        use = json.loads(header[STRENGTH_KEY])
    except ValueError:
        use = None
    coeff = use.get("coeff") if isinstance(use, dict) else None
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not 0 < coeff < float("inf"):
        raise SteerError(f'must be JSON {{"coeff": <positive number>, "layers": [...]}}, got {header[STRENGTH_KEY]!r}',
                         field=f)
    layers = use.get("layers", have)
    if not isinstance(layers, list) or not layers or any(x not in have for x in layers) or len(set(layers)) < len(
            layers):
        raise SteerError(f"layers must be distinct layers the file holds ({have}), got {layers!r}", field=f)
    return float(coeff), layers
