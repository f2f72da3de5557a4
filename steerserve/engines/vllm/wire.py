"""Per-request steering on the wire: ``SamplingParams(extra_args={"steerserve": ...})``.

vLLM carries ``SamplingParams.extra_args`` from the front end to the model runner's per-request state
(``NewRequestData.sampling_params`` -> ``CachedRequestState.sampling_params``); across processes it is
MessagePack-encoded, so the payload holds only str/int/float/bool/None/bytes/lists/dicts:

    {"v": 5,
     "ops": [[kind, layer, key, scale, start, stop, positional, gain], ...],
     "vectors": {key: [rows, hidden, <float32 little-endian bytes>]},
     "loop": {LoopSpec field: value} | None,               # closed loop (runtime.loop.LoopSpec)
     "controller": [slot, key] | None,                     # refusal controller, loaded in that slot
     "probes": [slot, key] | None, "head": [slot, key] | None,  # SafeSwitch probes / refusal head
     "capture": bool,                                      # a capture request (runtime.capture)
     "logprobs": bool}                                     # keep the first next-token log-softmax

A controller's weights (~10 MB) do not travel with each request: the front end loads them into a worker
slot once (``steerserve_load`` with ``encode_weights``; probes and heads alike) and requests name the slot and the
weights' key, which the worker checks.

Vectors are keyed by content hash (``VectorRef.key``), so 30 layers of one spec cost 30 x H x 4 bytes
and identical vectors are sent once per request. The worker rebuilds ``SteerOp``s with the same keys,
so its ``VectorBank`` shares rows between requests exactly as the hf engine does.

``cache_salt`` isolates vLLM's prefix cache by spec: a steered prompt's KV must never be reused by a
request with other (or no) steering.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from steerserve.runtime.controller import ControllerWeights
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.safeswitch import HeadDelta, Probe, ProbePair

EXTRA_KEY = "steerserve"
WIRE_VERSION = 5


@dataclass(frozen=True)
class Wired:
    """What one request asks of the worker."""

    ops: tuple[SteerOp, ...] = ()
    loop: LoopSpec | None = None
    capture: bool = False
    controller: tuple[int, str] | None = None  # (worker slot, weights key)
    probes: tuple[int, str] | None = None
    head: tuple[int, str] | None = None
    logprobs: bool = False  # the worker keeps the request's first next-token log-softmax for the front end

    @property
    def needs_cell(self) -> bool:
        """As ``GenerationRequest.needs_cell``: a register cell for a closed loop, a controller or probes."""
        return self.loop is not None or self.controller is not None or self.probes is not None


Slotted = tuple[int, str] | None  # (worker slot, weights key) of weights loaded ahead of the request


def encode_ops(ops: Sequence[SteerOp], loop: LoopSpec | None = None, capture: bool = False,
               controller: Slotted = None, probes: Slotted = None, head: Slotted = None,
               logprobs: bool = False) -> dict[str, Any]:
    """The ``extra_args["steerserve"]`` payload for ``ops`` (and a closed loop, or a capture request)."""
    vectors: dict[str, list[Any]] = {}
    rows: list[list[Any]] = []
    for op in ops:
        ref = op.vector
        if ref.key not in vectors:
            data = ref.data.to(torch.float32).contiguous().numpy().astype("<f4", copy=False)
            vectors[ref.key] = [int(data.shape[0]), int(data.shape[1]), data.tobytes()]
        rows.append([op.kind.value, op.layer, ref.key, float(op.scale), op.start, op.stop, op.positional, op.gain])
    return {"v": WIRE_VERSION, "ops": rows, "vectors": vectors,
            "loop": None if loop is None else {**asdict(loop), "options": list(loop.options)},
            "controller": None if controller is None else list(controller), "capture": capture,
            "probes": None if probes is None else list(probes), "head": None if head is None else list(head),
            "logprobs": logprobs}


def decode_ops(payload: Mapping[str, Any] | None) -> Wired:
    """Inverse of ``encode_ops``; checks every vector's content against its key."""
    if not payload:
        return Wired()
    if payload.get("v") != WIRE_VERSION:
        raise ValueError(f"unsupported steerserve wire version {payload.get('v')!r}")
    refs: dict[str, VectorRef] = {}
    for key, (n, hidden, raw) in payload["vectors"].items():
        data = torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(n, hidden).copy())  # [n, H]
        ref = VectorRef.of(data)
        if ref.key != key:
            raise ValueError(f"vector content does not match its key {key}")
        refs[key] = ref
    ops = tuple(
        SteerOp(OpKind(kind), int(layer), refs[key], float(scale), int(start),
                None if stop is None else int(stop), bool(positional), bool(gain))
        for kind, layer, key, scale, start, stop, positional, gain in payload["ops"]
    )
    raw_loop = payload.get("loop")
    loop = None
    if raw_loop is not None:
        numbers = {k: float(v) for k, v in raw_loop.items() if k != "options"}
        loop = LoopSpec(**numbers, options=tuple(int(t) for t in raw_loop.get("options", ())))
    def slotted(key: str) -> Slotted:
        raw = payload.get(key)
        return None if raw is None else (int(raw[0]), str(raw[1]))

    return Wired(ops, loop, bool(payload.get("capture")), slotted("controller"), slotted("probes"), slotted("head"),
                 bool(payload.get("logprobs")))


