"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Bodies are what the official client sends, plus ``steering`` (``extra_body={"steering": {...}}``).
Unknown fields are accepted and ignored; known fields with values this server cannot honour are refused
with a 400 naming the field. As on vLLM's server: ``n`` choices, ``logprobs``/``top_logprobs``, presence and
frequency penalties, ``logit_bias``, and (vllm engine only, through vLLM's own guided decoding)
``response_format`` JSON and forced tool calls (``api.structured``); with ``serve --tool-call-parser``,
``tool_choice: "auto"`` calls read out of the reply by vLLM's parser (``api.tool_parsing``). Responses are
OpenAI's shapes with one extra field, ``steering``, reporting what was applied (clients ignore unknown
fields). In a stream it rides on the first chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, replace
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
from steerserve.api.logprobs import chat_logprobs, completion_logprobs
from steerserve.api.schemas import ChatCompletionRequest, CompletionBase, CompletionRequest
from steerserve.api.streaming import (
    Metrics,
    SSEResponse,
    Tally,
    check_steering_text,
    checked_outputs,
    collect,
    merged,
    sse_events,
    steering_report,
    until_disconnect,
)
from steerserve.api.structured import ToolMode, constraint, tool_calls
from steerserve.api.tool_parsing import ToolParsing, ToolReader
from steerserve.concurrency import gather_all
from steerserve.engines.base import SamplingParams, Structured
from steerserve.errors import SteerError
from steerserve.prompts import PromptRenderer
from steerserve.service import Service, Submitted
from steerserve.spec import PromptInfo

router = APIRouter(prefix="/v1", tags=["openai"])


def _model_card(request: Request) -> dict[str, Any]:
    service: Service = request.app.state.service
    return {"id": service.info.name, "object": "model", "created": request.app.state.created,
            "owned_by": "steerserve"}


# A client key's policy (and rate) governs every /v1 route: its 401 and 429 come before routing (guard.EdgeGuard).
@router.get("/models", response_model=None, responses={200: {"model": ModelList}, **errors(401, 429)})
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/models/{model:path}", response_model=None, responses={200: {"model": ModelCard}, **errors(401, 404, 429)})
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


@dataclass(frozen=True)
class _Call:
    """One OpenAI request: its ``n`` submitted choices, and how to shape the reply."""

    subs: list[Submitted]
    head: dict[str, Any]  # id, object, created, model, system_fingerprint
    logprobs: bool
    tools: ToolMode | None
    renderer: PromptRenderer
    readers: list[ToolReader] | None = None  # one per choice, when the reply may be tool calls


async def _submit(request: Request, body: CompletionBase, prompt_fn: Callable[[Service], PromptInfo],
                  max_tokens: int | None, max_field: str, logprobs: int | None,
                  structured: Structured | None = None) -> list[Submitted]:
    """Check and queue the body's ``n`` choices (a seeded request's choice ``i`` uses seed + i)."""
    service: Service = request.app.state.service
    _check_model(body.model, service)
    body.unsupported()
    check_steering_text(body.steering, service.settings.max_prompt_chars, service.settings.max_interventions)
    prompt = await asyncio.to_thread(prompt_fn, service)  # tokenizing is CPU work: keep the event loop free
    subs: list[Submitted] = []
    try:
        with _renamed("max_tokens", max_field):
            sampling: SamplingParams = service.sampling(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                stop=body.stop, ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, logit_bias=body.logit_bias, logprobs=logprobs,
                structured=structured)
            for i in range(body.n or 1):
                seed = None if sampling.seed is None else (sampling.seed + i + 2**63) % 2**64 - 2**63
                subs.append(await service.submit(prompt, replace(sampling, seed=seed), body.steering,
                                                 policy=policy_of(request), timeout=body.timeout))
    except BaseException:
        for sub in subs:  # queued choices of a request that fails as a whole
            await sub.outputs.aclose()
        raise
    metrics: Metrics = request.app.state.metrics
    for sub in subs:
        metrics.accepted(sub)
    return subs


