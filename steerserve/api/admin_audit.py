"""The audit log at the edge: every admin request leaves one entry (``store.audit``); ``GET /admin/audit``.

``AuditMiddleware`` is the one hook. It wraps the app outside ``guard.EdgeGuard``, so it records what the
client was really answered (a body cut off at the size limit is the guard's 413, not the route's failed
read), and it logs a request only if it carries the admin key: anonymous clients cannot write to the log
(their 401/403 is not logged), while an admin request refused before routing (a declared body over the
limit) is. The entry is written before the last byte of the response is sent, so a client that has its
answer finds the entry.

What goes in an entry: the action (``upload`` and ``compute`` for those POSTs, else the method's verb:
``read``, ``create``, ``update``, ``delete``; a route may say better, ``enable``/``disable``); the route
(its path template, e.g. ``DELETE /admin/vectors/{name}``); for a success, the artifacts the response
names (their refs, kinds and sha256s); for a refusal, the status, field and message the client got and
what the request named (the path's ``name``, or what the route noted: an upload's name and the sha256 of
its bytes). Routes add what only they know through ``audit_note(request)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from steerserve.api.admin import admin_refusal, admin_router, run_sync, service_of
from steerserve.store.audit import ACTING, Acting, AuditEntry, AuditLog, actor_id
from steerserve.store.db import REF_RE

log = logging.getLogger(__name__)

STATE_KEY = "steerserve.audit"  # the request's AuditNote in scope["state"] (what ``request.state`` reads)
_ACTIONS = {("POST", "/admin/vectors"): "upload", ("POST", "/admin/vectors/compute"): "compute"}
_VERBS = {"GET": "read", "HEAD": "read", "POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}
_BODY_CAP = 1 << 20  # bytes of a response read back for the entry: errors and artifact metadata are small


@dataclass
class AuditNote:
    """What a route knows that its response does not say. Mutable: the route fills it in as it goes, so
    that a refusal half-way (an upload failing vetting) still leaves the name and sha256 it got to."""

    action: str | None = None
    name: str | None = None
    kind: str | None = None
    sha256: str | None = None


def audit_note(request: Request) -> AuditNote:
    """The request's note (a detached one where nothing audits the request)."""
    note = request.scope.get("state", {}).get(STATE_KEY)
    return note if isinstance(note, AuditNote) else AuditNote()


def _split_ref(ref: str | None) -> tuple[str | None, int | None]:
    m = REF_RE.fullmatch(ref) if ref else None
    if m is None:
        return ref, None
    return m["name"], int(m["version"]) if m["version"] else None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _artifacts(obj: Any) -> tuple[dict[str, Any], ...]:
    """The artifacts a success response names: an artifact (``ref``), or a list of them (``data``)."""
    items = [obj] if isinstance(obj, dict) and "ref" in obj else obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        return ()
    return tuple({"ref": d["ref"], "kind": d.get("kind"), "sha256": d.get("sha256")} for d in items
                 if isinstance(d, dict) and isinstance(d.get("ref"), str))


def build_entry(scope: Scope, actor: str, note: AuditNote, status: int, body: bytes) -> AuditEntry:
    """The entry for one finished admin request (``body``: the response's, when kept)."""
    method, route = scope["method"], getattr(scope.get("route"), "path", None) or scope["path"]
    action = note.action or _ACTIONS.get((method, route)) or _VERBS.get(method, method.lower())
    obj = _json(body) if body else None
    field = reason = None
    artifacts: tuple[dict[str, Any], ...] = ()
    if status >= 400:
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict):
            field, reason = err.get("param"), err.get("message")
    elif method != "GET":  # a read names what it read in its route and path; only changes are listed
        artifacts = _artifacts(obj)
    name, version = _split_ref(note.name or scope.get("path_params", {}).get("name"))
    kind, sha256 = note.kind, note.sha256
    if artifacts:
        names = {_split_ref(a["ref"])[0] for a in artifacts}
        kinds = {a["kind"] for a in artifacts}
        name = names.pop() if len(names) == 1 else None
        kind = kinds.pop() if len(kinds) == 1 else None
        if len(artifacts) == 1:
            version, sha256 = _split_ref(artifacts[0]["ref"])[1], artifacts[0]["sha256"]
        else:
            version, sha256 = None, None
    return AuditEntry(actor=actor, action=action, route=f"{method} {route}", status=status, name=name,
                      version=version, kind=kind, sha256=sha256, artifacts=artifacts, field=field, reason=reason)


