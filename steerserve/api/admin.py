"""The admin API under ``/admin``: manage stored steering vectors and ActAdd prompt pairs.

Every route needs ``Authorization: Bearer <admin key>`` (``Settings.admin_key``). Without a configured
key the whole API answers 403; a missing or wrong key is a 401.

Uploading a vector, ``POST /admin/vectors``, takes one of
- JSON ``{"name", "description"?, "vectors": {"<layer>": [hidden_size floats], ...}}``;
- raw safetensors bytes (tensors ``layer.<i>``) as ``application/octet-stream``, with ``?name=...`` and
  optionally ``&description=...`` in the query string, e.g.
  ``curl --data-binary @v.safetensors -H 'Content-Type: application/octet-stream' '.../admin/vectors?name=v'``.
  ``multipart/form-data`` is not accepted (415): parsing it needs python-multipart, which this server
  does not depend on.

The key is checked by ``guard.EdgeGuard`` before any byte of the body is read (and again, by the same
rule, as this router's dependency). Store calls, body parsing and prompt tokenizing are synchronous and
run in a worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import torch
from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from steerserve.api.apidoc import (
    ADMIN_ERRORS,
    COMPUTE_EXAMPLES,
    ENABLE_EXAMPLES,
    PAIR_EXAMPLES,
    ArtifactList,
    ArtifactOut,
    PairList,
    PairOut,
    errors,
)
from steerserve.api.schemas import ComputeVector, EnableVector, PairCreate, VectorUpload
from steerserve.config import Settings
from steerserve.errors import NotFound, SteerError
from steerserve.prompts import PromptRenderer
from steerserve.service import Service
from steerserve.store.artifacts import ArtifactMeta, ArtifactStore, check_name, parse_ref
from steerserve.store.db import NAME_RE

T = TypeVar("T")

DISABLED = "admin API disabled: set STEERSERVE_ADMIN_KEY (or --admin-key) to enable it"
_LAYER_KEY = re.compile(r"0|[1-9][0-9]*")
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


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=ADMIN_ERRORS)


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _check_description(description: str, request: Request) -> None:
    """The server's own limit (the schema states the default one)."""
    limit = _settings(request).max_description_chars
    if len(description) > limit:
        raise SteerError(f"is {len(description)} characters; the limit is {limit}", field="description",
                         code="too_long")


async def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


def _listing(metas: list[ArtifactMeta]) -> dict[str, Any]:
    return {"object": "list", "data": [m.to_dict() for m in metas]}


def _latest(metas: list[ArtifactMeta]) -> list[dict[str, Any]]:
    """The latest version of each name, with the number of versions stored."""
    by_name: dict[str, list[ArtifactMeta]] = {}
    for m in metas:
        by_name.setdefault(m.name, []).append(m)
    out = []
    for name in sorted(by_name):
        versions = sorted(by_name[name], key=lambda m: m.version)
        out.append({**versions[-1].to_dict(), "versions": len(versions)})
    return out


def _versions(store: ArtifactStore, kind: str, ref: str, version: int | None = None) -> list[ArtifactMeta]:
    """The stored versions of ``kind`` that ``ref`` (``name`` or ``name@v``, plus ``version``) selects."""
    name, ref_version = parse_ref(ref, "name")
    if ref_version is not None and version is not None and ref_version != version:
        raise SteerError(f"the path names version {ref_version}, the request version {version}", field="version")
    version = ref_version if ref_version is not None else version
    metas = [m for m in store.list(kind) if m.name == name]
    if not metas:
        raise NotFound(f"no {kind} named {name!r}", field="name")
    if version is not None:
        metas = [m for m in metas if m.version == version]
        if not metas:
            raise NotFound(f"{kind} {name!r} has no version {version}", field="version")
    return metas


# ---- vectors ----------------------------------------------------------------------------------------


