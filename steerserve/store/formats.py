"""Steering vectors in the formats people already have: steerserve safetensors and llama.cpp / repeng GGUF
control vectors (``gguf_io``), each carrying metadata that says what the numbers mean.

Self-describing metadata (``describe``; safetensors ``__metadata__``, or GGUF keys ``steerserve.<key>``):

- ``kind``, ``model_fingerprint``, ``model_name``, ``model_architecture``, ``hidden_size``, ``num_layers``:
  which model the vector was made for (``model.model_info``'s fingerprint: architecture, shapes and a sample
  of the embedding weights);
- ``layer_convention``: what layer ``l`` is (``model_info.LAYER_CONVENTION``), ``hook_site``: where the
  vector enters the forward pass (``HOOK_SITE``);
- ``method``: how it was made (``mean_diff``, ``asc``, ``upload``, ``gguf``...);
- ``dtype``: the tensors' dtype as stored (GGUF always holds F32: a float16 vector is widened exactly, and
  narrowed back on import when ``dtype`` says so and no bit is lost);
- ``scale_semantics``: what ``coeff`` multiplies (``SCALE_SEMANTICS``; for llama.cpp, its ``strength``).

Import (``from_gguf``) turns a control vector into the steerserve safetensors file the store keeps, so every
check an upload gets (``uploads.read_upload``: the model's shapes and fingerprint, the norm policy, the KL
vetting) runs on it unchanged. A file for another model is refused naming the field (``hidden_size``,
``model_fingerprint``, ``metadata.hook_site``, ...). Export (``export_bytes``) writes either format;
``export_artifact`` exports a stored artifact by reference, for ``steerserve vectors export`` and ``GET
/admin/vectors/{name}/export`` alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Protocol

import safetensors.torch
import torch

from steerserve.errors import NotFound, SteerError
from steerserve.model_info import LAYER_CONVENTION, ModelInfo
from steerserve.store import gguf_io
from steerserve.store.db import ArtifactMeta, header_metadata

FORMATS = ("safetensors", "gguf")
EXPORT_KINDS = ("vector", "direction")  # the steering kinds, what a control vector can hold
HOOK_SITE = "residual stream after decoder block l (resid_post), at every position the request selects"
SCALE_SEMANTICS = {
    "vector": "h_l[t] += coeff * v_l: the tensors are the added vector at coeff 1 (llama.cpp strength = coeff)",
    "direction": "h_l[t] += coeff * scale * u_l: the tensor is the unit vector u_l and scale (metadata) a typical "
                 "state's norm at layer l (llama.cpp strength = coeff * scale)",
}
# Keys ``describe`` adds to ``artifacts.file_header``'s; ``uploads`` accepts them and checks the first two.
DESCRIPTIVE_KEYS = ("hook_site", "model_architecture", "dtype", "scale_semantics")
_NARROW = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def file_header(model: ModelInfo, kind: str, **extra: str) -> dict[str, str]:
    """The safetensors metadata every artifact file carries (the store's own and offline tools' files)."""
    return {"kind": kind, "model_fingerprint": model.fingerprint, "model_name": model.name,
            "hidden_size": str(model.hidden_size), "num_layers": str(model.num_layers),
            "layer_convention": LAYER_CONVENTION, **extra}



def model_hint(model: ModelInfo) -> str:
    """GGUF's ``controlvector.model_hint``: the family, as repeng writes transformers' ``model_type``
    (``LlamaForCausalLM`` -> ``llama``). llama.cpp does not read it."""
    return model.architecture.removesuffix("ForCausalLM").lower() or "unknown"


def dtype_name(tensors: Mapping[int, torch.Tensor]) -> str:
    """The tensors' dtype (``float32``...), or the distinct ones comma-separated."""
    return ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}))


def describe(model: ModelInfo, kind: str, header: Mapping[str, str],
             tensors: Mapping[int, torch.Tensor]) -> dict[str, str]:
    """``header`` completed with every self-describing key (see the module docstring); what the file already
    says wins, except ``dtype``, which is measured."""
    base = {"kind": kind, "model_fingerprint": model.fingerprint, "model_name": model.name,
            "model_architecture": model.architecture, "hidden_size": str(model.hidden_size),
            "num_layers": str(model.num_layers), "layer_convention": LAYER_CONVENTION, "hook_site": HOOK_SITE,
            "method": "upload"}
    if kind in SCALE_SEMANTICS:
        base["scale_semantics"] = SCALE_SEMANTICS[kind]
    return {**base, **header, "dtype": dtype_name(tensors)}


