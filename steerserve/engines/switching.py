"""SafeSwitch in the front end, for every engine: hold the pilot back, then pass it on or switch heads.

A request with SafeSwitch probes runs as usual while its probes read, on the device, the last prompt token
(stage 1) and the state after ``PILOT_TOKENS`` generated tokens (stage 2); the engine attaches their
scores (``extra["probe"]``) to the first output after the pilot. Until then nothing reaches the client:
the outputs are held. Then:

- not unsafe: the held outputs go out as one, and the rest streams as it comes;
- unsafe (both stages ``>= threshold``): the request is aborted (the pilot tokens are discarded, never
  sent) and the same prompt is generated again from its end with the refusal head (``regen``), whose
  outputs stream instead. Other requests in the batch never see any of it.

A reply that ends before the pilot is complete has no stage-2 score: it is unsafe when stage 1 fired (the
conservative reading: a short compliant answer to a harmful request is still an answer). The last output's
``report`` says ``switched`` and both scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from steerserve.engines.base import Engine, GenerationOutput, GenerationRequest
from steerserve.runtime.safeswitch import SafeSwitchSpec


def unsafe(scores: Mapping[str, Any], threshold: float) -> bool:
    """Both stages fired; stage 1 alone when the reply ended before stage 2 could read."""
    p1, p2 = scores.get("probe_stage1"), scores.get("probe_stage2")
    fired1 = p1 is not None and p1 >= threshold
    return fired1 and (p2 is None or p2 >= threshold)


def merged(held: Sequence[GenerationOutput]) -> GenerationOutput:
    """The held outputs as one increment (tokens and text joined; the last one's state and extras)."""
    last = held[-1]
    extra: dict[str, object] = {}
    for out in held:
        extra.update(out.extra)
    return dataclasses.replace(last, token_ids=tuple(t for out in held for t in out.token_ids),
                               text="".join(out.text for out in held), extra=extra)


def _with_report(out: GenerationOutput, scores: Mapping[str, Any], switched: bool) -> GenerationOutput:
    if out.finish_reason is None or "error" in out.extra:
        return out
    report = dict(out.extra.get("report") or {})  # type: ignore[call-overload]
    report.update({k: v for k, v in scores.items() if k.startswith("probe_")}, switched=switched)
    out.extra.pop("probe", None)
    return dataclasses.replace(out, extra={**out.extra, "report": report})


def guarded(request: GenerationRequest, ss: SafeSwitchSpec) -> tuple[GenerationRequest, GenerationRequest]:
    """``request`` with ``ss``'s probes, and its regeneration with the refusal head (``<id>-switched``)."""
    first = dataclasses.replace(request, probes=ss.probes)
    return first, dataclasses.replace(request, request_id=f"{request.request_id}-switched", probes=None, head=ss.head)


async def switching(engine: Engine, request: GenerationRequest,
                    ss: SafeSwitchSpec) -> AsyncGenerator[GenerationOutput, None]:
    """``request``'s outputs under ``ss``'s probes with the pilot held back, or, if the probes call it unsafe,
    those of its regeneration with ``ss``'s head."""
    first, regen = guarded(request, ss)
    held: list[GenerationOutput] = []
    scores: Mapping[str, Any] | None = None
    flagged = False
    outputs = engine.generate(first)
    try:
        async for out in outputs:
            if scores is not None:  # decided, not unsafe: pass through
                yield _with_report(out, scores, switched=False)
                continue
            held.append(out)
            if "error" in out.extra:
                yield merged(held)
                return
            probe = out.extra.get("probe")
            if probe is None and out.finish_reason is None:
                continue  # still in the pilot: hold
            scores = dict(probe or out.extra.get("report") or {})  # type: ignore[call-overload]
            flagged = unsafe(scores, ss.threshold)
            if flagged:
                break
            yield _with_report(merged(held), scores, switched=False)
    finally:
        await outputs.aclose()  # unsafe: aborts it in the engine, its pilot tokens discarded
    if not flagged or scores is None:
        return
    async for out in engine.generate(regen):
        yield _with_report(out, scores, switched=True)
