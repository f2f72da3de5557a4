"""The ``sae`` artifact: a sparse autoencoder's dictionary over one layer's residual stream.

A ``sae`` file is a safetensors file with the tensors ``W_enc [H, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, H]``, ``b_dec [H]`` and, for a JumpReLU SAE, ``threshold [d_sae]`` (``H`` the model's hidden
size), and this metadata besides the usual model keys (``file_header``):

- ``kind``: ``"sae"``; ``sae_layer``: the layer in our convention (the residual stream after block ``L``;
  the importers map SAELens' ``blocks.L.hook_resid_post`` and ``blocks.L+1.hook_resid_pre`` and sparsify's
  ``layers.L`` onto it);
- ``sae_activation``: ``relu``, ``jumprelu`` or ``topk``; ``sae_k``: ``k`` for ``topk``;
- ``sae_center``: ``"true"`` if the encoder reads ``x - b_dec`` (SAELens' ``apply_b_dec_to_input``,
  sparsify), ``"false"`` if it reads ``x`` (Gemma Scope);
- ``sae_source`` (optional): what it was imported from; ``sae_labels`` (optional): JSON ``{"<feature>": label}``.

A feature's pre-activation is ``(x - c * b_dec) @ W_enc[:, i] + b_enc[i]``; ``add`` steering with strength
``s`` adds ``s * W_dec[i]``, what raising the feature's activation by ``s`` adds to the reconstruction.
Validation (``check_sae``) refuses each failure with a 400 naming the field (``tensors.<name>``,
``metadata.<key>``). Tensors may be stored in any float dtype; they load as fp32. Serving reads only the
decoder rows a request names (``ArtifactStore.sae_rows``), never the whole dictionary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch

from steerserve.errors import SteerError
from steerserve.model_info import ModelInfo
from steerserve.store.db import ArtifactMeta
from steerserve.store.formats import file_header

SAE_KEYS = ("sae_layer", "sae_activation", "sae_k", "sae_center", "sae_source", "sae_labels")
ACTIVATIONS = ("relu", "jumprelu", "topk")
MAX_D_SAE = 1 << 20  # features: a bound on what a file may declare, far above the widths in use (16k-1M)


@dataclass(frozen=True, eq=False)
class Sae:
    """A checked dictionary (fp32)."""

    layer: int
    activation: str
    k: int | None
    center: bool
    w_enc: torch.Tensor  # [H, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    w_dec: torch.Tensor  # [d_sae, H]
    b_dec: torch.Tensor  # [H]
    threshold: torch.Tensor | None  # [d_sae], JumpReLU only
    labels: Mapping[int, str]

    @property
    def d_sae(self) -> int:
        return int(self.w_dec.shape[0])

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, H]`` states -> ``[T, d_sae]`` pre-activations."""
        return (x - self.b_dec if self.center else x) @ self.w_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, H]`` states -> ``[T, d_sae]`` feature activations."""
        pre = self.pre(x)
        if self.activation == "jumprelu":
            assert self.threshold is not None
            return pre * (pre > self.threshold)
        if self.activation == "topk":
            assert self.k is not None
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        return pre.relu()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"W_enc": self.w_enc, "b_enc": self.b_enc, "W_dec": self.w_dec, "b_dec": self.b_dec}
        return out if self.threshold is None else {**out, "threshold": self.threshold}


def sae_header(model: ModelInfo, sae: Sae, source: str = "", **extra: str) -> dict[str, str]:
    """The safetensors metadata of ``sae``'s file."""
    header = file_header(model, "sae", sae_layer=str(sae.layer), sae_activation=sae.activation,
                         sae_center="true" if sae.center else "false", **extra)
    if sae.k is not None:
        header["sae_k"] = str(sae.k)
    if source:
        header["sae_source"] = source
    if sae.labels:
        header["sae_labels"] = json.dumps({str(i): label for i, label in sorted(sae.labels.items())})
    return header


def _int(header: Mapping[str, str], key: str) -> int:
    value = header.get(key, "")
    if not (value.isascii() and value.isdigit()):
        raise SteerError(f"must be a non-negative integer, got {value!r}", field=f"metadata.{key}")
    return int(value)


