"""Putting the steering op into a stock vLLM model, and the engine arguments that turn it on.

How the op gets in (no fork, no edit of vLLM files): vLLM builds the worker from
``parallel_config.worker_cls`` (a dotted name, imported inside the worker process, so this works for
the in-process engine and the multi-process one alike). Our worker (``worker.py``) calls
``steer_decoder_layers`` right after ``load_model`` and before vLLM's first forward (the profile run
that triggers the Dynamo trace + Inductor compile), so the compiled graph contains one
``steerserve::steer_`` call at the end of every decoder layer.

``steer_decoder_layers`` swaps each decoder layer's class for a cached subclass whose ``forward`` calls
the op after the stock forward: the model, its weights and vLLM's class are untouched (no class-level
monkeypatch, nothing leaks into other engines in the process). Where the layers are and what they
return (a ``(hidden, residual)`` pair or one tensor) comes from ``steerserve.anatomy``.
"""

from __future__ import annotations

import contextlib
import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerserve.anatomy import Output, anatomy_of, vllm_layers
from steerserve.config import Settings
from steerserve.engines.vllm import ops as _ops  # noqa: F401  (registers torch.ops.steerserve.steer_, route_)
from steerserve.model_info import MoEInfo

_STEERED: dict[tuple[type[nn.Module], str], type[nn.Module]] = {}
# Source files outside engines/vllm whose code the compiled graph calls (cache key: ``code_fingerprint``).
ROUTE_SOURCES = ("runtime/route_op.py", "runtime/route_point.py", "anatomy.py")  # relative to the package


def _steered_class(cls: type[nn.Module], output: Output) -> type[nn.Module]:
    """``cls`` with the steering op at the end of ``forward`` (one subclass per layer class and output kind,
    ``anatomy.Anatomy.vllm_output``): the op always sees the whole residual stream after the block."""
    if getattr(cls, "_steerserve_steered", False):
        return cls
    if (cls, output) in _STEERED:
        return _STEERED[(cls, output)]

    class Steered(cls):  # type: ignore[valid-type, misc]
        _steerserve_steered = True

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            if output == "sum":  # (hidden, residual) [T, H] each, stream = their sum: steer into hidden
                torch.ops.steerserve.steer_(out[0], out[1], self.steer_layer)
            elif output == "first":  # (stream, the block's input): the next block ignores the second
                torch.ops.steerserve.steer_(out[0], None, self.steer_layer)
            else:  # one tensor, the stream itself: [T, H], or [1, T, H] from vLLM's transformers backend
                torch.ops.steerserve.steer_(out.flatten(0, -2), None, self.steer_layer)  # a view: in place on out
            return out

    Steered.__name__ = Steered.__qualname__ = f"Steered{cls.__name__}"
    Steered.__module__ = __name__
    steered: type[nn.Module] = Steered
    _STEERED[(cls, output)] = steered
    return steered


def steer_decoder_layers(model: nn.Module, architecture: str) -> int:
    """Insert the op into every decoder layer of ``model`` (vLLM's model of ``architecture``); returns the
    number of layers (global count).

    Layer ``i`` of ``anatomy.vllm_layers`` is steering layer ``i`` (the same index as the hf engine and
    the artifacts' layer convention). Pipeline-parallel placeholders (another rank's layers) are skipped.
    """
    output = anatomy_of(architecture).vllm_output
    layers = vllm_layers(model, architecture)
    for i, layer in enumerate(layers):
        if type(layer).__name__ == "PPMissingLayer":
            continue
        layer.__class__ = _steered_class(type(layer), output)
        layer.steer_layer = i  # type: ignore[assignment]  # a Python int: a constant in the traced graph
    return len(layers)


_ROUTED: dict[type, type] = {}


