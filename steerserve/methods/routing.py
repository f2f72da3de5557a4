"""Expert masks of a request (MoTE), as the ``expert_mask`` method compiles them, merged into one ROUTE op per
MoE layer (``runtime.route_op``: the op reads a single mask row per layer, so a request may hold only one).

Every ``expert_mask`` entry of a request, the client's and its policy's mandatory ones, compiles to a set of
``Pick``s (layer, expert, what to do). ``resolve`` merges all of them with ``route_ops`` and the merged mask
is validated with the same ``check`` each entry passed alone, so a combination that no single entry shows
(entry 0 forces expert 3, entry 1 disables it; two entries that together disable every expert) is refused
too, naming the client's field. A client force of an expert a mandatory entry disables (or the reverse)
would undo the policy: a 403, like every other attempt to weaken a mandatory intervention.

Per layer (``E`` experts, top-``k``): no expert both forced and disabled (``force.<L>``); at most ``k``
forced (``force.<L>``); at most ``E - k`` disabled in mask mode, so that ``k`` experts remain to select,
and never every expert disabled in either mode (``experts.<L>``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from steerserve.errors import SteerError
from steerserve.model_info import MoEInfo
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.runtime.route_op import encode_row

How = Literal["off", "drop", "force"]  # mask mode's disable, zero mode's disable, force
FORBIDDEN = "policy_forbidden"


@dataclass(frozen=True)
class Pick:
    """One expert of one MoE layer turned off, dropped or forced, by the field that named it
    (``<intervention>.experts.<L>`` or ``<intervention>.force.<L>``)."""

    layer: int
    expert: int
    how: How
    field: str
    mandatory: bool = False  # from a policy's mandatory intervention


def check(picks: Sequence[Pick], moe: MoEInfo) -> None:
    """Refuse (400, or 403 where a client pick undoes a mandatory one) a mask that breaks a layer's routing;
    ``picks`` hold valid layers and expert ids (the method checks those)."""
    for layer in sorted({p.layer for p in picks}):
        here = [p for p in picks if p.layer == layer]
        forced = {p.expert: p for p in here if p.how == "force"}
        for p in here:
            if p.how != "force" and p.expert in forced:
                _conflict(forced[p.expert], p)
        off = {p.expert for p in here if p.how == "off"}
        gone = off | {p.expert for p in here if p.how == "drop"}
        e, k = moe.num_experts, moe.top_k
        if len(forced) > k:
            raise SteerError(f"forces {len(forced)} experts {sorted(forced)} at layer {layer}; at most top_k = {k} "
                             "can be selected", field=_blame([p for p in here if p.how == "force"]))
        disabling = [p for p in here if p.how != "force"]
        if len(gone) >= e:
            raise SteerError(f"disables every one of the {e} experts of layer {layer}", field=_blame(disabling))
        if len(off) > e - k:
            raise SteerError(f"disables {len(off)} experts of layer {layer} in mask mode; at most E - top_k = "
                             f"{e - k} may be, so that {k} remain to select (zero mode may disable more)",
                             field=_blame([p for p in disabling if p.how == "off"]))


def route_ops(picks: Iterable[Pick], moe: MoEInfo, hidden_size: int) -> tuple[SteerOp, ...]:
    """The merged mask as one ROUTE op per masked layer, covering every position; checked first (``check``)."""
    merged = list(picks)
    check(merged, moe)
    ops = []
    for layer in sorted({p.layer for p in merged}):
        sets = {how: sorted({p.expert for p in merged if p.layer == layer and p.how == how})
                for how in ("off", "drop", "force")}
        row = encode_row(hidden_size, moe.num_experts, sets["off"], sets["drop"], sets["force"])
        ops.append(SteerOp(OpKind.ROUTE, layer, VectorRef.of(row), 1.0))
    return tuple(ops)


def as_mandatory(picks: Iterable[Pick]) -> tuple[Pick, ...]:
    """``picks`` marked as a policy's (see ``check``'s 403)."""
    return tuple(replace(p, mandatory=True) for p in picks)


def _blame(picks: Sequence[Pick]) -> str:
    """The field to name: the last client pick (a client's request meets the policy's, never the reverse)."""
    client = [p for p in picks if not p.mandatory]
    return (client or list(picks))[-1].field


def _conflict(force: Pick, disable: Pick) -> None:
    what = "disabled" if disable.how == "off" else "dropped"
    msg = f"expert {force.expert} of layer {force.layer} is both forced ({force.field}) and {what} ({disable.field})"
    if force.mandatory != disable.mandatory:
        client = disable if force.mandatory else force
        raise SteerError(f"{msg}: a request may not undo its policy's mandatory expert mask", field=client.field,
                         status=403, code=FORBIDDEN)
    raise SteerError(msg, field=force.field)
