"""The SafeSwitch artifacts (``runtime.safeswitch``): ``probe`` (the two stage probes) and ``head`` (the
refusal head's low-rank delta).

A ``probe`` file is a safetensors file with exactly the tensors ``stage<k>.w1 [D, H]``, ``stage<k>.b1 [D]``,
``stage<k>.w2 [2, D]``, ``stage<k>.b2 [2]`` for ``k`` = 1 (intent, last prompt token) and 2 (compliance,
after the pilot tokens), ``H`` the model's hidden size (input standardisation folded into ``w1``/``b1``),
and this metadata besides the usual model keys (``file_header``):

- ``kind``: ``"probe"``;
- ``pilot_tokens``: the greedy pilot tokens stage 2 was trained after; must be ``PILOT_TOKENS`` (the
  runtime holds back exactly that many);
- ``threshold``: the default decision threshold on ``p`` (in ``(0, 1)``; both stages fire at ``p >= t``);
- ``val_metrics`` (optional): JSON object, the validation figures (F1, accuracy per stage and combined);
- ``provenance``: JSON, the exact command and data rows.

A ``head`` file holds exactly ``a [r, H]`` and ``b [V, r]`` (``V`` the model's vocabulary size), the delta
``logits = h W^T + (h a^T) b^T`` on the model's output head ``W``, with this metadata:

- ``kind``: ``"head"``; ``rank``: ``r`` again (``1 <= r <= H``); ``base``: the head the delta applies to,
  ``"tied_embeddings"`` (the input embeddings, on a model that ties them) or ``"lm_head"``;
- ``vocab_size`` (optional): ``V`` again; ``val_refusal_rate`` (optional): in ``[0, 1]``, the share of
  harmful validation prompts whose greedy reply with the head refuses;
- ``provenance``: JSON, the exact command and data rows.

Validation (``check_probes``, ``check_head``) refuses each failure with a 400 naming the field:
``tensors`` (a missing or unknown tensor), ``tensors.<name>`` (not floating point, wrong shape, a NaN or
infinity in float32) and ``metadata.<key>`` (missing or malformed). The model keys (``hidden_size``,
``num_layers``, ``model_fingerprint``) are the store's common checks, run first. Tensors may be stored in
any float dtype (fp16 keeps the head file small); they load as fp32.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from steerserve.errors import SteerError
from steerserve.model_info import ModelInfo
from steerserve.runtime.safeswitch import PILOT_TOKENS, HeadDelta, Probe
from steerserve.store.formats import file_header
from steerserve.store.vetting import metadata_number

PROBE_TENSORS = tuple(f"stage{k}.{p}" for k in (1, 2) for p in ("w1", "b1", "w2", "b2"))
HEAD_TENSORS = ("a", "b")
HEAD_BASES = ("tied_embeddings", "lm_head")
# Metadata keys that only a probe / only a head carries.
PROBE_KEYS = ("pilot_tokens", "threshold", "val_metrics")
HEAD_KEYS = ("rank", "base", "vocab_size", "val_refusal_rate")


def probe_header(model: ModelInfo, threshold: float, val_metrics: Mapping[str, Any] | None = None,
                 **extra: str) -> dict[str, str]:
    """The safetensors metadata of a probe file (``extra``: provenance, description, method...)."""

    header = file_header(model, "probe", pilot_tokens=str(PILOT_TOKENS), threshold=repr(float(threshold)), **extra)
    if val_metrics is not None:
        header["val_metrics"] = json.dumps(dict(val_metrics), allow_nan=False)
    return header


def head_header(model: ModelInfo, rank: int, base: str, val_refusal_rate: float | None = None,
                **extra: str) -> dict[str, str]:
    """The safetensors metadata of a head file (``extra``: provenance, description, method...)."""

    header = file_header(model, "head", rank=str(rank), base=base, vocab_size=str(model.vocab_size), **extra)
    if val_refusal_rate is not None:
        header["val_refusal_rate"] = repr(float(val_refusal_rate))
    return header


def probe_tensors(stage1: Probe, stage2: Probe) -> dict[str, torch.Tensor]:
    """The probe file's tensors (as ``check_probes`` wants them), fp32."""
    return {f"stage{k}.{p}": getattr(probe, p).float().contiguous()
            for k, probe in ((1, stage1), (2, stage2)) for p in ("w1", "b1", "w2", "b2")}


