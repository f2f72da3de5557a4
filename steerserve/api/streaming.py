"""What the generation routes share: the error body, the metrics, consuming a request's outputs, and SSE.

Every consumer of ``Submitted.outputs`` goes through ``checked_outputs`` inside ``aclosing``: the engine's
iterator is always closed (closing it aborts the request in the engine), an engine failure becomes a
``GenerationFailed`` and the generated tokens are counted once. ``SSEResponse`` watches for the client
going away and then cancels and closes its event iterator, which closes the engine's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from steerserve.engines.base import GenerationOutput, TokenLogprob
from steerserve.errors import EngineUnavailable, SteerError
from steerserve.service import Submitted

log = logging.getLogger(__name__)
T = TypeVar("T")

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


def error_type(status: int) -> str:
    return "server_error" if status >= 500 else ERROR_TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The one error shape, OpenAI's: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


class GenerationFailed(SteerError):
    """The engine failed or aborted a request after it was accepted. A 503 (the engine died, or the server is
    stopping) carries ``Retry-After``, as the 503 of a request refused while the engine restarts does."""

    retry_after: int | None = None

    def __init__(self, message: str, *, status: int, code: str, field: str | None = None) -> None:
        super().__init__(message, status=status, code=code, field=field)
        if status == 503:
            self.retry_after = EngineUnavailable.retry_after


class Metrics:
    """Prometheus counters for one app (own registry: no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("steerserve_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.tokens = Counter("steerserve_generated_tokens", "Completion tokens generated",
                              registry=self.registry)
        self.steered = Counter("steerserve_steered_requests", "Generation requests with at least one intervention",
                               registry=self.registry)
        self.generations = Counter("steerserve_generation_requests", "Generation requests accepted by the engine",
                                   registry=self.registry)
        self.engine = Gauge("steerserve_engine", "Engine now: requests running, steered requests holding bank "
                            "rows, and the vector bank's pinned/cached rows, capacity, compactions", ["what"],
                            registry=self.registry)

    def set_engine(self, stats: Mapping[str, int]) -> None:
        for key, value in stats.items():
            self.engine.labels(key).set(value)

    def accepted(self, sub: Submitted) -> None:
        self.generations.inc()
        if sub.resolved.applied:
            self.steered.inc()


def check_steering_text(steering: Any, limit: int, max_interventions: int) -> None:
    """Refuse an intervention's text parameter longer than ``limit`` characters, naming it.

    Methods tokenize their text parameters (ActAdd's prompt pair) while the spec is resolved, on the event
    loop, and tokenizing costs time in proportion to the text: it is bounded here first, like the prompt.
    Only the first ``max_interventions`` are looked at: a spec with more is refused before any is resolved.
    The spec's own parser reports a malformed ``steering``.
    """
    items = steering.get("interventions") if isinstance(steering, Mapping) else None
    if not isinstance(items, list):
        return
    for i, item in enumerate(items[:max_interventions]):
        for key, value in item.items() if isinstance(item, Mapping) else ():
            if isinstance(value, str) and len(value) > limit:
                raise SteerError(f"is {len(value)} characters; the limit is {limit}",
                                 field=f"steering.interventions.{i}.{key}", code="too_long")


def steering_report(sub: Submitted, tally: Tally | None = None) -> dict[str, Any]:
    """``{"applied": [...]}``, plus ``"report"`` once a closed-loop request has finished (what its loop
    measured: mean next-token entropy, steps, final gain). A policy's mandatory interventions are marked
    ``"mandatory": true`` with the policy's name."""
    out: dict[str, Any] = {"applied": [
        {"method": a.method, "artifacts": list(a.artifacts), "detail": dict(a.detail),
         "mandatory": a.policy is not None, **({"policy": a.policy} if a.policy is not None else {})}
        for a in sub.resolved.applied]}
    if tally is not None and tally.report:
        out["report"] = dict(tally.report)
    return out


@dataclass
class Tally:
    """What a request has produced so far."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    report: Mapping[str, Any] | None = None  # a closed-loop request's measurements, with its last output
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per token, when the request asked for them

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def checked_outputs(sub: Submitted, tally: Tally, metrics: Metrics) -> AsyncGenerator[GenerationOutput, None]:
    """``sub.outputs`` with failures raised, ``tally`` kept current, and the engine iterator always closed."""
    outputs = sub.outputs
    try:
        async for out in outputs:
            tally.completion_tokens = out.completion_tokens
            if out.prompt_tokens:
                tally.prompt_tokens = out.prompt_tokens
            error = out.extra.get("error")
            if error:
                status = int(out.extra.get("status", 500))  # type: ignore[call-overload]
                log.log(logging.ERROR if status >= 500 else logging.WARNING, "request %s failed in the engine: %s",
                        sub.request_id, error)
                # A client's own fault (4xx: its steering overflowed) and a dead engine (503) say what
                # happened; anything else is an internal error whose details stay in the log.
                shown = status < 500 or status == 503
                message = str(error) if shown else "generation failed in the engine; see the server log"
                raise GenerationFailed(message, status=status, code=str(out.extra.get("code", "generation_failed")),
                                       field=str(out.extra.get("field", "steering")) if status < 500 else None)
            if out.finish_reason == "abort":
                raise GenerationFailed("the request was aborted (the server may be shutting down)", status=503,
                                       code="aborted")
            tally.finish_reason = out.finish_reason
            tally.logprobs.extend(out.logprobs)
            report = out.extra.get("report")
            if isinstance(report, Mapping):
                tally.report = report
            yield out
    finally:
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()
        metrics.tokens.inc(tally.completion_tokens)


async def collect(sub: Submitted, metrics: Metrics) -> tuple[str, Tally]:
    tally = Tally(len(sub.prompt.token_ids))
    parts = []
    async with aclosing(checked_outputs(sub, tally, metrics)) as outs:
        async for out in outs:
            parts.append(out.text)
    return "".join(parts), tally


async def merged(streams: Sequence[AsyncGenerator[T, None]]) -> AsyncGenerator[T, None]:
    """Items of all ``streams`` as they come (one task each); the first failure ends them all. Every stream
    is closed on the way out, so each request's engine iterator is closed (aborting what is unfinished)."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[T, None]) -> None:
        try:
            async for item in stream:
                await queue.put((0, item))
            await queue.put((1, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((2, exc))

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            kind, item = await queue.get()
            if kind == 2:
                raise item
            left -= kind
            if kind == 0:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected before the response was complete."""


async def until_disconnect(receive: Receive, fn: Callable[[], Awaitable[T]]) -> T:
    """``await fn()``, cancelled if the client disconnects first (then ``ClientGone``).

    Exceptions from ``fn`` come out as they are, never wrapped in an exception group.
    """
    value: list[T] = []
    error: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            try:
                await _wait_disconnect(receive)
            except Exception:  # cannot watch: just let fn run to its end
                return
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            value.append(await fn())
        except Exception as exc:
            error.append(exc)
        tg.cancel_scope.cancel()
    if error:
        raise error[0]
    if not value:
        raise ClientGone()
    return value[0]


async def collect_while_connected(request: Request, sub: Submitted, metrics: Metrics) -> tuple[str, Tally]:
    """``collect``, cancelled (and so aborted in the engine) if the client disconnects meanwhile."""
    return await until_disconnect(request.receive, lambda: collect(sub, metrics))


def sse(data: Mapping[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, default=str)
    return f"data: {text}\n\n"


async def sse_events(events: AsyncGenerator[Mapping[str, Any], None], request_id: str) -> AsyncGenerator[str, None]:
    """Encode ``events`` as SSE ``data:`` lines and end with ``[DONE]``; a failure mid-stream becomes an
    error event in the one error shape (the status line has already gone out)."""
    try:
        async with aclosing(events) as it:
            async for event in it:
                yield sse(event)
    except SteerError as exc:
        yield sse(error_body(exc.status, str(exc), exc.field, exc.code))
    except Exception:
        log.exception("stream %s failed", request_id)
        yield sse(error_body(500, "internal server error", None, "internal_error"))
    yield sse("[DONE]")


class SSEResponse(StreamingResponse):
    """``text/event-stream`` that stops (cancelling and closing its iterator) as soon as the client leaves.

    Starlette's own StreamingResponse only notices a gone client at the next write under ASGI 2.4; a
    request still waiting in the engine's queue would then hold its place until its first token.
    """

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_disconnect(receive, stream)
        except (ClientGone, OSError):  # the client went away: nothing more to say
            pass
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