def from_gguf(model: ModelInfo, data: bytes) -> tuple[bytes, dict[str, Any]]:
    """A GGUF control vector as the steerserve safetensors bytes the store keeps, and what to record of the
    source (format, sha256, its other keys). ``direction.<L>`` becomes ``layer.<L>`` (``gguf_io``: the same
    block). A bad file is a 400 naming ``file``, the tensor or the metadata key; the model checks are
    ``uploads.read_upload``'s, run by the store on the result (a plain repeng file's n_embd is its declared
    ``hidden_size``)."""
    cv = gguf_io.read(data)
    header = dict(cv.steerserve)
    widths = {int(t.shape[0]) for t in cv.tensors.values()}
    if "hidden_size" not in header and len(widths) == 1:
        header["hidden_size"] = str(widths.pop())
    tensors = dict(cv.tensors)
    narrow = _NARROW.get(header.get("dtype", ""))
    if narrow is not None:  # our own float16/bfloat16 export, widened to F32 for llama.cpp: narrow it back
        back = {k: t.to(narrow) for k, t in tensors.items()}
        if all(torch.equal(b.to(t.dtype), t) for b, t in zip(back.values(), tensors.values(), strict=True)):
            tensors = back
    header.setdefault("method", "gguf")
    header = describe(model, header.get("kind", "vector"), header, tensors)
    out = safetensors.torch.save({f"layer.{k}": t.contiguous() for k, t in sorted(tensors.items())},
                                 metadata=header)
    source = {"format": "gguf control vector", "sha256": hashlib.sha256(data).hexdigest(),
              "model_hint": cv.model_hint, "layer_count": cv.layer_count, "metadata": cv.other}
    return out, source


def gguf_field(field: str | None) -> str | None:
    """A refusal's field for a GGUF upload: its tensors are ``direction.<L>``, not ``layer.<L>``."""
    if field is not None and field.startswith("tensors.layer."):
        return "tensors.direction." + field.removeprefix("tensors.layer.")
    return field


def export_bytes(model: ModelInfo, kind: str, header: Mapping[str, str], tensors: Mapping[int, torch.Tensor],
                 fmt: str, *, drop_layer_0: bool = False) -> bytes:
    """A stored artifact (its file's ``header`` and ``tensors`` as stored) as a file in ``fmt``, with every
    self-describing key. Vectors and directions only; GGUF takes a layer 0 only dropped (``drop_layer_0``):
    llama.cpp refuses a file that has one, so the refusal names ``layers``."""
    if fmt not in FORMATS:
        raise SteerError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}", field="format")
    if kind not in EXPORT_KINDS:
        raise SteerError(f"a {kind} is not a steering vector; only {list(EXPORT_KINDS)} export", field="name")
    full = describe(model, kind, header, tensors)
    if fmt == "safetensors":
        data: bytes = safetensors.torch.save({f"layer.{k}": t.contiguous() for k, t in sorted(tensors.items())},
                                             metadata=full)
        return data
    kept = dict(tensors)
    if 0 in kept:
        if not drop_layer_0:
            raise SteerError("the vector has layer 0, which llama.cpp refuses in a control vector (it can steer "
                             "blocks 1..n-1 only); drop it (--drop-layer-0) or export safetensors", field="layers")
        del kept[0]
        if not kept:
            raise SteerError("holds layer 0 only: nothing is left for a control vector", field="layers")
    return gguf_io.to_bytes(kept, model_hint(model), full)



class Exporting(Protocol):
    """What ``export_artifact`` reads of an ``artifacts.ArtifactStore`` (which imports this module)."""

    model: ModelInfo

    def get(self, ref: str) -> ArtifactMeta: ...

    def file_bytes(self, ref: str, kind: str) -> tuple[ArtifactMeta, bytes]: ...


def export_artifact(store: Exporting, ref: str, fmt: str, *,
                    drop_layer_0: bool = False) -> tuple[ArtifactMeta, bytes]:
    """The artifact ``ref`` (``name``: the latest version, or ``name@v``) as a file in ``fmt``: what ``steerserve
    vectors export`` writes and ``GET /admin/vectors/{name}/export`` returns.

    ``safetensors``: the stored bytes; a vector's or direction's metadata completed with every self-describing
    key first (the tensors untouched) where the stored file lacks one. ``gguf``: the llama.cpp control vector
    (``export_bytes``), vectors and directions only. An unknown name is a 404 naming ``name``; a pair (prompts,
    no tensors) a 400 naming ``name``; another kind as GGUF a 400 naming ``format``."""
    if fmt not in FORMATS:
        raise SteerError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}", field="format")
    try:
        meta = store.get(ref)
    except SteerError as exc:
        if exc.code == "unknown_artifact":
            raise NotFound(exc.message, field="name") from None
        raise
    if meta.kind == "pair":
        raise SteerError(f"{meta.ref()!r} is a pair (ActAdd prompts, no tensors): it has no file to export",
                         field="name")
    if fmt == "gguf" and meta.kind not in EXPORT_KINDS:
        raise SteerError(f"{meta.ref()!r} is a {meta.kind}, which has no GGUF form (only {list(EXPORT_KINDS)} "
                         "convert to a control vector): export it as safetensors", field="format")
    meta, data = store.file_bytes(meta.ref(), meta.kind)
    if meta.kind not in EXPORT_KINDS:
        return meta, data
    header = header_metadata(data)
    tensors = {int(k.split(".", 1)[1]): t for k, t in safetensors.torch.load(data).items()}
    if fmt == "safetensors" and describe(store.model, meta.kind, header, tensors) == header:
        return meta, data  # already self-describing: the stored bytes as they are
    return meta, export_bytes(store.model, meta.kind, header, tensors, fmt, drop_layer_0=drop_layer_0)