def _routed_class(cls: type) -> type:
    """``cls`` (a vLLM ``FusedMoERouter``) whose ``select_experts`` ends with the router point (one subclass
    per router class): the stock selection first, then ``steerserve::route_`` in place on its result."""
    if cls in _ROUTED or getattr(cls, "_steerserve_routed", False):
        return _ROUTED.get(cls, cls)

    class Routed(cls):
        _steerserve_routed = True

        def select_experts(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                           topk_indices_dtype: torch.dtype | None = None, *,
                           input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            weights, ids = super().select_experts(hidden_states, router_logits, topk_indices_dtype,
                                                  input_ids=input_ids)  # [T, k] each
            torch.ops.steerserve.route_(weights, ids, router_logits, self.steer_layer, self.steer_renormalize)
            return weights, ids

    Routed.__name__ = Routed.__qualname__ = f"Routed{cls.__name__}"
    Routed.__module__ = __name__
    _ROUTED[cls] = Routed
    return Routed


def route_moe_layers(model: nn.Module, moe: MoEInfo, architecture: str, eplb: bool = False) -> tuple[int, ...]:
    """Insert the router point into every MoE layer of ``model`` (the decoder layers ``moe.layers``): each
    layer's MoE runner gets its router object's class swapped (``_routed_class``). Refuses, with the
    reason, what would bypass or reorder the point: monolithic expert kernels (they never call the
    router), EPLB (it maps expert ids before the point), a router whose renormalisation differs from
    ``moe`` (the hf engine's)."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner_interface import MoERunnerInterface

    if eplb:
        raise RuntimeError("steerserve's router point does not support EPLB (expert ids are remapped before it)")
    found = []
    for i, layer in enumerate(vllm_layers(model, architecture)):
        runners = [m for m in layer.modules() if isinstance(m, MoERunnerInterface)]
        if not runners:
            continue
        for runner in runners:
            if runner.is_monolithic:
                raise RuntimeError(f"layer {i}: a monolithic MoE kernel never calls the router; steerserve's "
                                   "router point needs a modular one")
            router: Any = runner.router
            renorm = getattr(router, "renormalize", moe.renormalize)
            if bool(renorm) != moe.renormalize:
                raise RuntimeError(f"layer {i}: vLLM's router renormalize={renorm}, the model's config says "
                                   f"{moe.renormalize}: the engines would route differently")
            router.__class__ = _routed_class(type(router))
            router.steer_layer, router.steer_renormalize = i, moe.renormalize
        found.append(i)
    if tuple(found) != tuple(moe.layers):
        raise RuntimeError(f"MoE layers in vLLM's model {found} differ from the config's {list(moe.layers)}")
    return tuple(found)


def code_fingerprint() -> str:
    """Hash of this package's source: goes into vLLM's config hash so that its compile caches
    (``torch_compile_cache/<hash>`` and the AOT ``torch_aot_compile/<hash>``) never serve a graph
    compiled without, or with an older version of, the op."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for name in ROUTE_SOURCES:  # the router point's code outside this package runs inside the graph too
        h.update(name.encode())
        h.update((Path(__file__).parents[2] / name).read_bytes())
    with contextlib.suppress(metadata.PackageNotFoundError):
        h.update(metadata.version("steerserve").encode())
    return h.hexdigest()[:16]


def engine_kwargs(*, bank_slots: int = Settings.bank_slots, max_interventions: int = Settings.max_interventions,
                  loop_slots: int = Settings.loop_slots, capture_tokens: int = Settings.capture_tokens,
                  controller_slots: int = Settings.controller_slots) -> dict[str, Any]:
    """Arguments for ``vllm.LLM(...)`` / ``AsyncEngineArgs(...)`` that enable steering.

    ``additional_config`` is both the channel to the worker (sizes) and a compile-cache key factor:
    vLLM hashes it into ``VllmConfig.compute_hash()``, which keys both compile caches.
    """
    from vllm.platforms import current_platform

    worker = "SteerCPUWorker" if current_platform.is_cpu() else "SteerGPUWorker"
    return {
        "worker_cls": f"steerserve.engines.vllm.worker.{worker}",
        "additional_config": {"steerserve": {"bank_slots": bank_slots, "max_interventions": max_interventions,
                                             "loop_slots": loop_slots, "capture_tokens": capture_tokens,
                                             "controller_slots": controller_slots,
                                             "code": code_fingerprint()}},
    }
