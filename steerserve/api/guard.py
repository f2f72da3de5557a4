"""What every HTTP request meets first: the key checks and the body-size cap, before its body is read.

All are plain ASGI, ahead of routing and parsing, because all must hold before the server spends anything
on a body:
- a request under ``/admin`` without the right key is refused (401, or 403 when no key is configured)
  before a byte of its body is read, so an anonymous client cannot make the server read, let alone parse,
  an admin body;
- a generation request (``/generate``, ``/v1/...``, ``/features``, ``/features/search``) gets its policy
  from its client key, ``Authorization: Bearer <key>`` (``Service.policy_for``: no key, or the admin key, is
  the default policy; a key no policy binds is a 401). The route reads the policy with ``policy_of``;
- a body is at most ``max_upload_bytes`` for ``POST /admin/vectors`` and ``max_body_bytes`` on every other
  route (413). A declared Content-Length over the limit is refused without reading anything; a body sent
  without one (chunked) is counted as it arrives and refused as soon as it passes the limit.

A refusal sent while body bytes are still to come carries ``Connection: close``, so that the server drops
the connection rather than drain an upload nobody will use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steerserve.api.admin import admin_refusal
from steerserve.api.streaming import error_body
from steerserve.config import Settings
from steerserve.errors import SteerError
from steerserve.store.policies import Policy

PolicyFor = Callable[[str | None], Awaitable[Policy]]


class BodyTooLarge(Exception):
    """Raised from ``receive`` once the body passes its limit, to stop whatever is reading it."""


def _refusal(status: int, message: str, code: str, headers: dict[str, str], close: bool) -> JSONResponse:
    if close:
        headers = {**headers, "Connection": "close"}
    return JSONResponse(error_body(status, message, None, code), status_code=status, headers=headers)


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    # A malformed value is the HTTP server's to refuse; here the body is simply counted instead.
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


def client_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header; None without one (or with an empty key)."""
    if authorization is None or not authorization.strip():
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise SteerError("send the API key as 'Authorization: Bearer <key>'", status=401, code="invalid_api_key")
    return token.strip() or None


def is_generation(path: str) -> bool:
    """The routes a client key's policy governs."""
    return path in ("/generate", "/features", "/features/search") or path.startswith("/v1/")


def policy_of(request: Request) -> Policy:
    """The policy ``EdgeGuard`` found for this request (a KeyError, hence a 500, if it did not run)."""
    policy: Policy = request.scope["state"]["policy"]
    return policy


class EdgeGuard:
    """Refuses unauthorized requests and oversized bodies, finds a generation request's policy; see the
    module docstring."""

    def __init__(self, app: ASGIApp, settings: Settings, policy_for: PolicyFor) -> None:
        self.app, self.settings, self.policy_for = app, settings, policy_for

    def body_limit(self, scope: Scope) -> int:
        if scope["method"] == "POST" and scope["path"] == "/admin/vectors":
            return self.settings.max_upload_bytes
        return self.settings.max_body_bytes

    def _too_large(self, limit: int) -> JSONResponse:
        return _refusal(413, f"the request body is larger than this route's limit of {limit} bytes", "too_large",
                        {}, close=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = _content_length(headers)
        path: str = scope["path"]
        refusal: SteerError | None = None
        if path == "/admin" or path.startswith("/admin/"):
            refusal = admin_refusal(self.settings.admin_key, headers.get("authorization", ""))
        elif is_generation(path):
            try:
                policy = await self.policy_for(client_key(headers.get("authorization")))
                scope.setdefault("state", {})["policy"] = policy
            except SteerError as exc:
                refusal = exc
        if refusal is not None:
            body_coming = bool(declared) or "transfer-encoding" in headers
            auth = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else {}
            retry_after = getattr(refusal, "retry_after", None)  # a key over its rate limit
            if retry_after is not None:
                auth["Retry-After"] = str(retry_after)
            await _refusal(refusal.status, str(refusal), refusal.code, auth, body_coming)(scope, receive, send)
            return
        limit = self.body_limit(scope)
        if declared is not None and declared > limit:
            await self._too_large(limit)(scope, receive, send)
            return

        received = 0
        overflow = started = False

        async def counted_receive() -> Message:
            nonlocal received, overflow
            if overflow:  # a reader that carries on after the failed read learns the request is over
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflow = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflow and not started:  # the app answering its failed read: the answer is the 413 below
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not overflow:
                raise
        if overflow and not started:
            await self._too_large(limit)(scope, receive, send)
