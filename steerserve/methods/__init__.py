"""The steering methods, registered by name, and ``resolve``: a spec compiled into runtime ops by them,
under the request's policy (``policy.py``), and ``check_policy``, the admin edge's check of a policy.

Adding a method: one module here and one line in ``REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Sequence

from steerserve.errors import SteerError
from steerserve.methods import policy as policy_rules
from steerserve.methods.ablate import Ablate
from steerserve.methods.actadd import ActAdd
from steerserve.methods.add import Add
from steerserve.methods.base import Compiled, Method
from steerserve.methods.cot_compress import CotCompress
from steerserve.methods.entropic import Entropic
from steerserve.methods.expert_mask import ExpertMask
from steerserve.methods.refusal_controller import RefusalController
from steerserve.methods.routing import Pick, as_mandatory, route_ops
from steerserve.methods.sae_feature import SaeFeature
from steerserve.methods.safeswitch import SafeSwitch
from steerserve.runtime.plan import SteerOp
from steerserve.spec import AppliedIntervention, Intervention, PromptInfo, ResolveContext, ResolvedSpec, SteerSpec
from steerserve.store.policies import Policy

REGISTRY: dict[str, Method] = {m.name: m for m in (Add(), ActAdd(), Ablate(), Entropic(), CotCompress(),
                                                   RefusalController(), SafeSwitch(), ExpertMask(), SaeFeature())}

# What a request may hold at most one of: (``Compiled`` attribute, what the refusal calls it).
SINGLES = (("loop", "closed-loop intervention"), ("controller", "refusal controller"), ("safeswitch", "safeswitch"))


def get_method(name: str, field: str = "method") -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise SteerError(f"unknown method {name!r}; known: {sorted(REGISTRY)}", field=field) from None


async def _compile(iv: Intervention, prompt: PromptInfo, ctx: ResolveContext, f: str) -> Compiled:
    return await get_method(iv.method, field=f"{f}.method").compile(iv.params, prompt, ctx, f)


def _check_singles(entries: Sequence[tuple[str, Compiled, bool]], owner: str | None) -> None:
    """At most one of each of ``SINGLES`` per request. Client entries come first, so a clash with a mandatory
    one is the client's (403 naming its field); a clash between the client's own is a 400."""
    for attr, what in SINGLES:
        first = ""
        for f, compiled, is_mandatory in entries:
            if getattr(compiled, attr) is None:
                continue
            if first and is_mandatory:
                raise policy_rules.forbidden(f"policy {owner!r} applies a {what} of its own; a request under it "
                                             "may not add another", first)
            if first:
                raise SteerError(f"only one {what} per request", field=f)
            first = f


def _route_ops(entries: Sequence[tuple[Compiled, bool]], ctx: ResolveContext) -> tuple[SteerOp, ...]:
    """Every ``expert_mask`` of the request (``Compiled.route``; ``True``: a policy's) merged and checked
    again as one mask: one ROUTE op per masked layer (``methods.routing``)."""
    picks: list[Pick] = [p for c, is_mandatory in entries for p in (as_mandatory(c.route) if is_mandatory else c.route)]
    if not picks or ctx.model.moe is None:  # (expert_mask refuses a dense model: no picks there)
        return ()
    return route_ops(picks, ctx.model.moe, ctx.model.hidden_size)


async def resolve(spec: SteerSpec, prompt: PromptInfo, ctx: ResolveContext, where: str = "steering",
                  policy: Policy | None = None) -> ResolvedSpec:
    """Check every intervention against model, store and policy, and compile it to runtime ops.

    With a ``policy`` the client's interventions must pass it and its mandatory interventions are appended
    (``methods.policy``); without one (in-process callers: evaluation, benchmarks) nothing is restricted.
    Mandatory interventions do not count against ``max_interventions``.
    """
    if len(spec.interventions) > ctx.settings.max_interventions:
        raise SteerError(
            f"{len(spec.interventions)} interventions exceed the limit of {ctx.settings.max_interventions}",
            field=f"{where}.interventions",
        )
    client = [(f"{where}.interventions.{i}", iv) for i, iv in enumerate(spec.interventions)]
    theirs: list[tuple[str, Intervention, Compiled]] = []
    if policy is not None:
        client = policy_rules.admit(policy, spec, where)
        for f, iv in policy_rules.mandatory(policy):
            try:
                theirs.append((f, iv, await _compile(iv, prompt, ctx, f)))
            except SteerError as exc:
                raise policy_rules.broken(policy, exc) from None
    guarded = policy_rules.guarded_artifacts([c.artifacts for _, _, c in theirs])
    ours: list[tuple[str, Intervention, Compiled]] = []
    for f, iv in client:
        compiled = await _compile(iv, prompt, ctx, f)
        if policy is not None:
            policy_rules.check_compiled(policy, guarded, iv, compiled, f)
        ours.append((f, iv, compiled))
    owner = policy.name if policy is not None else None
    entries = [(f, iv, c, False) for f, iv, c in ours] + [(f, iv, c, True) for f, iv, c in theirs]
    _check_singles([(f, c, m) for f, _, c, m in entries], owner)
    compiled_all = [c for _, _, c, _ in entries]
    routes = _route_ops([(c, m) for _, _, c, m in entries], ctx)
    return ResolvedSpec(
        tuple(op for c in compiled_all for op in c.ops) + routes,
        tuple(AppliedIntervention(iv.method, c.artifacts, c.detail, owner if m else None) for _, iv, c, m in entries),
        next((c.loop for c in compiled_all if c.loop is not None), None),
        next((c.controller for c in compiled_all if c.controller is not None), None),
        next((c.safeswitch for c in compiled_all if c.safeswitch is not None), None),
    )


async def check_policy(policy: Policy, prompt: PromptInfo, ctx: ResolveContext) -> None:
    """Refuse (400 naming the field) a policy that names an unknown method or whose mandatory interventions
    do not resolve against the loaded model and store; called before a policy is stored."""
    for k, name in enumerate(policy.allowed_methods or ()):
        get_method(name, field=f"allowed_methods.{k}")
    for name in policy.method_caps:
        get_method(name, field=f"method_caps.{name}")
    if len(policy.mandatory) > ctx.settings.max_interventions:
        raise SteerError(f"{len(policy.mandatory)} interventions exceed the limit of "
                         f"{ctx.settings.max_interventions}", field="mandatory")
    entries = [(f, await _compile(iv, prompt, ctx, f), False) for f, iv in policy_rules.mandatory(policy, "mandatory")]
    _check_singles(entries, policy.name)
    _route_ops([(c, False) for _, c, _ in entries], ctx)


__all__ = ["REGISTRY", "Compiled", "Method", "check_policy", "get_method", "resolve"]