def _include_usage(body: CompletionBase) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _usage(tallies: Sequence[Tally]) -> dict[str, int]:
    """One prompt, every choice's tokens (OpenAI counts ``n`` choices this way)."""
    prompt, completion = tallies[0].prompt_tokens, sum(t.completion_tokens for t in tallies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _collect_all(request: Request, call: _Call) -> list[tuple[str, Tally]]:
    """Every choice's text and tally; a client that leaves cancels (and so aborts) them all."""
    metrics: Metrics = request.app.state.metrics

    async def run() -> list[tuple[str, Tally]]:
        try:
            return await gather_all(collect(sub, metrics) for sub in call.subs)
        finally:
            for sub in call.subs:  # those never started too: each holds its place in the server until closed
                await sub.outputs.aclose()

    return await until_disconnect(request.receive, run)


@router.post("/chat/completions", response_model=None,
             responses={**streamed(ChatCompletion, ChatCompletionChunk), **errors(404)})
async def chat_completions(body: Annotated[ChatCompletionRequest, Body(openapi_examples=CHAT_EXAMPLES)],
                           request: Request) -> Response:
    max_tokens, max_field = body.max_new_tokens()
    parsing: ToolParsing = request.app.state.tool_parsing
    structured, tools = constraint(body.response_format, body.tools, body.tool_choice, parsing.name)
    tool_defs = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    subs = await _submit(request, body, lambda s: s.render(messages=body.plain_messages(), tools=tool_defs),
                         max_tokens, max_field, body.logprob_count(), structured)
    call = _call(request, subs, "chatcmpl", "chat.completion", body.logprobs or False, tools)
    if tools is not None and (tools.auto or body.stream):  # what vLLM's own code reads (api.tool_parsing)
        call = replace(call, readers=[parsing.reader(tools, tool_defs or []) for _ in subs])
    if body.stream:
        return SSEResponse(sse_events(_chat_chunks(call, _include_usage(body), request.app.state.metrics),
                                      subs[0].request_id))
    results = await _collect_all(request, call)
    return JSONResponse({**call.head, "choices": [_chat_choice(call, i, text, tally)
                                                  for i, (text, tally) in enumerate(results)],
                         "usage": _usage([t for _, t in results]), "steering": steering_report(subs[0], results[0][1])})


def _call(request: Request, subs: list[Submitted], prefix: str, kind: str, logprobs: bool,
          tools: ToolMode | None = None) -> _Call:
    service: Service = request.app.state.service
    head = {"id": f"{prefix}-{subs[0].request_id}", "object": kind, "created": int(time.time()),
            "model": service.info.name, "system_fingerprint": None}
    return _Call(subs, head, logprobs, tools, service.renderer)


def _chat_choice(call: _Call, index: int, text: str, tally: Tally) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish = tally.finish_reason
    if call.tools is not None and call.tools.auto and call.readers is not None:  # the parser's calls, if any
        content, calls = call.readers[index].parse(text)
        if calls is not None:
            message, finish = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    elif call.tools is not None and finish == "stop":
        calls = tool_calls(text, call.tools)
        if calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "tool_calls" if call.tools.function is None else "stop"  # a named function is forced: OpenAI's
    lp = chat_logprobs(call.renderer, tally.logprobs) if call.logprobs else None
    return {"index": index, "message": message, "logprobs": lp, "finish_reason": finish}


async def _chat_chunks(call: _Call, include_usage: bool, metrics: Metrics) -> AsyncGenerator[dict[str, Any], None]:
    usage: dict[str, Any] = {"usage": None} if include_usage else {}
    tallies = [Tally(len(sub.prompt.token_ids)) for sub in call.subs]
    head = {**call.head, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
                **usage}

    for i in range(len(call.subs)):
        first = {"steering": steering_report(call.subs[0])} if i == 0 else {}
        yield {**chunk(i, {"role": "assistant", "content": ""}), **first}

    named = call.tools is not None and call.tools.function is not None

    async def choice(i: int) -> AsyncGenerator[dict[str, Any], None]:
        reader = call.readers[i] if call.readers is not None else None
        prompt_ids = call.subs[i].prompt.token_ids
        async with aclosing(checked_outputs(call.subs[i], tallies[i], metrics)) as outs:
            async for out in outs:
                lp = chat_logprobs(call.renderer, out.logprobs) if call.logprobs and out.logprobs else None
                if reader is not None:  # tool calls as vLLM's code finds them, as they come
                    delta = reader.feed(out.text, out.token_ids, prompt_ids, out.finish_reason is not None)
                else:
                    delta = {"content": out.text} if out.text or lp is not None else None
                if delta is not None or lp is not None:
                    yield chunk(i, delta or {}, lp=lp)
                if out.finish_reason is not None:  # OpenAI's: "tool_calls", but "stop" for a forced named call
                    called = reader is not None and reader.called and not named and out.finish_reason == "stop"
                    yield chunk(i, {}, "tool_calls" if called else out.finish_reason)

    async for c in merged([choice(i) for i in range(len(call.subs))]):
        yield c
    if include_usage:
        yield {**head, "choices": [], "usage": _usage(tallies)}


@router.post("/completions", response_model=None,
             responses={**streamed(Completion, CompletionChunk), **errors(404)})
async def completions(body: Annotated[CompletionRequest, Body(openapi_examples=COMPLETION_EXAMPLES)],
                      request: Request) -> Response:
    subs = await _submit(request, body, lambda s: s.render(prompt=body.prompt_text()), body.max_tokens, "max_tokens",
                         body.logprobs)
    call = _call(request, subs, "cmpl", "text_completion", body.logprobs is not None)
    if body.stream:
        return SSEResponse(sse_events(_completion_chunks(call, _include_usage(body), request.app.state.metrics),
                                      subs[0].request_id))
    results = await _collect_all(request, call)
    choices = [{"index": i, "text": text, "finish_reason": tally.finish_reason,
                "logprobs": completion_logprobs(call.renderer, tally.logprobs) if call.logprobs else None}
               for i, (text, tally) in enumerate(results)]
    return JSONResponse({**call.head, "choices": choices, "usage": _usage([t for _, t in results]),
                         "steering": steering_report(subs[0], results[0][1])})


async def _completion_chunks(call: _Call, include_usage: bool,
                             metrics: Metrics) -> AsyncGenerator[dict[str, Any], None]:
    usage: dict[str, Any] = {"usage": None} if include_usage else {}
    tallies = [Tally(len(sub.prompt.token_ids)) for sub in call.subs]
    sent = [False]

    async def choice(i: int) -> AsyncGenerator[dict[str, Any], None]:
        offset = 0
        async with aclosing(checked_outputs(call.subs[i], tallies[i], metrics)) as outs:
            async for out in outs:
                if out.text or out.finish_reason is not None:
                    lp = completion_logprobs(call.renderer, out.logprobs, offset) if call.logprobs else None
                    offset += sum(len(t) for t in (lp or {}).get("tokens", ()))
                    yield {**call.head, "choices": [{"index": i, "text": out.text, "logprobs": lp,
                                                     "finish_reason": out.finish_reason}], **usage}

    async for c in merged([choice(i) for i in range(len(call.subs))]):
        if not sent[0]:  # the first chunk of the response carries what was applied
            c, sent[0] = {**c, "steering": steering_report(call.subs[0])}, True
        yield c
    if include_usage:
        yield {**call.head, "choices": [], "usage": _usage(tallies)}