_CONTROLLER_TENSORS = ("w1", "b1", "w2", "b2", "direction", "scales")
_PROBE_TENSORS = ("w1", "b1", "w2", "b2")


def _pack(t: torch.Tensor) -> list[Any]:
    a = t.to(torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return [list(a.shape), a.tobytes()]


def _unpack(raw: Sequence[Any]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(raw[1], dtype="<f4").reshape(raw[0]).copy())


Weights = ControllerWeights | ProbePair | HeadDelta


def encode_weights(weights: Weights) -> dict[str, Any]:
    """Weights loaded into a worker slot ahead of the requests that name them, as MessagePack-able data
    (fp32 little-endian bytes with shapes): a controller, a SafeSwitch probe pair or a refusal head."""
    if isinstance(weights, ControllerWeights):
        return {"kind": "controller", "read_layers": list(weights.read_layers),
                **{n: _pack(getattr(weights, n)) for n in _CONTROLLER_TENSORS}}
    if isinstance(weights, ProbePair):
        return {"kind": "probes", **{f"{s}.{n}": _pack(getattr(getattr(weights, s), n))
                                     for s in ("stage1", "stage2") for n in _PROBE_TENSORS}}
    return {"kind": "head", "a": _pack(weights.a), "b": _pack(weights.b)}


def decode_weights(payload: Mapping[str, Any]) -> Weights:
    """Inverse of ``encode_weights``."""
    kind = payload["kind"]
    if kind == "controller":
        return ControllerWeights(read_layers=tuple(int(x) for x in payload["read_layers"]),
                                 **{n: _unpack(payload[n]) for n in _CONTROLLER_TENSORS})
    if kind == "probes":
        s1, s2 = (Probe(**{n: _unpack(payload[f"{s}.{n}"]) for n in _PROBE_TENSORS}) for s in ("stage1", "stage2"))
        return ProbePair(s1, s2)
    return HeadDelta(_unpack(payload["a"]), _unpack(payload["b"]))


def from_extra_args(extra_args: Mapping[str, Any] | None) -> Wired:
    return decode_ops((extra_args or {}).get(EXTRA_KEY))


def cache_salt(ops: Sequence[SteerOp], loop: LoopSpec | None = None, controller: str | None = None) -> str | None:
    """A prefix-cache salt that differs between specs (None for unsteered: share with plain traffic).

    Coarse on purpose: blocks wholly before every op's ``start`` could be shared, but a salt applies to
    the whole prompt; correctness first.
    """
    if not ops:
        return None
    h = hashlib.sha256(repr((loop, controller)).encode())
    for op in ops:
        h.update(repr((op.kind.value, op.layer, op.vector.key, float(op.scale), op.start, op.stop,
                       op.positional, op.gain)).encode())
    return "steerserve-" + h.hexdigest()[:32]