async def _read_body(request: Request) -> bytes:
    """The body, at most ``max_upload_bytes`` (EdgeGuard enforces it first; this holds without it too)."""
    limit = _settings(request).max_upload_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise SteerError(f"upload exceeds {limit} bytes", field="file", status=413, code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_upload(data: bytes) -> VectorUpload:
    """A JSON upload, parsed as FastAPI parses the other routes' bodies (so errors read the same)."""
    try:
        raw = json.loads(data)
    except json.JSONDecodeError as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": exc.msg}}]) from None
    except UnicodeDecodeError:
        raise SteerError("request body is not UTF-8 text", code="invalid_json") from None
    except RecursionError:  # the parser recurses per nesting level
        raise SteerError("request body is nested too deeply", code="invalid_json") from None
    try:
        return VectorUpload.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _json_field(field: str | None) -> str | None:
    """The store names JSON-uploaded tensors ``tensors.layer.<i>``; the client sent ``vectors.<i>``."""
    if field is None:
        return None
    if field.startswith("tensors.layer."):
        return "vectors." + field.removeprefix("tensors.layer.")
    return "vectors" if field == "tensors" else field


async def _upload_json(request: Request, store: ArtifactStore) -> ArtifactMeta:
    body = await _run(_parse_upload, await _read_body(request))  # up to 64 MiB of JSON: not on the event loop
    _check_description(body.description, request)
    tensors: dict[int, torch.Tensor] = {}
    for key, values in body.vectors.items():
        if not _LAYER_KEY.fullmatch(key):
            raise SteerError(f"key {key!r} must be a 0-based layer index", field=f"vectors.{key}")
        tensors[int(key)] = torch.tensor(values, dtype=torch.float64)
    try:
        return await _run(store.put_vector, body.name, tensors, method="upload",
                          provenance={"source": "POST /admin/vectors (json)"}, description=body.description)
    except SteerError as exc:
        exc.field = _json_field(exc.field)
        raise


_UPLOAD_BODY = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": VectorUpload.model_json_schema()},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }},
    "parameters": [
        {"name": "name", "in": "query", "required": False, "description": "the name, for a safetensors upload",
         "schema": {"type": "string", "pattern": f"^{NAME_RE.pattern}$"}},
        {"name": "description", "in": "query", "required": False, "description": "for a safetensors upload",
         "schema": {"type": "string", "maxLength": Settings.max_description_chars}},
    ],
}


@router.post("/vectors", status_code=201, openapi_extra=_UPLOAD_BODY, response_model=None,
             responses={201: {"model": ArtifactOut}, **errors(415)})
async def upload_vector(request: Request) -> dict[str, Any]:
    """Upload a vector: JSON, or raw safetensors bytes with ``?name=`` (see the module docstring)."""
    store = _service(request).store
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        meta = await _upload_json(request, store)
    elif content_type == "multipart/form-data":
        raise SteerError("multipart uploads are not supported (this server does not depend on python-multipart): "
                         "send the safetensors bytes as the body, Content-Type application/octet-stream, with "
                         "?name=...&description=...", status=415, code="unsupported_media_type")
    elif content_type == "application/octet-stream":
        name = request.query_params.get("name")
        if name is None:
            raise SteerError("is required in the query string (?name=...)", field="name")
        description = request.query_params.get("description", "")
        _check_description(description, request)
        data = await _read_body(request)
        meta = await _run(store.put_vector_file, name, data, description=description)
    else:
        raise SteerError(f"unsupported content type {content_type or '(none)'!r}: send application/json or "
                         "safetensors bytes as application/octet-stream", status=415,
                         code="unsupported_media_type")
    return meta.to_dict()


def _check_prompts(renderer: PromptRenderer, body: ComputeVector) -> None:
    """Render every prompt as the service will, so that a refusal names the prompt (``positive.3``)."""
    for key, prompts in (("positive", body.positive), ("negative", body.negative)):
        for i, p in enumerate(prompts):
            try:
                renderer.render(messages=[{"role": "user", "content": p}]) if body.chat else renderer.render(p)
            except SteerError as exc:
                exc.field = f"{key}.{i}"
                raise


@router.post("/vectors/compute", status_code=201, response_model=None, responses={201: {"model": ArtifactOut}})
async def compute_vector(body: Annotated[ComputeVector, Body(openapi_examples=COMPUTE_EXAMPLES)],
                         request: Request) -> dict[str, Any]:
    """Mean-difference vector from contrastive prompts, stored as the next version of ``name``."""
    check_name(body.name)  # before spending compute on a name the store would refuse
    _check_description(body.description, request)
    await _run(_check_prompts, _service(request).renderer, body)
    meta = await _service(request).compute_vector(body.name, body.positive, body.negative, body.layers,
                                                  body.description, pooling=body.pooling, chat=body.chat)
    return meta.to_dict()


@router.get("/vectors", response_model=None, responses={200: {"model": ArtifactList}})
async def list_vectors(request: Request, all_versions: bool = Query(False, alias="all")) -> dict[str, Any]:
    metas = await _run(_service(request).store.list, "vector")
    return _listing(metas) if all_versions else {"object": "list", "data": _latest(metas)}


