"""``safeswitch``: probes decide on the device whether a request is unsafe; if so it is answered by a refusal head.

``{"method": "safeswitch", "probes": NAME, "head": NAME, "threshold": p}`` (SafeSwitch, Han et al.
2502.01042; ``runtime.safeswitch``). ``probes`` is a ``probe`` artifact and ``head`` a ``head`` artifact, both
made by ``steerserve train safeswitch``. Stage 1 reads the last prompt token, stage 2 the state after the
pilot tokens; when both reach ``p`` (default: the probes' own threshold) the request is generated again from
the end of its prompt with the refusal head (``engines.switching``): the pilot never reaches the client.
The intervention changes no activation, so it composes with any other method in the same request (those
apply to the regenerated reply as well). The response's ``report`` says ``switched`` and both scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from steerserve.errors import SteerError
from steerserve.methods.base import Compiled, check_keys, string
from steerserve.runtime.safeswitch import ProbePair, SafeSwitchSpec
from steerserve.spec import PromptInfo, ResolveContext


def probability(value: Any, f: str) -> float:
    """A threshold strictly inside (0, 1); else a 400 naming ``f``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value < 1.0:
        raise SteerError(f"must be a probability strictly between 0 and 1, got {value!r}", field=f)
    return float(value)


class SafeSwitch:
    name = "safeswitch"

    async def compile(
        self, params: Mapping[str, Any], prompt: PromptInfo, ctx: ResolveContext, where: str
    ) -> Compiled:
        check_keys(params, ("probes", "head", "threshold"), where)
        probe_meta, stage1, stage2, default = ctx.store.load_probes(string(params, "probes", where),
                                                                    field=f"{where}.probes")
        head_meta, delta = ctx.store.load_head(string(params, "head", where), field=f"{where}.head")
        threshold = probability(params.get("threshold", default), f"{where}.threshold")
        spec = SafeSwitchSpec(ProbePair(stage1, stage2), delta, threshold)
        return Compiled((), (probe_meta.ref(), head_meta.ref()), {"threshold": threshold}, safeswitch=spec)
