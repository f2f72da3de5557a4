"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Bodies are what the official client sends, plus ``steering`` (``extra_body={"steering": {...}}``).
Unknown fields are accepted and ignored; known fields with values this server cannot honour (``n`` > 1,
``logprobs``, penalties, tools, ...) are refused with a 400 naming the field. Responses are OpenAI's
shapes with one extra field, ``steering``, reporting what was applied (clients ignore unknown fields).
In a stream it rides on the first chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from steerserve.api.apidoc import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ModelCard,
    ModelList,
    errors,
    streamed,
)
from steerserve.api.document import CHAT_EXAMPLES, COMPLETION_EXAMPLES
from steerserve.api.guard import policy_of
from steerserve.api.schemas import ChatCompletionRequest, CompletionBase, CompletionRequest
from steerserve.api.streaming import (
    Metrics,
    SSEResponse,
    Tally,
    check_steering_text,
    checked_outputs,
    collect_while_connected,
    sse_events,
    steering_report,
)
from steerserve.engines.base import SamplingParams
from steerserve.errors import SteerError
from steerserve.service import Service, Submitted
from steerserve.spec import PromptInfo

router = APIRouter(prefix="/v1", tags=["openai"])


def _model_card(request: Request) -> dict[str, Any]:
    service: Service = request.app.state.service
    return {"id": service.info.name, "object": "model", "created": request.app.state.created,
            "owned_by": "steerserve"}


@router.get("/models", response_model=None, responses={200: {"model": ModelList}, **errors(401)})
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/models/{model:path}", response_model=None, responses={200: {"model": ModelCard}, **errors(401, 404)})
async def get_model(model: str, request: Request) -> dict[str, Any]:
    _check_model(model, request.app.state.service)
    return _model_card(request)


def _check_model(model: str | None, service: Service) -> None:
    if model and model != service.info.name:  # omitted, null or "" all mean the served model
        raise SteerError(f"The model `{model}` does not exist. This server serves `{service.info.name}`.",
                         field="model", status=404, code="model_not_found")


@contextmanager
def _renamed(old: str, new: str) -> Iterator[None]:
    """Report a service error about ``old`` under the field name the client actually used."""
    try:
        yield
    except SteerError as exc:
        if exc.field == old and new != old:
            exc.field = new
        raise


async def _submit(request: Request, body: CompletionBase, prompt_fn: Callable[[Service], PromptInfo],
                  max_tokens: int | None, max_field: str) -> Submitted:
    service: Service = request.app.state.service
    _check_model(body.model, service)
    body.unsupported()
    check_steering_text(body.steering, service.settings.max_prompt_chars, service.settings.max_interventions)
    prompt = await asyncio.to_thread(prompt_fn, service)  # tokenizing is CPU work: keep the event loop free
    with _renamed("max_tokens", max_field):
        sampling: SamplingParams = service.sampling(max_tokens=max_tokens, temperature=body.temperature,
                                                    top_p=body.top_p, seed=body.seed, stop=body.stop,
                                                    ignore_eos=body.ignore_eos)
        sub = await service.submit(prompt, sampling, body.steering, policy=policy_of(request))
    metrics: Metrics = request.app.state.metrics
    metrics.accepted(sub)
    return sub


def _include_usage(body: CompletionBase) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post("/chat/completions", response_model=None,
             responses={**streamed(ChatCompletion, ChatCompletionChunk), **errors(404)})
async def chat_completions(body: Annotated[ChatCompletionRequest, Body(openapi_examples=CHAT_EXAMPLES)],
                           request: Request) -> Response:
    max_tokens, max_field = body.max_new_tokens()
    sub = await _submit(request, body, lambda s: s.render(messages=body.plain_messages()), max_tokens, max_field)
    service: Service = request.app.state.service
    metrics: Metrics = request.app.state.metrics
    cid, created, model = f"chatcmpl-{sub.request_id}", int(time.time()), service.info.name
    if body.stream:
        events = _chat_chunks(sub, cid, created, model, _include_usage(body), metrics)
        return SSEResponse(sse_events(events, sub.request_id))
    text, tally = await collect_while_connected(request, sub, metrics)
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": tally.finish_reason}],
        "usage": tally.usage(), "system_fingerprint": None, "steering": steering_report(sub, tally),
    })


async def _chat_chunks(sub: Submitted, cid: str, created: int, model: str, include_usage: bool,
                       metrics: Metrics) -> AsyncGenerator[dict[str, Any], None]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": None,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        if include_usage:
            out["usage"] = None
        return out

    yield chunk({"role": "assistant", "content": ""}, steering=steering_report(sub))
    tally = Tally(len(sub.prompt.token_ids))
    async with aclosing(checked_outputs(sub, tally, metrics)) as outs:
        async for out in outs:
            if out.text:
                yield chunk({"content": out.text})
            if out.finish_reason is not None:
                yield chunk({}, out.finish_reason)
    if include_usage:
        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": None, "choices": [], "usage": tally.usage()}


@router.post("/completions", response_model=None,
             responses={**streamed(Completion, CompletionChunk), **errors(404)})
async def completions(body: Annotated[CompletionRequest, Body(openapi_examples=COMPLETION_EXAMPLES)],
                      request: Request) -> Response:
    sub = await _submit(request, body, lambda s: s.render(prompt=body.prompt_text()), body.max_tokens, "max_tokens")
    service: Service = request.app.state.service
    metrics: Metrics = request.app.state.metrics
    cid, created, model = f"cmpl-{sub.request_id}", int(time.time()), service.info.name
    if body.stream:
        events = _completion_chunks(sub, cid, created, model, _include_usage(body), metrics)
        return SSEResponse(sse_events(events, sub.request_id))
    text, tally = await collect_while_connected(request, sub, metrics)
    return JSONResponse({
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": tally.finish_reason}],
        "usage": tally.usage(), "system_fingerprint": None, "steering": steering_report(sub, tally),
    })


async def _completion_chunks(sub: Submitted, cid: str, created: int, model: str, include_usage: bool,
                             metrics: Metrics) -> AsyncGenerator[dict[str, Any], None]:
    def chunk(text: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
        out = {"id": cid, "object": "text_completion", "created": created, "model": model,
               "system_fingerprint": None,
               "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}
        if include_usage:
            out["usage"] = None
        return out

    first = True
    tally = Tally(len(sub.prompt.token_ids))
    async with aclosing(checked_outputs(sub, tally, metrics)) as outs:
        async for out in outs:
            if out.text or out.finish_reason is not None:
                extra = {"steering": steering_report(sub)} if first else {}
                yield chunk(out.text, out.finish_reason, **extra)
                first = False
    if include_usage:
        yield {"id": cid, "object": "text_completion", "created": created, "model": model,
               "system_fingerprint": None, "choices": [], "usage": tally.usage()}
