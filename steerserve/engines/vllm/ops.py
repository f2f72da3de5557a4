"""The steering op as a torch custom op, so that vLLM's Dynamo trace + Inductor compile keep it as one
opaque, in-place call per decoder layer instead of freezing the tables into the graph.

Why a custom op: vLLM traces the model once (``fullgraph=True``) and compiles it with Inductor. Plain
Python inside the layer would be traced with the tables' *values at trace time* and any host branch
(``tables.active``) frozen. An opaque torch library op (``steerserve::steer_``) is called on every step with the live
module-level state, so table contents written by the host between steps take effect.

vLLM's residual stream: most vLLM decoder layers return ``(hidden_states, residual)`` separately (the add
is fused into the next RMSNorm); the residual stream after block ``l`` (what the hf engine steers, the
layer convention of ``model_info.LAYER_CONVENTION``) is their SUM ``x = hidden + residual``. Layers that
return the stream whole (``anatomy``: ``"single"``, ``"first"``) pass ``residual=None`` and ``x = hidden``. So:

- ``add``: ``x + c v = (hidden + c v) + residual``: added to ``hidden`` only, in place.
- ``ablate``: the projection must be of the SUM: ``hidden += steer(x) - x`` where ``steer`` is
  ``runtime.ops.steer_`` (ablate-then-add on ``x``); ``residual`` is left as is, so the next layer sees
  ``hidden' + residual = steer(x)`` up to one rounding. Unsteered tokens give ``steer(x) - x == 0``
  exactly (row 0, scale 0), so ``hidden`` stays bit-identical.

The op body runs eagerly (it is opaque to the compiler), so it may slice to this step's token count and
used table widths and return early when nothing is steered: that is valid on CPU, where vLLM does not
capture graphs. Under CUDA-graph capture (GPU) the body would be recorded once; see ``SteerState.static``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steerserve.runtime.bank import VectorBank
from steerserve.runtime.capture import CaptureBuffer
from steerserve.runtime.control_op import ControllerUnit
from steerserve.runtime.head_point import HeadPoint
from steerserve.runtime.ops import add_delta, clamp_delta, keep_finite_, steer_, steer_guarded_
from steerserve.runtime.registers import Registers
from steerserve.runtime.route_point import RouteCapture, route_, route_rows
from steerserve.runtime.tables import StepTables


@dataclass
class SteerState:
    """What the op reads at run time: one per worker process (``bank.weight [R, H]``, tables
    ``[layers, max_tokens, slots]``), with the closed-loop registers, the capture buffer and the
    controller unit."""

    bank: VectorBank
    tables: StepTables
    regs: Registers
    capture: CaptureBuffer
    ctrl: ControllerUnit
    head: HeadPoint
    # True under CUDA-graph capture: no host branches, full fixed-shape tables (slots) every call.
    static: bool = False
    route_capture: RouteCapture = field(default_factory=RouteCapture)  # routing records (tests, tools)


_STATE: SteerState | None = None  # module-level registry: the op cannot take Python objects as args


def install(state: SteerState | None) -> None:
    """Make ``state`` the one the op reads (None: the op becomes a no-op)."""
    global _STATE
    _STATE = state


def current() -> SteerState | None:
    return _STATE


def _steer_impl(h: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    """Steer the residual stream ``h + residual`` (``h`` alone where ``residual`` is None: a block that
    returns the stream whole) after decoder block ``layer``, writing into ``h``.

    ``h, residual [T, H]``: the flat step (``T`` = tokens laid out this step, possibly padded; padded
    rows are beyond ``tables.num_tokens`` and are never touched).
    """
    state = _STATE
    if state is None:
        return
    _steer_tables(state, h, residual, layer)
    capture, ctrl = state.static or state.capture.active, state.static or state.ctrl.active
    if capture or ctrl:  # reads come after steering: the stream the next block reads
        stream = h if residual is None else h + residual  # [T, H]
        if capture:
            state.capture.read_layer(layer, stream[: h.shape[0] if state.static else state.capture.num_tokens])
        if ctrl:
            state.ctrl.read_layer(layer, stream, state.regs, state.static)


def _steer_tables(state: SteerState, h: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    tables = state.tables
    if not state.static and not tables.steers(layer):
        return  # nothing steered at this layer this step (ROUTE ops are the router point's): no table reads
    n = h.shape[0] if state.static else min(h.shape[0], tables.num_tokens)
    add_rows, add_scales, abl_rows, abl_scales = tables.layer(layer, sliced=not state.static)
    if n != add_rows.shape[0]:
        add_rows, add_scales, abl_rows, abl_scales = add_rows[:n], add_scales[:n], abl_rows[:n], abl_scales[:n]
    bank = state.bank.weight
    if bank.dtype != h.dtype or bank.device != h.device:
        bank = bank.to(device=h.device, dtype=h.dtype)  # only if the worker built it mismatched
    clamp = tables.clamp(layer, sliced=not state.static)  # [T, Kc] rows and targets, or None
    if clamp is not None and clamp[0].shape[0] != n:
        clamp = (clamp[0][:n], clamp[1][:n])
    if state.static:  # graph-safe: every slot, every token up to the captured size; no data-dependent branch
        res = None if residual is None else residual[:n]
        assert clamp is not None
        _steer_static(h[:n], res, bank, add_rows, add_scales, abl_rows, abl_scales, clamp, tables.bad[:n])
        return
    delta = tables.delta(layer)  # [T, H] gathered for all layers at once, for small steps
    if delta is not None and delta.shape[0] != n:
        delta = delta[:n]
    if abl_rows.shape[1] or add_rows.shape[1] or clamp is not None:
        # Ablations and clamps read the sum hidden + residual; additions go to hidden alone (they commute
        # with the split). Refused tokens keep their value and are marked in tables.bad.
        steer_guarded_(h[:n], bank, add_rows, add_scales, abl_rows, abl_scales, tables.bad[:n], delta,
                       None if residual is None else residual[:n], clamp)


def _steer_static(hn: torch.Tensor, residual: torch.Tensor | None, bank: torch.Tensor, add_rows: torch.Tensor,
                  add_scales: torch.Tensor, abl_rows: torch.Tensor, abl_scales: torch.Tensor,
                  clamp: tuple[torch.Tensor, torch.Tensor], bad: torch.Tensor) -> None:
    """The same steering with a fixed sequence of kernels (for CUDA-graph capture and replay).

    Ablations on the sum ``x = hn + residual`` (a token with scale 0 gets ``x - x0 == 0`` exactly), then
    the additions and clamps on ``hn`` (row 0 / scale 0 adds exactly 0, an unused clamp slot exactly 0),
    so unsteered tokens stay bit-identical.
    """
    x0 = hn if residual is None else hn + residual  # [T, H]
    clamped = clamp_delta(x0, bank, *clamp)  # [T, H], read before this layer's other ops
    x = x0.clone()
    steer_(x, bank, add_rows[:, :0], add_scales[:, :0], abl_rows, abl_scales)
    new = x if residual is None else hn + (x - x0)
    new.add_(add_delta(bank, add_rows, add_scales)).add_(clamped)
    # refused tokens keep hn and are marked, as in steer_guarded_
    keep_finite_(hn, new, new if residual is None else new + residual, bad)


def _steer_fake(h: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    """Shape-only version for Dynamo/Inductor tracing: mutates ``h`` in place, returns nothing."""
    return None


# Registered with the low-level ``torch.library`` API rather than ``@custom_op``: the op runs under
# inference mode only (no autograd, no version counters to bump), and skipping custom_op's Python
# autograd / inplace-view / dynamo-disable wrappers cuts its per-call overhead several times; it is
# called once per decoder layer per step.
_LIB = torch.library.Library("steerserve", "DEF")
_LIB.define("steer_(Tensor(a!) h, Tensor? residual, int layer) -> ()")
_LIB.impl("steer_", _steer_impl, "CompositeExplicitAutograd")
torch.library.register_fake("steerserve::steer_", _steer_fake, lib=_LIB)


def _route_impl(weights: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, layer: int,
                renormalize: bool) -> None:
    """The router point after decoder layer ``layer``'s stock expert selection (``weights, ids [T, k]``,
    ``logits [T, E]``): the masked routing, in place, for the tokens with a non-zero ROUTE row this step
    (``runtime.route_point``); nothing at all on steps without ROUTE ops. Eager (opaque to the compiler),
    like ``steer_``: CPU only (the worker refuses the router point where CUDA graphs are captured)."""
    state = _STATE
    if state is None:
        return
    rows = route_rows(state.tables, state.bank.weight, layer, weights.shape[0], logits.shape[-1])
    if rows is not None:
        route_(weights, ids, logits, rows, renormalize)
    if state.route_capture.on:  # (its segments name only this step's real tokens, never padding)
        state.route_capture.record(layer, weights, ids)


def _route_fake(weights: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, layer: int,
                renormalize: bool) -> None:
    return None


_LIB.define("route_(Tensor(a!) weights, Tensor(b!) ids, Tensor logits, int layer, bool renormalize) -> ()")
_LIB.impl("route_", _route_impl, "CompositeExplicitAutograd")
torch.library.register_fake("steerserve::route_", _route_fake, lib=_LIB)
