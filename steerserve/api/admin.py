"""The admin API under ``/admin``: what its routes share (the key check, their router, artifact lookups).

Every route needs ``Authorization: Bearer <admin key>`` (``Settings.admin_key``). Without a configured
key the whole API answers 403; a missing or wrong key is a 401. The key is checked by ``guard.EdgeGuard``
before any byte of the body is read (and again, by the same rule, as the routers' dependency). Store calls,
body parsing and prompt tokenizing are synchronous and run in a worker thread (``run_sync``).

The routes are in ``admin_vectors`` (stored steering vectors), ``admin_pairs`` (ActAdd prompt pairs),
``admin_audit`` (the audit log, and the middleware that writes it) and ``admin_policies`` (policies and the
client API keys bound to them).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request

from steerserve.api.apidoc import ADMIN_ERRORS
from steerserve.config import Settings
from steerserve.errors import NotFound, SteerError
from steerserve.service import Service
from steerserve.store.artifacts import ArtifactMeta, ArtifactStore, parse_ref
from steerserve.store.db import NAME_RE

T = TypeVar("T")

DISABLED = "admin API disabled: set STEERSERVE_ADMIN_KEY (or --admin-key) to enable it"
# A path's artifact reference: "name" (every version / the latest) or "name@version".
REF_PATTERN = f"^{NAME_RE.pattern}(@[1-9][0-9]*)?$"
Ref = Annotated[str, Path(pattern=REF_PATTERN, description="'name' or 'name@version'")]
Version = Annotated[int | None, Query(ge=1, description="one version (default: every version)")]


def admin_refusal(key: str | None, authorization: str) -> SteerError | None:
    """Why a request with this ``Authorization`` header may not use the admin API, or None if it may."""
    if not key:
        return SteerError(DISABLED, status=403, code="admin_disabled")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        return SteerError("missing or invalid admin key: send 'Authorization: Bearer <key>'", status=401,
                          code="invalid_api_key")
    return None


def require_admin(request: Request) -> None:
    refusal = admin_refusal(request.app.state.settings.admin_key, request.headers.get("authorization", ""))
    if refusal is not None:
        raise refusal


def admin_router() -> APIRouter:
    """A router for admin routes: under ``/admin``, behind the key, documented with the admin errors."""
    return APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=ADMIN_ERRORS)


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def check_description(description: str, request: Request) -> None:
    """The server's own limit (the schema states the default one)."""
    limit = settings_of(request).max_description_chars
    if len(description) > limit:
        raise SteerError(f"is {len(description)} characters; the limit is {limit}", field="description",
                         code="too_long")


async def run_sync(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


def listing(metas: list[ArtifactMeta]) -> dict[str, Any]:
    return {"object": "list", "data": [m.to_dict() for m in metas]}


def latest_versions(metas: list[ArtifactMeta]) -> list[dict[str, Any]]:
    """The latest version of each name, with the number of versions stored."""
    by_name: dict[str, list[ArtifactMeta]] = {}
    for m in metas:
        by_name.setdefault(m.name, []).append(m)
    out = []
    for name in sorted(by_name):
        versions = sorted(by_name[name], key=lambda m: m.version)
        out.append({**versions[-1].to_dict(), "versions": len(versions)})
    return out


def select_versions(store: ArtifactStore, kind: str | tuple[str, ...], ref: str,
                    version: int | None = None) -> list[ArtifactMeta]:
    """The stored versions of ``kind`` (or of several kinds) that ``ref`` (``name`` or ``name@v``, plus
    ``version``) selects."""
    name, ref_version = parse_ref(ref, "name")
    if ref_version is not None and version is not None and ref_version != version:
        raise SteerError(f"the path names version {ref_version}, the request version {version}", field="version")
    version = ref_version if ref_version is not None else version
    metas = [m for m in store.list(kind) if m.name == name]
    what = kind if isinstance(kind, str) else " or ".join(kind)
    if not metas:
        raise NotFound(f"no {what} named {name!r}", field="name")
    if version is not None:
        metas = [m for m in metas if m.version == version]
        if not metas:
            raise NotFound(f"{what} {name!r} has no version {version}", field="version")
    return metas


def select_target(store: ArtifactStore, kind: str | tuple[str, ...], ref: str,
                  version: int | None) -> tuple[str, int | None]:
    """(name, version or None for all versions) of existing artifacts of ``kind``; 404 otherwise."""
    metas = select_versions(store, kind, ref, version)
    return metas[0].name, metas[0].version if version is not None or "@" in ref else None


def delete_selected(store: ArtifactStore, kind: str | tuple[str, ...], ref: str,
                    version: int | None) -> list[ArtifactMeta]:
    """Delete what ``ref`` and ``version`` select (see ``select_target``); returns what was deleted."""
    name, selected = select_target(store, kind, ref, version)
    return store.delete(name, selected)