@router.get("/vectors/{name}", response_model=None, responses={200: {"model": ArtifactList}, **errors(404)})
async def show_vector(name: Ref, request: Request) -> dict[str, Any]:
    """Every version of ``name``, or the one version ``name@v`` names."""
    return _listing(await _run(_versions, _service(request).store, "vector", name))


@router.patch("/vectors/{name}", response_model=None, responses={200: {"model": ArtifactList}, **errors(404)})
async def enable_vector(name: Ref, body: Annotated[EnableVector, Body(openapi_examples=ENABLE_EXAMPLES)],
                        request: Request) -> dict[str, Any]:
    """Enable or disable every version of ``name``, or one (``name@v`` or ``"version"``)."""
    store = _service(request).store

    def work() -> list[ArtifactMeta]:
        target, version = _target(store, "vector", name, body.version)
        return store.set_enabled(target, body.enabled, version)

    return _listing(await _run(work))


@router.delete("/vectors/{name}", response_model=None, responses={200: {"model": ArtifactList}, **errors(404)})
async def delete_vector(name: Ref, request: Request, version: Version = None) -> dict[str, Any]:
    """Delete every version of ``name``, or one (``name@v`` or ``?version=``); returns what was deleted."""
    return _listing(await _run(_delete, _service(request).store, "vector", name, version))


def _target(store: ArtifactStore, kind: str, ref: str, version: int | None) -> tuple[str, int | None]:
    """(name, version or None for all versions) of existing artifacts of ``kind``; 404 otherwise."""
    metas = _versions(store, kind, ref, version)
    return metas[0].name, metas[0].version if version is not None or "@" in ref else None


def _delete(store: ArtifactStore, kind: str, ref: str, version: int | None) -> list[ArtifactMeta]:
    name, selected = _target(store, kind, ref, version)
    return store.delete(name, selected)


# ---- prompt pairs -----------------------------------------------------------------------------------


def _pair_dict(store: ArtifactStore, meta: ArtifactMeta) -> dict[str, Any]:
    out = meta.to_dict()
    try:
        pair = store.load_pair(meta.ref(), require_enabled=False)
    except SteerError:  # e.g. made for another model: the metadata alone still describes it
        return out
    out.update(positive=pair.positive, negative=pair.negative, layer=pair.layer, coeff=pair.coeff)
    return out


@router.post("/pairs", status_code=201, response_model=None, responses={201: {"model": PairOut}})
async def create_pair(body: Annotated[PairCreate, Body(openapi_examples=PAIR_EXAMPLES)],
                      request: Request) -> dict[str, Any]:
    """Store an ActAdd pair; use it as ``{"method": "actadd", "pair": "<name>"}``."""
    _check_description(body.description, request)
    meta = await _service(request).create_pair(body.name, body.positive, body.negative, body.layer, body.coeff,
                                               body.description)
    return {**meta.to_dict(), "positive": body.positive, "negative": body.negative, "layer": body.layer,
            "coeff": body.coeff}


@router.get("/pairs", response_model=None, responses={200: {"model": PairList}})
async def list_pairs(request: Request, all_versions: bool = Query(False, alias="all")) -> dict[str, Any]:
    store = _service(request).store

    def work() -> list[dict[str, Any]]:
        metas = store.list("pair")
        if all_versions:
            return [_pair_dict(store, m) for m in metas]
        latest = _latest(metas)
        by_ref = {m.ref(): m for m in metas}
        return [{**_pair_dict(store, by_ref[d["ref"]]), "versions": d["versions"]} for d in latest]

    return {"object": "list", "data": await _run(work)}


@router.get("/pairs/{name}", response_model=None, responses={200: {"model": PairList}, **errors(404)})
async def show_pair(name: Ref, request: Request) -> dict[str, Any]:
    store = _service(request).store

    def work() -> list[dict[str, Any]]:
        return [_pair_dict(store, m) for m in _versions(store, "pair", name)]

    return {"object": "list", "data": await _run(work)}


@router.delete("/pairs/{name}", response_model=None, responses={200: {"model": ArtifactList}, **errors(404)})
async def delete_pair(name: Ref, request: Request, version: Version = None) -> dict[str, Any]:
    return _listing(await _run(_delete, _service(request).store, "pair", name, version))
