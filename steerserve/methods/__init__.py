"""The steering methods, registered by name, and ``resolve``: a spec compiled into runtime ops by them.

Adding a method: one module here and one line in ``REGISTRY``.
"""

from __future__ import annotations

from steerserve.errors import SteerError
from steerserve.methods.ablate import Ablate
from steerserve.methods.actadd import ActAdd
from steerserve.methods.add import Add
from steerserve.methods.base import Compiled, Method
from steerserve.methods.cot_compress import CotCompress
from steerserve.methods.entropic import Entropic
from steerserve.methods.refusal_controller import RefusalController
from steerserve.methods.safeswitch import SafeSwitch
from steerserve.runtime.controller import ControllerWeights
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.plan import SteerOp
from steerserve.runtime.safeswitch import SafeSwitchSpec
from steerserve.spec import AppliedIntervention, PromptInfo, ResolveContext, ResolvedSpec, SteerSpec

REGISTRY: dict[str, Method] = {m.name: m for m in (Add(), ActAdd(), Ablate(), Entropic(), CotCompress(),
                                                   RefusalController(), SafeSwitch())}


def get_method(name: str, field: str = "method") -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise SteerError(f"unknown method {name!r}; known: {sorted(REGISTRY)}", field=field) from None



async def resolve(spec: SteerSpec, prompt: PromptInfo, ctx: ResolveContext, where: str = "steering") -> ResolvedSpec:
    """Check every intervention against model, store and policy, and compile it to runtime ops."""
    if len(spec.interventions) > ctx.settings.max_interventions:
        raise SteerError(
            f"{len(spec.interventions)} interventions exceed the limit of {ctx.settings.max_interventions}",
            field=f"{where}.interventions",
        )
    ops: list[SteerOp] = []
    applied: list[AppliedIntervention] = []
    loop: LoopSpec | None = None
    controller: ControllerWeights | None = None
    safeswitch: SafeSwitchSpec | None = None
    for i, iv in enumerate(spec.interventions):
        f = f"{where}.interventions.{i}"
        method = get_method(iv.method, field=f"{f}.method")
        compiled = await method.compile(iv.params, prompt, ctx, f)
        if compiled.loop is not None:
            if loop is not None:
                raise SteerError("only one closed-loop intervention per request", field=f)
            loop = compiled.loop
        if compiled.controller is not None:
            if controller is not None:
                raise SteerError("only one refusal controller per request", field=f)
            controller = compiled.controller
        if compiled.safeswitch is not None:
            if safeswitch is not None:
                raise SteerError("only one safeswitch per request", field=f)
            safeswitch = compiled.safeswitch
        ops.extend(compiled.ops)
        applied.append(AppliedIntervention(iv.method, compiled.artifacts, compiled.detail))
    return ResolvedSpec(tuple(ops), tuple(applied), loop, controller, safeswitch)


__all__ = ["REGISTRY", "Compiled", "Method", "get_method", "resolve"]
