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

Store calls are synchronous (SQLite, fsync) and run in a worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from steerserve.api.schemas import ComputeVector, EnableVector, PairCreate, VectorUpload
from steerserve.errors import NotFound, SteerError
from steerserve.service import Service
from steerserve.store.artifacts import ArtifactMeta, ArtifactStore, check_name, parse_ref

T = TypeVar("T")

DISABLED = "admin API disabled: set STEERSERVE_ADMIN_KEY (or --admin-key) to enable it"
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
_LAYER_KEY = re.compile(r"0|[1-9][0-9]*")


def require_admin(request: Request) -> None:
    key: str | None = request.app.state.settings.admin_key
    if not key:
        raise SteerError(DISABLED, status=403, code="admin_disabled")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise SteerError("missing or invalid admin key: send 'Authorization: Bearer <key>'", status=401,
                         code="invalid_api_key")


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


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
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_UPLOAD_BYTES:
            raise SteerError(f"upload exceeds {MAX_UPLOAD_BYTES} bytes", field="file", status=413,
                             code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_field(field: str | None) -> str | None:
    """The store names JSON-uploaded tensors ``tensors.layer.<i>``; the client sent ``vectors.<i>``."""
    if field is None:
        return None
    if field.startswith("tensors.layer."):
        return "vectors." + field.removeprefix("tensors.layer.")
    return "vectors" if field == "tensors" else field


async def _upload_json(request: Request, store: ArtifactStore) -> ArtifactMeta:
    try:
        body = VectorUpload.model_validate_json(await _read_body(request))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
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


_UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": VectorUpload.model_json_schema()},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}}


@router.post("/vectors", status_code=201, openapi_extra=_UPLOAD_BODY)
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
        data = await _read_body(request)
        meta = await _run(store.put_vector_file, name, data,
                          description=request.query_params.get("description", ""))
    else:
        raise SteerError(f"unsupported content type {content_type or '(none)'!r}: send application/json or "
                         "safetensors bytes as application/octet-stream", status=415,
                         code="unsupported_media_type")
    return meta.to_dict()


@router.post("/vectors/compute", status_code=201)
async def compute_vector(body: ComputeVector, request: Request) -> dict[str, Any]:
    """Mean-difference vector from contrastive prompts, stored as the next version of ``name``."""
    check_name(body.name)  # before spending compute on a name the store would refuse
    meta = await _service(request).compute_vector(body.name, body.positive, body.negative, body.layers,
                                                  body.description, pooling=body.pooling, chat=body.chat)
    return meta.to_dict()


@router.get("/vectors")
async def list_vectors(request: Request, all_versions: bool = Query(False, alias="all")) -> dict[str, Any]:
    metas = await _run(_service(request).store.list, "vector")
    return _listing(metas) if all_versions else {"object": "list", "data": _latest(metas)}


@router.get("/vectors/{name}")
async def show_vector(name: str, request: Request) -> dict[str, Any]:
    """Every version of ``name``, or the one version ``name@v`` names."""
    return _listing(await _run(_versions, _service(request).store, "vector", name))


@router.patch("/vectors/{name}")
async def enable_vector(name: str, body: EnableVector, request: Request) -> dict[str, Any]:
    """Enable or disable every version of ``name``, or one (``name@v`` or ``"version"``)."""
    store = _service(request).store

    def work() -> list[ArtifactMeta]:
        target, version = _target(store, "vector", name, body.version)
        return store.set_enabled(target, body.enabled, version)

    return _listing(await _run(work))


@router.delete("/vectors/{name}")
async def delete_vector(name: str, request: Request, version: int | None = None) -> dict[str, Any]:
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


@router.post("/pairs", status_code=201)
async def create_pair(body: PairCreate, request: Request) -> dict[str, Any]:
    """Store an ActAdd pair; use it as ``{"method": "actadd", "pair": "<name>"}``."""
    store = _service(request).store
    meta = await _run(store.put_pair, body.name, body.positive, body.negative, layer=body.layer, coeff=body.coeff,
                      description=body.description)
    return {**meta.to_dict(), "positive": body.positive, "negative": body.negative, "layer": body.layer,
            "coeff": body.coeff}


@router.get("/pairs")
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


@router.get("/pairs/{name}")
async def show_pair(name: str, request: Request) -> dict[str, Any]:
    store = _service(request).store

    def work() -> list[dict[str, Any]]:
        return [_pair_dict(store, m) for m in _versions(store, "pair", name)]

    return {"object": "list", "data": await _run(work)}


@router.delete("/pairs/{name}")
async def delete_pair(name: str, request: Request, version: int | None = None) -> dict[str, Any]:
    return _listing(await _run(_delete, _service(request).store, "pair", name, version))