class AuditMiddleware:
    """Logs every request under ``/admin`` that carries the admin key; see the module docstring."""

    def __init__(self, app: ASGIApp, audit: AuditLog, admin_key: str | None) -> None:
        self.app, self.audit, self.admin_key = app, audit, admin_key

    async def _write(self, entry: AuditEntry) -> None:
        try:
            await asyncio.to_thread(self.audit.record, entry)
        except Exception:  # the action itself is done (or refused): its answer still goes out
            log.exception("audit: could not record %s", entry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        admin = path == "/admin" or path.startswith("/admin/")
        authorization = Headers(scope=scope).get("authorization", "") if admin else ""
        if not admin or admin_refusal(self.admin_key, authorization) is not None:
            await self.app(scope, receive, send)
            return
        actor = actor_id(authorization.partition(" ")[2].strip())
        note = AuditNote()
        scope.setdefault("state", {})[STATE_KEY] = note
        status, keep, body, written = 500, False, bytearray(), False

        def describe() -> tuple[str, str]:  # the action and route, as ``build_entry`` names them
            entry = build_entry(scope, actor, note, 201, b"")
            return entry.action, entry.route

        # A store commit for this request writes its entry in the commit's own transaction (``store.audit``).
        acting = Acting(actor, describe)
        token = ACTING.set(acting)

        async def audited_send(message: Message) -> None:
            nonlocal status, keep, written
            if message["type"] == "http.response.start":
                status = message["status"]
                keep = status >= 400 or scope["method"] != "GET"
            elif message["type"] == "http.response.body" and not written:
                if keep and len(body) < _BODY_CAP:
                    body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    written = True
                    if acting.recorded is None or status >= 400:  # else recorded with the artifact already
                        await self._write(build_entry(scope, actor, note, status, bytes(body)))
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except BaseException as exc:
            if not written:  # unhandled: the outer middleware answers 500; cancelled: nobody is answered (499)
                written = True
                await self._write(build_entry(scope, actor, note, 500 if isinstance(exc, Exception) else 499, b""))
            raise
        finally:
            ACTING.reset(token)


# ---- GET /admin/audit --------------------------------------------------------------------------------

router = admin_router()


class AuditEntryOut(BaseModel):
    """One entry, for the OpenAPI document (as ``apidoc``'s models: never used to validate a response)."""

    model_config = ConfigDict(extra="allow")

    id: int
    at: str  # ISO-8601 UTC
    actor: str  # "admin:<first 8 hex of sha256(key)>"
    action: str
    route: str
    name: str | None
    version: int | None
    kind: str | None
    sha256: str | None
    artifacts: list[dict[str, Any]]
    outcome: Literal["ok", "refused", "failed"]
    status: int
    field: str | None
    reason: str | None


class AuditList(BaseModel):
    model_config = ConfigDict(extra="allow")

    object: Literal["list"]
    data: list[AuditEntryOut]


Filter = Annotated[str | None, Query(min_length=1, max_length=256, description="exact match")]


@router.get("/audit", response_model=None, responses={200: {"model": AuditList}})
async def list_audit(request: Request, limit: int = Query(100, ge=1, le=1000),
                     before: int | None = Query(None, ge=1, description="only entries older than this id"),
                     action: Filter = None, name: Filter = None, kind: Filter = None,
                     outcome: Literal["ok", "refused", "failed"] | None = None,
                     actor: Filter = None) -> dict[str, Any]:
    """The audit log, newest first: at most ``limit`` entries matching every filter given."""
    entries = await run_sync(service_of(request).store.audit.entries, limit=limit, before=before, action=action,
                             name=name, kind=kind, outcome=outcome, actor=actor)
    return {"object": "list", "data": [e.to_dict() for e in entries]}