def check_probes(model: ModelInfo, header: Mapping[str, str],
                 tensors: Mapping[str, torch.Tensor]) -> tuple[Probe, Probe, float]:
    """``(stage 1, stage 2, threshold)`` (fp32) if every check passes; else a 400 naming the field."""
    t = _exact(tensors, PROBE_TENSORS, "probe")
    probes = []
    for k in (1, 2):
        w1 = t[f"stage{k}.w1"]
        d = w1.shape[0] if w1.dim() == 2 and w1.shape[0] >= 1 else -1
        want = {"w1": (d, model.hidden_size), "b1": (d,), "w2": (2, d), "b2": (2,)}
        for p, shape in want.items():
            if tuple(t[f"stage{k}.{p}"].shape) != shape or d < 1:
                raise SteerError(f"shape {list(t[f'stage{k}.{p}'].shape)} should be {list(shape)} (D >= 1, H = the "
                                 f"model's hidden size {model.hidden_size})", field=f"tensors.stage{k}.{p}")
        probes.append(Probe(*(t[f"stage{k}.{p}"] for p in ("w1", "b1", "w2", "b2"))))
    if header.get("pilot_tokens") != str(PILOT_TOKENS):
        raise SteerError(f"must be {PILOT_TOKENS} (the runtime reads stage 2 after {PILOT_TOKENS} greedy pilot "
                         f"tokens), got {header.get('pilot_tokens')!r}", field="metadata.pilot_tokens")
    threshold = metadata_number(header, "threshold")
    if not 0.0 < threshold < 1.0:
        raise SteerError(f"must be a probability in (0, 1), got {header.get('threshold')!r}",
                         field="metadata.threshold")
    _json_object(header, "val_metrics")
    return probes[0], probes[1], threshold


def check_head(model: ModelInfo, header: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> HeadDelta:
    """The refusal head's delta (fp32) if every check passes; else a 400 naming the field."""
    t = _exact(tensors, HEAD_TENSORS, "head")
    h, v = model.hidden_size, model.vocab_size
    a, b = t["a"], t["b"]
    if a.dim() != 2 or a.shape[1] != h or not 1 <= a.shape[0] <= h:
        raise SteerError(f"shape {list(a.shape)} should be [r, {h}] with 1 <= r <= {h} (the model's hidden size)",
                         field="tensors.a")
    r = a.shape[0]
    if tuple(b.shape) != (v, r):
        raise SteerError(f"shape {list(b.shape)} should be [{v}, {r}] (the model's vocabulary size, a's rank)",
                         field="tensors.b")
    if header.get("rank") != str(r):
        raise SteerError(f"must be the delta's rank {r}, got {header.get('rank')!r}", field="metadata.rank")
    if header.get("base") not in HEAD_BASES:
        raise SteerError(f"must be one of {list(HEAD_BASES)}, got {header.get('base')!r}", field="metadata.base")
    if "vocab_size" in header and header["vocab_size"] != str(v):
        raise SteerError(f"{header['vocab_size']!r} does not match the loaded model's {v}", field="metadata.vocab_size")
    if "val_refusal_rate" in header and not 0.0 <= metadata_number(header, "val_refusal_rate") <= 1.0:
        raise SteerError("must be a rate in [0, 1]", field="metadata.val_refusal_rate")
    return HeadDelta(a, b)


def _exact(tensors: Mapping[str, torch.Tensor], names: tuple[str, ...], kind: str) -> dict[str, torch.Tensor]:
    """The named tensors as contiguous fp32, checked finite; exactly ``names``, no more."""
    missing = [n for n in names if n not in tensors]
    unknown = sorted(set(tensors) - set(names))
    if missing or unknown:
        raise SteerError(f"a {kind} holds exactly the tensors {list(names)}; missing {missing}, unknown {unknown}",
                         field="tensors")
    out = {}
    for n in names:
        x = tensors[n]
        if not x.is_floating_point():
            raise SteerError(f"must be floating point, got {x.dtype}", field=f"tensors.{n}")
        x = x.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(x).all()):  # after the cast: a finite float64 can overflow float32
            raise SteerError(f"contains {int((~torch.isfinite(x)).sum())} NaN or infinite value(s) (in float32)",
                             field=f"tensors.{n}")
        out[n] = x
    return out


def _json_object(header: Mapping[str, str], key: str) -> None:
    if key not in header:
        return
    try:
        value = json.loads(header[key])
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise SteerError("must be a JSON object", field=f"metadata.{key}")