def _tensor(loaded: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = loaded.get(name)
    if t is None:
        raise SteerError("is missing; a sae file holds W_enc, b_enc, W_dec, b_dec (and threshold for jumprelu)",
                         field=f"tensors.{name}")
    if not t.is_floating_point() or tuple(t.shape) != shape:
        raise SteerError(f"must be a float tensor of shape {list(shape)}, got {t.dtype} {list(t.shape)}",
                         field=f"tensors.{name}")
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise SteerError("holds a NaN or infinity (in float32)", field=f"tensors.{name}")
    return t


def check_sae(model: ModelInfo, header: Mapping[str, str], loaded: Mapping[str, torch.Tensor]) -> Sae:
    """``loaded`` and ``header`` as a ``Sae`` for ``model``; else a 400 naming the field."""
    layer = _int(header, "sae_layer")
    if layer >= model.num_layers:
        raise SteerError(f"layer {layer} is out of range [0, {model.num_layers - 1}]", field="metadata.sae_layer")
    activation = header.get("sae_activation", "")
    if activation not in ACTIVATIONS:
        raise SteerError(f"must be one of {list(ACTIVATIONS)}, got {activation!r}", field="metadata.sae_activation")
    center = header.get("sae_center", "")
    if center not in ("true", "false"):
        raise SteerError(f"must be 'true' or 'false', got {center!r}", field="metadata.sae_center")
    dec = loaded.get("W_dec")
    d_sae = int(dec.shape[0]) if dec is not None and dec.dim() == 2 else 0
    if not 1 <= d_sae <= MAX_D_SAE:
        raise SteerError(f"must be [d_sae, {model.hidden_size}] with 1 <= d_sae <= {MAX_D_SAE}", field="tensors.W_dec")
    h = model.hidden_size
    unknown = sorted(set(loaded) - {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"})
    if unknown:
        raise SteerError(f"unknown tensor(s) {unknown}", field=f"tensors.{unknown[0]}")
    k = None
    if activation == "topk":
        k = _int(header, "sae_k")
        if not 1 <= k <= d_sae:
            raise SteerError(f"must be in [1, {d_sae}], got {k}", field="metadata.sae_k")
    elif "sae_k" in header:
        raise SteerError("only a topk sae has k", field="metadata.sae_k")
    threshold = _tensor(loaded, "threshold", (d_sae,)) if activation == "jumprelu" else None
    if activation != "jumprelu" and "threshold" in loaded:
        raise SteerError("only a jumprelu sae has a threshold", field="tensors.threshold")
    return Sae(layer, activation, k, center == "true", _tensor(loaded, "W_enc", (h, d_sae)),
               _tensor(loaded, "b_enc", (d_sae,)), _tensor(loaded, "W_dec", (d_sae, h)), _tensor(loaded, "b_dec", (h,)),
               threshold, check_labels(header.get("sae_labels"), d_sae))


def check_labels(raw: str | None, d_sae: int) -> dict[int, str]:
    """``sae_labels`` (JSON ``{"<feature>": "<label>"}``) as a dict; else a 400 naming it."""
    if raw is None:
        return {}
    try:
        labels = json.loads(raw)
    except ValueError:
        labels = None
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and k.isdigit() and int(k) < d_sae and isinstance(v, str) for k, v in labels.items()):
        raise SteerError(f'must be JSON {{"<feature below {d_sae}>": "<label>"}}', field="metadata.sae_labels")
    return {int(k): v for k, v in labels.items()}


def feature_strengths(value: object, d_sae: int, max_strength: float, f: str) -> dict[int, float]:
    """A request's ``features`` (``{"<feature>": strength}``, 1 to 16 of them) checked against ``d_sae``."""
    if not isinstance(value, Mapping) or not 1 <= len(value) <= 16:
        raise SteerError('must be an object {"<feature index>": strength} with 1 to 16 entries', field=f)
    out: dict[int, float] = {}
    for key, s in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < d_sae):
            raise SteerError(f"must be a feature index below this sae's {d_sae}", field=f"{f}.{key}")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or abs(s) > max_strength:
            raise SteerError(f"must be a finite number with |strength| <= {max_strength:g}", field=f"{f}.{key}")
        out[int(key)] = float(s)
    return out


@dataclass(frozen=True)
class SaeFile:
    """A stored dictionary as serving reads it: its layer, width and encoder form from the manifest and the
    file's header, and the rows of the features a request names, read from the file one by one (``rows``,
    ``clamp_rows``), never the whole dictionary."""

    meta: ArtifactMeta
    path: Path
    layer: int
    d_sae: int
    activation: str = "relu"
    center: bool = True

    @classmethod
    def open(cls, meta: ArtifactMeta, path: Path) -> SaeFile:
        with safetensors.safe_open(str(path), framework="pt") as f:
            d_sae = int(f.get_slice("W_dec").get_shape()[0])
            header = f.metadata() or {}
        return cls(meta, path, meta.layers[0], d_sae, header.get("sae_activation", "relu"),
                   header.get("sae_center", "true") == "true")

    def rows(self, features: Sequence[int]) -> torch.Tensor:
        """``W_dec[features]`` as ``[n, H]`` fp32."""
        with safetensors.safe_open(str(self.path), framework="pt") as f:
            dec = f.get_slice("W_dec")
            return torch.stack([dec[i].to(torch.float32) for i in features])

    def clamp_rows(self, features: Sequence[int]) -> torch.Tensor:
        """What a clamp op reads per feature (``runtime.ops.clamp_delta``), ``[n, 3, H]`` fp32: the encoder
        direction ``W_enc[:, i]``, the decoder row ``W_dec[i]``, and ``[offset, threshold, 0, ...]`` with
        ``offset = b_enc[i] - W_enc[:, i] . b_dec`` for an encoder that reads ``x - b_dec`` (else ``b_enc[i]``)
        and ``threshold`` the JumpReLU threshold (0 otherwise: ReLU, and TopK read as ReLU)."""
        with safetensors.safe_open(str(self.path), framework="pt") as f:
            enc, dec, b_enc = f.get_slice("W_enc"), f.get_slice("W_dec"), f.get_slice("b_enc")
            b_dec = f.get_tensor("b_dec").to(torch.float32)  # [H]
            thr = f.get_slice("threshold") if self.activation == "jumprelu" else None
            out = torch.zeros(len(features), 3, b_dec.shape[0])
            for j, i in enumerate(features):
                e = enc[:, i : i + 1].to(torch.float32)[:, 0]  # [H]: one column of [H, d_sae]
                offset = b_enc[i : i + 1].to(torch.float32)[0] - (e @ b_dec if self.center else 0.0)
                out[j, 0], out[j, 1] = e, dec[i].to(torch.float32)
                out[j, 2, 0] = offset
                out[j, 2, 1] = thr[i : i + 1].to(torch.float32)[0] if thr is not None else 0.0
            return out
