"""Policy enforcement: the one place where a request's policy (``store.policies``) meets its steering spec.

``methods.resolve`` applies these to every request that comes with a policy (every HTTP request does: its
key's policy, or ``default``); a refusal is a 403 ``policy_forbidden`` naming the field.

- ``admit`` (before compiling): a method outside ``allowed_methods`` is refused
  (``steering.interventions.<i>.method``), and so is a raw strength over the cap. An exact copy of a
  mandatory intervention is dropped: it is applied once, as the policy's.
- ``check_compiled`` (after compiling each client intervention): its compiled strengths (``coeff``,
  ``beta``, ``beta_max``, ``gamma``, ``alpha``) within the policy's cap for its method, so that strengths
  a method takes from an artifact (a stored pair's ``coeff``, ``gamma: "auto"``, a controller's ``alpha``)
  are capped too; and it may not use an artifact a mandatory intervention uses (any version, whatever the
  parameter: ``vector``, ``pair``, ``probes``, ``head``, ...): a client may not weaken or undo a mandatory
  intervention, neither by adding its vector back at another strength nor by ablating its direction nor by
  running the same probes at another threshold.
- ``mandatory``: the policy's own interventions, which ``resolve`` appends after the client's whatever the
  client sent, and reports with ``"mandatory": true``. One that no longer resolves (its artifact deleted
  or disabled since) fails the request closed: a 503 ``policy_unavailable`` (``broken``), never a request
  served without it. A client intervention that would be a second one of what a request holds at most one
  of (a closed loop, a refusal controller, a safeswitch) when the policy applies one is a 403 as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from steerserve.errors import SteerError
from steerserve.methods.base import Compiled
from steerserve.spec import Intervention, SteerSpec
from steerserve.store.db import REF_RE
from steerserve.store.policies import Policy

STRENGTHS = ("coeff", "beta", "beta_max", "gamma", "alpha")  # the parameters whose size a policy caps
FORBIDDEN = "policy_forbidden"


def forbidden(message: str, field: str) -> SteerError:
    return SteerError(message, field=field, status=403, code=FORBIDDEN)


def mandatory(policy: Policy, where: str = "policy.mandatory") -> list[tuple[str, Intervention]]:
    """The policy's mandatory interventions, each with the field that names it (``<where>.<j>``)."""
    spec = SteerSpec.from_dict({"interventions": [dict(m) for m in policy.mandatory]}, where)
    return [(f"{where}.{j}", iv) for j, iv in enumerate(spec.interventions)]


def admit(policy: Policy, spec: SteerSpec, where: str = "steering") -> list[tuple[str, Intervention]]:
    """The client's interventions ``policy`` lets through, each with its field; 403 for one it forbids."""
    copies = [dict(m) for m in policy.mandatory]
    out = []
    for i, iv in enumerate(spec.interventions):
        f = f"{where}.interventions.{i}"
        if policy.allowed_methods is not None and iv.method not in policy.allowed_methods:
            allowed = ", ".join(policy.allowed_methods) or "none"
            raise forbidden(f"method {iv.method!r} is not allowed by policy {policy.name!r} (allowed: {allowed})",
                            f"{f}.method")
        if {"method": iv.method, **iv.params} in copies:
            continue  # the mandatory intervention itself: applied once, as the policy's
        check_strength(policy, iv.method, iv.params, f)
        out.append((f, iv))
    return out


def guarded_artifacts(mandatory_artifacts: Iterable[Iterable[str]]) -> dict[str, int]:
    """{artifact name: index of the mandatory intervention using it} from their compiled ``name@version``s."""
    return {ref.partition("@")[0]: j for j, refs in enumerate(mandatory_artifacts) for ref in refs}


def check_compiled(policy: Policy, guarded: Mapping[str, int], iv: Intervention, compiled: Compiled,
                   where: str) -> None:
    """A compiled client intervention: strengths within the cap, no artifact of a mandatory intervention."""
    check_strength(policy, iv.method, compiled.detail, where)
    for ref in compiled.artifacts:
        name = ref.partition("@")[0]
        if name in guarded:
            key = next((k for k, v in iv.params.items()
                        if isinstance(v, str) and (m := REF_RE.fullmatch(v)) is not None and m["name"] == name), None)
            raise forbidden(f"policy {policy.name!r} applies {name!r} to every request (mandatory intervention "
                            f"{guarded[name]}); a request may not use it itself", f"{where}.{key}" if key else where)


def check_strength(policy: Policy, method: str, values: Mapping[str, Any], where: str) -> None:
    """403 naming ``<where>.<key>`` for a strength in ``values`` over the policy's cap for ``method``."""
    cap = policy.cap(method)
    if cap is None:
        return
    features = values.get("features")  # sae_feature: a strength per feature
    named = [(f"features.{k}", v) for k, v in features.items()] if isinstance(features, Mapping) else []
    for key, value in [*((k, values.get(k)) for k in STRENGTHS), *named]:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > cap:
            raise forbidden(f"|{value}| exceeds the limit of {cap} that policy {policy.name!r} sets for {method}",
                            f"{where}.{key}")


def broken(policy: Policy, exc: SteerError) -> SteerError:
    """A mandatory intervention that no longer resolves: the request fails closed (503), naming it."""
    return SteerError(f"policy {policy.name!r} cannot be applied ({exc.message}); an admin must fix the policy",
                      field=exc.field, status=503, code="policy_unavailable")
