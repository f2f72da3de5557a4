"""The admin routes for stored steering vectors: upload, compute, list, show, enable/disable, delete.

Uploading a vector, ``POST /admin/vectors``, takes one of
- JSON ``{"name", "description"?, "vectors": {"<layer>": [hidden_size floats], ...}}``;
- raw safetensors bytes (tensors ``layer.<i>``) as ``application/octet-stream``, with ``?name=...`` and
  optionally ``&description=...`` in the query string, e.g.
  ``curl --data-binary @v.safetensors -H 'Content-Type: application/octet-stream' '.../admin/vectors?name=v'``;
- ``multipart/form-data``: the same bytes as the file part ``file`` (``application/octet-stream`` or no
  content type) and text fields ``name`` and optionally ``description``, e.g.
  ``curl -F file=@v.safetensors -F name=v .../admin/vectors``. The parts are parsed as the body arrives,
  the body still counted against ``max_upload_bytes`` by the guard.
Both file forms then take one path: the store's checks and atomic commit (``put_vector_file``). Either
may instead carry a llama.cpp / repeng GGUF control vector (told apart by its ``GGUF`` magic bytes;
``store.formats``): it is stored as the equivalent safetensors vector after the same checks and vetting.
A safetensors file whose metadata says ``kind: direction`` is stored as a direction (``store.directions``),
one that says ``kind: controller`` as a refusal controller (``store.controllers``), one that says
``kind: probe`` or ``kind: head`` as SafeSwitch probes or a refusal head (``store.safeswitch``), one that
says ``kind: expert_set`` as an MoE expert set (``store.expert_sets``); these routes list, show, enable and
delete all of them alike. ``GET /admin/vectors/{name}/export?format=gguf|safetensors`` returns one as a
file (``store.formats.export_artifact``, as ``steerserve vectors export`` writes it).

Auth, the router's settings and the artifact lookups shared with the pair routes are in ``admin``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

import torch
from fastapi import Body, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerserve.api import json_vectors
from steerserve.api.admin import (
    Ref,
    Version,
    admin_router,
    check_description,
    delete_selected,
    latest_versions,
    listing,
    run_sync,
    select_target,
    select_versions,
    service_of,
)
from steerserve.api.admin_audit import AuditNote, audit_note
from steerserve.api.admin_schemas import ComputeVector, EnableVector, VectorUpload
from steerserve.api.apidoc import ArtifactList, ArtifactOut, errors
from steerserve.api.document import COMPUTE_EXAMPLES, ENABLE_EXAMPLES
from steerserve.config import Settings
from steerserve.errors import SteerError
from steerserve.prompts import PromptRenderer
from steerserve.store.artifacts import FILE_KINDS, ArtifactMeta, ArtifactStore, check_name
from steerserve.store.db import NAME_RE
from steerserve.store.formats import export_artifact

_LAYER_KEY = re.compile(r"0|[1-9][0-9]*")
_SMALL_JSON = 1 << 20  # bytes: a JSON upload up to this size is parsed whole (well under 100 ms)

_FORM_FIELDS = ("file", "name", "description")  # a multipart upload's parts
_FILE_TYPE = "application/octet-stream"

router = admin_router()


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


async def _upload_json(request: Request, store: ArtifactStore, note: AuditNote) -> ArtifactMeta:
    data = await request.body()
    info = service_of(request).info
    if len(data) > _SMALL_JSON:  # streamed: the loop keeps serving, a wrong shape is refused where it goes wrong
        try:
            upload = await run_sync(json_vectors.read_upload, data, info.hidden_size, info.num_layers)
        except json_vectors.Unexpected as exc:
            raise SteerError(f"not a vector upload: {exc}", code="invalid_json") from None
        name, description = upload.name, upload.description
        tensors = {layer: torch.from_numpy(row) for layer, row in upload.vectors.items()}
    else:  # small: parsed whole, the same validation (and error order) as every other route's body
        body = await run_sync(_parse_upload, data)
        name, description, tensors = body.name, body.description, {}
        for key, values in body.vectors.items():
            if not _LAYER_KEY.fullmatch(key):
                raise SteerError(f"key {key!r} must be a 0-based layer index", field=f"vectors.{key}")
            tensors[int(key)] = torch.tensor(values, dtype=torch.float64)
    note.name = name
    check_description(description, request)
    try:
        return await run_sync(store.put_vector, name, tensors, method="upload",
                              provenance={"source": "POST /admin/vectors (json)"}, description=description,
                              vet=service_of(request).vetter())
    except SteerError as exc:
        exc.field = _json_field(exc.field)
        raise


async def _read_multipart(request: Request) -> tuple[str, str, bytes]:
    """(name, description, file bytes) of a multipart upload; a refusal names the part."""
    try:
        # Two file parts at most, so that a repeated ``file`` is refused by name below, not by a count.
        form = await request.form(max_files=2, max_fields=len(_FORM_FIELDS))
    except StarletteHTTPException as exc:  # starlette's answer to python-multipart's parse errors
        raise SteerError(f"not a valid multipart/form-data body: {exc.detail}", code="invalid_multipart") from None
    try:
        for key in dict.fromkeys(form.keys()):
            if key not in _FORM_FIELDS:
                raise SteerError(f"unknown field; a multipart upload has the parts {list(_FORM_FIELDS)}", field=key)
            if len(form.getlist(key)) > 1:
                raise SteerError("is given more than once", field=key)
        texts: dict[str, str] = {}
        for key in ("name", "description"):
            value = form.get(key)
            if isinstance(value, UploadFile):
                raise SteerError(f"must be a text field (-F {key}=...), not a file part", field=key)
            if value is not None:
                texts[key] = value
        if "name" not in texts:
            raise SteerError("is required: a text field (-F name=...)", field="name")
        upload = form.get("file")
        if upload is None:
            raise SteerError("is required: the safetensors bytes as a file part (-F file=@v.safetensors)",
                             field="file")
        if not isinstance(upload, UploadFile):
            raise SteerError("must be a file part, with a filename (-F file=@v.safetensors), not a text field",
                             field="file")
        content_type = (upload.content_type or _FILE_TYPE).split(";")[0].strip().lower()
        if content_type != _FILE_TYPE:
            raise SteerError(f"has content type {content_type!r}: send the safetensors bytes as {_FILE_TYPE}",
                             field="file", status=415, code="unsupported_media_type")
        check_description(texts.get("description", ""), request)
        return texts["name"], texts.get("description", ""), await upload.read()
    finally:
        await form.close()  # the file part may be spooled to a temporary file


_UPLOAD_BODY = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": VectorUpload.model_json_schema()},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "name"], "additionalProperties": False,
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "the safetensors file or GGUF control vector"},
                           "name": {"type": "string", "pattern": f"^{NAME_RE.pattern}$"},
                           "description": {"type": "string", "maxLength": Settings.max_description_chars}}}},
    }},
    "parameters": [
        {"name": "name", "in": "query", "required": False,
         "description": "the name, for a raw safetensors upload (application/octet-stream)",
         "schema": {"type": "string", "pattern": f"^{NAME_RE.pattern}$"}},
        {"name": "description", "in": "query", "required": False, "description": "for a raw safetensors upload",
         "schema": {"type": "string", "maxLength": Settings.max_description_chars}},
    ],
}


@router.post("/vectors", status_code=201, openapi_extra=_UPLOAD_BODY, response_model=None,
             responses={201: {"model": ArtifactOut}, **errors(415)})
async def upload_vector(request: Request) -> dict[str, Any]:
    """Upload a vector: JSON, raw safetensors bytes with ``?name=``, or a multipart form (see the module
    docstring)."""
    store, note = service_of(request).store, audit_note(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return (await _upload_json(request, store, note)).to_dict()
    if content_type == "multipart/form-data":
        name, description, data = await _read_multipart(request)
        note.name = name
    elif content_type == "application/octet-stream":
        query_name = note.name = request.query_params.get("name")
        if query_name is None:
            raise SteerError("is required in the query string (?name=...)", field="name")
        name = query_name
        description = request.query_params.get("description", "")
        check_description(description, request)
        data = await request.body()
    else:
        raise SteerError(f"unsupported content type {content_type or '(none)'!r}: send application/json, "
                         "safetensors bytes as application/octet-stream, or multipart/form-data", status=415,
                         code="unsupported_media_type")
    # One path for a file however it came: the sha256 for the audit log (a refused file's too), then the
    # store's checks and its atomic commit.
    note.sha256 = await run_sync(lambda: hashlib.sha256(data).hexdigest())
    meta = await run_sync(store.put_vector_file, name, data, description=description,
                          vet=service_of(request).vetter())
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
    check_description(body.description, request)
    await run_sync(_check_prompts, service_of(request).renderer, body)
    meta = await service_of(request).compute_vector(body.name, body.positive, body.negative, body.layers,
                                                     body.description, pooling=body.pooling, chat=body.chat)
    return meta.to_dict()


@router.get("/vectors", response_model=None, responses={200: {"model": ArtifactList}})
async def list_vectors(request: Request, all_versions: bool = Query(False, alias="all")) -> dict[str, Any]:
    metas = await run_sync(service_of(request).store.list, FILE_KINDS)
    return listing(metas) if all_versions else {"object": "list", "data": latest_versions(metas)}


@router.get("/vectors/{name}", response_model=None, responses={200: {"model": ArtifactList}, **errors(404)})
async def show_vector(name: Ref, request: Request) -> dict[str, Any]:
    """Every version of ``name``, or the one version ``name@v`` names."""
    return listing(await run_sync(select_versions, service_of(request).store, FILE_KINDS, name))


_FILE_DOC = {200: {"description": "the file", "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}, **errors(404)}


@router.get("/vectors/{name}/export", response_class=Response, responses=_FILE_DOC)
async def export_vector(name: Ref, request: Request, fmt: Annotated[Literal["gguf", "safetensors"], Query(
        alias="format", description="gguf: a llama.cpp control vector (vectors and directions); safetensors: "
                                    "the stored file")] = "safetensors",
                        drop_layer_0: bool = False) -> Response:
    """``name`` (the latest version) or ``name@v`` as a file, as ``steerserve vectors export`` writes it."""
    audit_note(request).action = "export"
    meta, data = await run_sync(export_artifact, service_of(request).store, name, fmt, drop_layer_0=drop_layer_0)
    filename = f"{meta.name}-v{meta.version}.{fmt}"
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"',
                             "X-Steerserve-Artifact": meta.ref(), "X-Steerserve-Kind": meta.kind})


@router.patch("/vectors/{name}", response_model=None, responses={200: {"model": ArtifactList}, **errors(404)})
async def enable_vector(name: Ref, body: Annotated[EnableVector, Body(openapi_examples=ENABLE_EXAMPLES)],
                        request: Request) -> dict[str, Any]:
    """Enable or disable every version of ``name``, or one (``name@v`` or ``"version"``)."""
    store = service_of(request).store
    audit_note(request).action = "enable" if body.enabled else "disable"

    def work() -> list[ArtifactMeta]:
        target, version = select_target(store, FILE_KINDS, name, body.version)
        return store.set_enabled(target, body.enabled, version)

    return listing(await run_sync(work))


@router.delete("/vectors/{name}", response_model=None, responses={200: {"model": ArtifactList}, **errors(404)})
async def delete_vector(name: Ref, request: Request, version: Version = None) -> dict[str, Any]:
    """Delete every version of ``name``, or one (``name@v`` or ``?version=``); returns what was deleted."""
    return listing(await run_sync(delete_selected, service_of(request).store, FILE_KINDS, name, version))
