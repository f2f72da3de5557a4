"""The FastAPI application: routes, the one error mapping, metrics, and the engine's lifetime.

Every error leaves in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
``SteerError`` -> its own status and field; a body that does not parse -> 400 naming the dotted field;
an unknown route -> 404; a body over the route's limit -> 413, and an admin request without the key ->
401/403, both before the body is read (``guard.EdgeGuard``); anything unexpected -> 500 with a generic
message (traceback in the log). The OpenAPI document lists exactly these (``apidoc``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steerserve import __version__
from steerserve.api import (
    admin_audit,
    admin_pairs,
    admin_policies,
    admin_vectors,
    apidoc,
    document,
    native,
    openai,
    playground,
)
from steerserve.api.admin_audit import AuditMiddleware
from steerserve.api.guard import EdgeGuard
from steerserve.api.streaming import ClientGone, Metrics, error_body
from steerserve.api.tool_parsing import ToolParsing
from steerserve.config import Settings
from steerserve.errors import SteerError
from steerserve.service import Service

log = logging.getLogger(__name__)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# How pydantic labels a union member in an error location (``stop.str``, ``content.list[ContentPart]``):
# not part of the client's field path.
_UNION_TAG = re.compile(r"(str|int|float|bool|bytes|none|[a-z-]+\[.*\]|constrained-[a-z]+|[A-Z][A-Za-z0-9_]*)")


def _loc_param(loc: Sequence[Any], unions: bool) -> str | None:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    if unions:
        parts = [p for p in parts if not (isinstance(p, str) and _UNION_TAG.fullmatch(p))]
    return ".".join(str(p) for p in parts) or None


def validation_error(errors: Sequence[Any]) -> JSONResponse:
    """400 for the first problem pydantic found, ``param`` its dotted location (``messages.0.content``).

    A value that fits no member of a union gets one error per member: the deepest one under the first
    error's field names the field, and the members' messages are joined.
    """
    if not errors:
        return error_response(400, "invalid request body", None, "invalid_request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        loc = tuple(first.get("loc") or ())  # FastAPI's: ("body", offset); pydantic's own parser: ()
        where = f" (at character {loc[-1]})" if loc and isinstance(loc[-1], int) else ""
        return error_response(400, f"request body is not valid JSON: {detail}{where}", None, "invalid_json")
    unions = len(errors) > 1
    param = _loc_param(first.get("loc", ()), unions)
    msgs = [str(first.get("msg", "invalid value"))]
    if unions:
        related = [(e, _loc_param(e.get("loc", ()), True)) for e in errors]
        related = [(e, p) for e, p in related if p == param or (p or "").startswith(f"{param}.")]
        deepest, deepest_param = max(related, key=lambda ep: len(ep[1] or ""), default=(first, param))
        if deepest_param != param:
            first, param, msgs = deepest, deepest_param, [str(deepest.get("msg", "invalid value"))]
        else:
            msgs = list(dict.fromkeys(str(e.get("msg", "")) for e, p in related if p == param))
    msg = msgs[0] + "".join(f" or {m[:1].lower()}{m[1:]}" for m in msgs[1:])
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    if param is None:
        msg = "a JSON object body is required" if first.get("type") == "missing" else f"request body: {msg}"
    return error_response(400, f"{param}: {msg}" if param else msg, param, str(first.get("type") or "invalid"))


class EdgeMiddleware:
    """Counts every response by route and status, and turns an unhandled exception into a generic 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                route = scope.get("route")
                label = getattr(route, "path", None) or "unmatched"
                self.metrics.requests.labels(label, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await error_response(500, "internal server error", None, "internal_error")(scope, receive, counted)


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods the request's path supports (RFC 9110's ``Allow`` for a 405), as OpenAPI matches a path:
    a concrete path's routes before a templated one's (``/admin/vectors/compute`` is not
    ``/admin/vectors/{name}``). Starlette's own names the first route it tried only."""
    found: list[tuple[int, set[str]]] = []
    for route in app.router.routes:
        match, _ = route.matches({**scope, "method": ""})  # no route serves "": a path match is partial
        methods = getattr(route, "methods", None)
        if match != Match.NONE and methods:
            found.append((len(getattr(route, "param_convertors", {})), set(methods)))
    fewest = min((params for params, _ in found), default=0)
    allowed = set().union(*(methods for params, methods in found if params == fewest))
    return sorted(allowed, key=lambda m: (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else len(_METHOD_ORDER), m))


_METHOD_ORDER = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


def create_app(service: Service, settings: Settings) -> FastAPI:
    """The HTTP server for ``service``. Its lifespan starts and stops the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="steerserve", version=__version__, lifespan=lifespan, responses=apidoc.APP_ERRORS)
    document.install_openapi(app, settings, service.info.num_layers)
    metrics = Metrics()
    app.state.service = service
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.created = int(time.time())
    app.state.tool_parsing = ToolParsing(service.settings.tool_call_parser, service.renderer.tokenizer,
                                         service.info.name)

    @app.exception_handler(SteerError)
    async def steer_error(request: Request, exc: SteerError) -> Response:
        if exc.status >= 500:
            log.error("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        retry_after = getattr(exc, "retry_after", None)  # EngineUnavailable: when to try again
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        return error_response(exc.status, str(exc), exc.field, exc.code, headers or None)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        return validation_error(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        if status == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        headers = dict(exc.headers) if exc.headers else {}
        if status == 405:  # Starlette's names the first route on the path only, not every one it has
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return error_response(status, message, None, code, headers or None)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.get("/health", response_model=None, responses={200: {"model": apidoc.Health}, **apidoc.errors(503)})
    async def health() -> Response:
        if await service.healthy():
            return JSONResponse({"status": "ok"})
        return error_response(503, "the engine is not running", None, "unavailable")

    @app.get("/ready", response_model=None, responses={200: {"model": apidoc.Ready}, **apidoc.errors(503)})
    async def ready() -> Response:
        if await service.healthy():
            return JSONResponse({"status": "ready", "model": service.info.name})
        return error_response(503, "the engine is not running", None, "unavailable")

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        metrics.set_engine({"restarts": service.supervisor.restarts})
        if await service.healthy():
            try:  # a scrape must not hang on a busy or wedged engine
                stats = await asyncio.wait_for(service.engine.stats(), timeout=5)
                metrics.set_engine({**stats, "loop_requests": service.loops.in_use,
                                    "pending_requests": service.admission.pending})
            except (asyncio.TimeoutError, RuntimeError) as exc:
                log.warning("engine stats unavailable: %r", exc)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(admin_vectors.router)
    app.include_router(admin_pairs.router)
    app.include_router(admin_audit.router)
    app.include_router(admin_policies.router)
    app.include_router(playground.router)
    app.add_middleware(EdgeGuard, settings=settings, policy_for=service.policy_for)
    # Outside the guard: the audit log records what the client was answered, the guard's 413 included.
    app.add_middleware(AuditMiddleware, audit=service.store.audit, admin_key=settings.admin_key)
    app.add_middleware(EdgeMiddleware, metrics=metrics)  # added last: outermost, so it counts the guard's refusals
    return app
