"""A JSON vector upload read as a stream (``POST /admin/vectors`` with ``application/json``).

``{"name": ..., "description": ..., "vectors": {"<layer>": [hidden_size floats], ...}}`` may be 64 MiB. Parsed
whole, such a body holds the interpreter for seconds (the event loop stalls: ``/health`` with it) and
turns into hundreds of MB of Python floats before its shape can be checked. Here ijson's C parser reads it
in 64 KiB chunks in a worker thread, the thread lets the event loop run between chunks, the floats go
straight into one preallocated array per layer, and a wrong shape is refused at the value where it goes
wrong: a layer the model does not have, or more values than the hidden size.

The route reads bodies over 1 MiB this way (a smaller one is parsed whole, in well under 100 ms, with the
same validation as every other route). Anything this reader does not expect (a malformed document, an
unknown key, a value of the wrong type, an escaped UTF-16 surrogate, which yajl would turn into "?") raises
``Unexpected``, refused with the parser's message.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import ijson
import numpy as np

from steerserve.errors import SteerError

CHUNK = 1 << 16
_LAYER_KEY = re.compile(r"0|[1-9][0-9]*")
# A \uD800-\uDFFF escape: yajl turns a lone one into "?" silently, so such a body takes the exact parser.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class Unexpected(Exception):
    """The body is not a well-formed upload of the expected shape; ``str()`` says where."""


@dataclass(frozen=True)
class JsonUpload:
    name: str
    description: str
    vectors: dict[int, np.ndarray]  # layer -> [hidden] float64


class _Yielding:
    """A file over ``data`` whose every read first gives the interpreter to other threads (the event loop)."""

    def __init__(self, data: bytes) -> None:
        self._view, self._pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        time.sleep(0)  # a GIL hand-off: the loop thread runs between chunks
        n = CHUNK if n < 0 else min(n, CHUNK)
        chunk = bytes(self._view[self._pos:self._pos + n])
        self._pos += len(chunk)
        return chunk


def read_upload(data: bytes, hidden: int, num_layers: int) -> JsonUpload:
    """The upload in ``data``; ``SteerError`` naming ``vectors.<layer>`` for a shape the model cannot take,
    ``Unexpected`` for anything else out of place."""
    if _SURROGATE_ESCAPE.search(data):
        raise Unexpected("the body escapes UTF-16 surrogates")
    texts: dict[str, str] = {}
    vectors: dict[int, np.ndarray] = {}
    layer, filled = -1, 0
    row = np.empty(0)
    try:
        for prefix, event, value in ijson.parse(_Yielding(data), use_float=True):
            if prefix.startswith("vectors.") and prefix.endswith(".item"):
                if event != "number":
                    raise Unexpected(f"{prefix.removesuffix('.item')}: must be a list of numbers")
                if filled == hidden:
                    raise SteerError(f"has more than {hidden} values; the model's hidden size is {hidden}",
                                     field=f"vectors.{layer}")
                row[filled] = value
                filled += 1
            elif prefix == "vectors" and event == "map_key":
                if not _LAYER_KEY.fullmatch(value):
                    raise Unexpected(f"vectors: key {value!r} is not a layer index")
                layer = int(value)
                if layer >= num_layers:
                    raise SteerError(f"layer {layer} is out of range [0, {num_layers - 1}]", field=f"vectors.{layer}")
                if layer in vectors:
                    raise SteerError("is given twice", field=f"vectors.{layer}")
                row, filled = np.empty(hidden), 0
            elif prefix == f"vectors.{layer}" and event in ("start_array", "end_array"):
                if event == "end_array":
                    if filled != hidden:
                        raise SteerError(f"has {filled} values; the model's hidden size is {hidden}",
                                         field=f"vectors.{layer}")
                    vectors[layer] = row
            elif prefix == "" and event in ("start_map", "end_map", "map_key"):
                if event == "map_key" and value not in ("name", "description", "vectors"):
                    raise Unexpected(f"{value}: unknown field")
            elif prefix in ("name", "description") and event == "string":
                texts[prefix] = value
            elif not (prefix == "vectors" and event in ("start_map", "end_map")):
                raise Unexpected(f"{prefix or 'body'}: unexpected {event}")
    except ijson.JSONError as exc:
        raise Unexpected(f"not valid JSON: {exc}") from None
    if "name" not in texts or not vectors:
        raise Unexpected("name and a non-empty vectors object are required")
    return JsonUpload(texts["name"], texts.get("description", ""), vectors)
