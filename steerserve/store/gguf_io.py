"""GGUF control vectors, the format llama.cpp loads (``--control-vector``) and repeng writes (``export_gguf``).

The file: ``general.architecture = "controlvector"``, the keys ``controlvector.model_hint`` (the model
family, e.g. ``"llama"``) and ``controlvector.layer_count``, and one 1-D F32 tensor ``direction.<L>`` of
``[n_embd]`` per steered layer. llama.cpp reads the tensors only (its loader ignores the metadata), sums
``strength x direction.<L>`` into the residual stream right after decoder block ``L`` (0-based) finishes,
at every position, and refuses a file that holds ``direction.0`` (it can only ever steer blocks 1..n-1).
repeng's keys are the same 0-based block index: its direction for layer ``L`` is learnt from
``hidden_states[L + 1]`` and applied to the output of ``model.layers[L]``.

**Layer mapping**: ``direction.<L>`` is steerserve layer ``L`` (``model_info.LAYER_CONVENTION``: the output
of decoder block ``L`` = transformers ``hidden_states[L + 1]``), with no offset either way, and a
direction at strength ``s`` is steerserve's ``add`` at ``coeff = s``. We read ``direction.0`` too (its
meaning is unambiguous) but ``formats`` will not write one unless asked, since llama.cpp would refuse the
whole file.

steerserve's own metadata travels as string keys ``steerserve.<key>`` (``formats.describe``), which other
tools ignore. Nothing here knows the model or the store: ``formats`` checks what this module reads.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from steerserve.errors import SteerError

MAGIC = b"GGUF"  # a GGUF file's first four bytes (safetensors starts with a little-endian header length)
ARCH = "controlvector"
KEY_PREFIX = "steerserve."  # our metadata's namespace inside the file
_TENSOR_RE = re.compile(r"direction\.(0|[1-9][0-9]*)")  # no leading zeros: "direction.01" would alias 1
_DTYPES = {int(gguf.GGMLQuantizationType.F32): torch.float32, int(gguf.GGMLQuantizationType.F16): torch.float16}


@dataclass(frozen=True)
class ControlVectorFile:
    """What a GGUF control vector holds: ``layer -> [n_embd]`` tensors (F32 or F16 as stored) and its
    key/value metadata as strings (``steerserve.*`` keys with the prefix removed in ``steerserve``)."""

    tensors: dict[int, torch.Tensor]
    model_hint: str | None
    layer_count: int | None
    steerserve: dict[str, str]  # our own keys, prefix removed
    other: dict[str, str]  # every other key (``general.*``, ``controlvector.*``...), shown in provenance


def is_gguf(data: bytes) -> bool:
    return data[:4] == MAGIC


def read(data: bytes) -> ControlVectorFile:
    """Parse GGUF bytes; a file that is not a readable control vector is a 400 naming ``file`` or the tensor
    (``tensors.direction.<L>``)."""
    with tempfile.TemporaryDirectory(prefix="steerserve-gguf-") as tmp:
        path = Path(tmp) / "upload.gguf"
        path.write_bytes(data)  # the library reads through a memory map of a file
        try:
            fields, raw = _parse(path)
        except Exception as e:  # truncated or garbled files fail in many untyped ways; all mean a bad file
            raise SteerError(f"not a valid GGUF file: {type(e).__name__}: {e}", field="file") from None
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise SteerError(f"general.architecture is {arch!r}; a control vector has {ARCH!r}",
                         field="metadata.general.architecture")
    tensors: dict[int, torch.Tensor] = {}
    for name, qtype, shape, array in raw:
        f = f"tensors.{name}"
        m = _TENSOR_RE.fullmatch(name)
        if m is None:
            raise SteerError(f"tensor {name!r} must be named 'direction.<L>' (0-based decoder block)", field=f)
        if qtype not in _DTYPES:
            raise SteerError(f"has type {gguf.GGMLQuantizationType(qtype).name}; a direction is F32 (or F16)", field=f)
        if len(shape) != 1:
            raise SteerError(f"has shape {shape}; a direction is 1-D [n_embd]", field=f)
        tensors[int(m[1])] = torch.from_numpy(array.reshape(-1)).to(_DTYPES[qtype])
    if not tensors:
        raise SteerError("holds no direction.<L> tensor", field="file")
    ours = {k.removeprefix(KEY_PREFIX): str(v) for k, v in fields.items() if k.startswith(KEY_PREFIX)}
    other = {k: str(v) for k, v in fields.items() if not k.startswith(KEY_PREFIX)}
    hint, count = fields.get(f"{ARCH}.model_hint"), fields.get(f"{ARCH}.layer_count")
    return ControlVectorFile(tensors, hint if isinstance(hint, str) else None,
                             count if isinstance(count, int) else None, ours, other)


def _parse(path: Path) -> tuple[dict[str, object], list[tuple[str, int, list[int], np.ndarray]]]:
    """(key/value fields, [(name, type, shape, data copy)]); the reader's memory map ends with this call."""
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    raw = [(t.name, int(t.tensor_type), [int(x) for x in t.shape], np.array(t.data, copy=True))
           for t in reader.tensors]
    return fields, raw


def write(path: Path, tensors: Mapping[int, torch.Tensor], model_hint: str, metadata: Mapping[str, str]) -> None:
    """``tensors`` (layer -> ``[n_embd]``, written as F32: all llama.cpp loads) as a control vector at
    ``path``, with ``metadata`` under ``steerserve.<key>``; atomically (a crash leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(tensors))  # as repeng writes it: the directions held
        for key, value in metadata.items():
            writer.add_string(KEY_PREFIX + key, value)
        for layer in sorted(tensors):
            writer.add_tensor(f"direction.{layer}", tensors[layer].detach().to(torch.float32).contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_bytes(tensors: Mapping[int, torch.Tensor], model_hint: str, metadata: Mapping[str, str]) -> bytes:
    """``write``'s file as bytes."""
    with tempfile.TemporaryDirectory(prefix="steerserve-gguf-") as tmp:
        path = Path(tmp) / "out.gguf"
        write(path, tensors, model_hint, metadata)
        return path.read_bytes()
