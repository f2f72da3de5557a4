"""Removable forward hooks that apply the steering op (and capture activations) at decoder-layer outputs, and
the router point (expert masks) at MoE routers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from steerserve.anatomy import hf_layers
from steerserve.runtime.bank import VectorBank
from steerserve.runtime.control_op import ControllerUnit
from steerserve.runtime.ops import steer_guarded_
from steerserve.runtime.registers import Registers
from steerserve.runtime.route_point import RouteCapture, route_, route_rows
from steerserve.runtime.tables import StepTables


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace(output: Any, h: torch.Tensor) -> Any:
    return (h, *output[1:]) if isinstance(output, tuple) else h


class SteeringHooks:
    """Applies ``ops.steer_guarded_`` at the output of every decoder layer, reading the current step's tables
    (tokens whose steering would be non-finite stay unsteered and are marked in ``tables.bad``)."""

    def __init__(self, layers: Sequence[nn.Module], bank: VectorBank, tables: StepTables,
                 ctrl: ControllerUnit | None = None, regs: Registers | None = None) -> None:
        self.bank, self.tables, self.ctrl, self.regs = bank, tables, ctrl, regs
        self._handles: list[RemovableHandle] = [
            layer.register_forward_hook(self._make(i)) for i, layer in enumerate(layers)
        ]

    def _make(self, index: int) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            reading = self.ctrl is not None and self.ctrl.active
            steers = self.tables.steers(index)
            if not steers and not reading:
                return None  # nothing steered here or read this step (ROUTE ops are the routers'): leave it untouched
            h = _hidden(output)  # [B, S, H]
            flat = h.reshape(-1, h.shape[-1])  # [B*S, H], row-major = the tables' token order (a view if it can)
            n = flat.shape[0]
            if steers:
                steer_guarded_(flat, self.bank.weight, *self.tables.layer(index), self.tables.bad[:n],
                               self.tables.delta(index), clamp=self.tables.clamp(index))
            if reading:  # after steering: the stream the next block reads
                assert self.ctrl is not None and self.regs is not None
                self.ctrl.read_layer(index, flat, self.regs)
            return _replace(output, flat.view_as(h))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Capture:
    """Context manager recording chosen decoder-layer outputs: ``outputs[layer] = [B, S, H]``."""

    def __init__(self, layers: Sequence[nn.Module], which: Sequence[int]) -> None:
        self.layers, self.which = layers, list(which)
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Capture:
        for i in self.which:
            self._handles.append(self.layers[i].register_forward_hook(self._make(i)))
        return self

    def _make(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[index] = _hidden(output).detach().clone()

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def capture_hidden_states(model: nn.Module, prompts: Sequence[Sequence[int]],
                          which: Sequence[int]) -> list[torch.Tensor]:
    """Residual stream of each prompt at layers ``which``: one ``[len(prompt), len(which), H]`` fp32 each.

    ``model`` is a transformers causal LM (its blocks from ``anatomy.hf_layers``); run it unsteered
    (inactive tables, or no steering hooks at all).
    """
    layers = hf_layers(model)
    out = []
    with torch.inference_mode():
        for ids in prompts:
            with Capture(layers, which) as cap:
                model(input_ids=torch.tensor([list(ids)]), use_cache=False, logits_to_keep=1)
            out.append(torch.stack([cap.outputs[layer][0] for layer in which], dim=1).float())  # [n, L, H]
    return out


class RouteHooks:
    """The router point of the hf engine: a forward hook on each MoE layer's router that writes the masked
    routing (``route_point.route_``) over the router's own, for the tokens whose ROUTE row is non-zero, and
    records the routing when ``capture.on``. Steps without ROUTE ops return the router's output untouched."""

    def __init__(self, routers: Mapping[int, nn.Module], num_experts: int, renormalize: bool,
                 bank: VectorBank, tables: StepTables, capture: RouteCapture,
                 order: Sequence[str] = ("logits", "weights", "ids")) -> None:
        """``routers``: MoE layer -> its top-k router (``anatomy.hf_router``), returning ``order``
        (``anatomy.Anatomy.router_out``)."""
        self.bank, self.tables, self.capture, self.order = bank, tables, capture, tuple(order)
        self.num_experts, self.renormalize = num_experts, renormalize
        self._handles = [router.register_forward_hook(self._make(i)) for i, router in routers.items()]

    def _make(self, index: int) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            named = dict(zip(self.order, output, strict=True))
            logits, weights, ids = named["logits"], named["weights"], named["ids"]
            rows = route_rows(self.tables, self.bank.weight, index, ids.shape[0], self.num_experts)
            if rows is None and not self.capture.on:
                return None
            if rows is not None:
                weights, ids = weights.clone(), ids.clone()
                route_(weights, ids, logits, rows, self.renormalize)
            if self.capture.on:
                self.capture.record(index, weights, ids)
            named.update(logits=logits, weights=weights, ids=ids)
            return tuple(named[k] for k in self.order)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
