"""``POST /generate``: the native endpoint, with the steering report in every response; ``POST /features``
and ``GET /features/search``.

Non-streaming: ``{"id", "text", "finish_reason", "usage", "steering": {"applied": [...]}, "model"}``.
Streaming (SSE): ``data: {"id", "text": <delta>, "finish_reason": null}`` per increment; the last event
carries ``finish_reason``, ``usage``, ``steering`` and ``model``; then ``data: [DONE]``. A closed-loop
request's increments on the hf engine also carry ``"loop": {"entropy_bits", "gain"}``, one per token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from steerserve.api.apidoc import (
    GENERATION_ERRORS,
    FeatureSearchResponse,
    FeaturesResponse,
    GenerateChunk,
    GenerateResponse,
    errors,
    streamed,
)
from steerserve.api.document import GENERATE_EXAMPLES
from steerserve.api.guard import policy_of
from steerserve.api.schemas import FeaturesRequest, GenerateRequest, SaeRef, SearchLimit, SearchText
from steerserve.api.streaming import (
    Metrics,
    SSEResponse,
    Tally,
    check_steering_text,
    checked_outputs,
    collect_while_connected,
    sse_events,
    steering_report,
    until_disconnect,
)
from steerserve.features import open_loop_ops
from steerserve.service import Service, Submitted

router = APIRouter(tags=["native"])


@router.post("/generate", response_model=None, responses=streamed(GenerateResponse, GenerateChunk))
async def generate(body: Annotated[GenerateRequest, Body(openapi_examples=GENERATE_EXAMPLES)],
                   request: Request) -> Response:
    service: Service = request.app.state.service
    metrics: Metrics = request.app.state.metrics
    messages = None if body.messages is None else [m.model_dump() for m in body.messages]
    check_steering_text(body.steering, service.settings.max_prompt_chars, service.settings.max_interventions)
    prompt = await asyncio.to_thread(service.render, body.prompt, messages)  # CPU work: off the event loop
    sampling = service.sampling(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop=body.stop, ignore_eos=body.ignore_eos)
    sub = await service.submit(prompt, sampling, body.steering, policy=policy_of(request), timeout=body.timeout)
    metrics.accepted(sub)
    model = service.info.name
    if body.stream:
        return SSEResponse(sse_events(_events(sub, model, metrics), sub.request_id))
    text, tally = await collect_while_connected(request, sub, metrics)
    return JSONResponse({"id": sub.request_id, "text": text, "finish_reason": tally.finish_reason,
                         "usage": tally.usage(), "steering": steering_report(sub, tally), "model": model})


async def _events(sub: Submitted, model: str, metrics: Metrics) -> AsyncGenerator[dict[str, Any], None]:
    tally = Tally(len(sub.prompt.token_ids))
    async with aclosing(checked_outputs(sub, tally, metrics)) as outs:
        async for out in outs:
            if out.finish_reason is None:
                loop = out.extra.get("loop")  # a closed loop's per-token figures (hf engine), even without text
                if out.text or loop:
                    yield {"id": sub.request_id, "text": out.text, "finish_reason": None,
                           **({"loop": loop} if loop else {})}
                continue
            loop = out.extra.get("loop")
            yield {"id": sub.request_id, "text": out.text, "finish_reason": out.finish_reason,
                   **({"loop": loop} if loop else {}),
                   "usage": tally.usage(), "steering": steering_report(sub, tally), "model": model}


@router.post("/features", response_model=None, responses={200: {"model": FeaturesResponse}, **GENERATION_ERRORS})
async def features(body: FeaturesRequest, request: Request) -> JSONResponse:
    """The ``top_k`` most active features of a SAE dictionary at every token of the prompt (chat or raw),
    with their activations and labels: what a request steering by ``sae_feature`` would find there.
    Authenticated like ``/generate`` (a key's rate limit applies)."""
    service: Service = request.app.state.service
    messages = None if body.messages is None else [m.model_dump() for m in body.messages]
    prompt = await asyncio.to_thread(service.render, body.prompt, messages)
    if body.steering is None and not body.max_tokens:
        return JSONResponse(await service.features(prompt, body.sae, body.top_k))
    # With a reply or steering: the steering is resolved first (a closed loop cannot be replayed: 400), the
    # greedy reply generated as /generate would, then prompt + reply read under the same ops and without.
    check_steering_text(body.steering, service.settings.max_prompt_chars, service.settings.max_interventions)
    ops = open_loop_ops(await service.resolved(prompt, body.steering, policy_of(request)))
    extra: dict[str, Any] = {}
    reply: list[int] = []
    if body.max_tokens:
        metrics: Metrics = request.app.state.metrics
        sampling = service.sampling(max_tokens=body.max_tokens, temperature=0.0, top_p=None, seed=None, stop=None)
        sub = await service.submit(prompt, sampling, body.steering, policy=policy_of(request), timeout=body.timeout)
        metrics.accepted(sub)
        tally = Tally(len(prompt.token_ids))
        reply, text = await until_disconnect(request.receive, lambda: _reply(sub, tally, metrics))
        extra = {"text": text, "steering": steering_report(sub, tally) if body.steering is not None else None}
    out = await service.features(prompt, body.sae, body.top_k, reply, ops)
    return JSONResponse({**out, **extra})


async def _reply(sub: Submitted, tally: Tally, metrics: Metrics) -> tuple[list[int], str]:
    """The reply's token ids and text (failures raised as for /generate)."""
    ids: list[int] = []
    parts: list[str] = []
    async with aclosing(checked_outputs(sub, tally, metrics)) as outs:
        async for out in outs:
            ids += out.token_ids
            parts.append(out.text)
    return ids, "".join(parts)


@router.get("/features/search", response_model=None,
            responses={200: {"model": FeatureSearchResponse}, **errors(400, 401, 404, 429)})
async def search_features(request: Request, sae: SaeRef, q: SearchText, limit: SearchLimit = 20) -> JSONResponse:
    """The features of the SAE dictionary ``sae`` whose label contains ``q``, best first (as a whole word,
    then as a word's start, then anywhere), at most ``limit``: what to put in a ``sae_feature`` spec. The
    labels are read from the file's header, not its weights. A dictionary without labels answers no matches
    and a ``note``. Authenticated like ``/generate``."""
    service: Service = request.app.state.service
    return JSONResponse(await service.search_features(sae, q, limit))
