"""The admin routes for ActAdd prompt pairs: create, list, show, delete.

A stored pair is used in a request's steering as ``{"method": "actadd", "pair": "<name>"}``. Auth, the
router's settings and the artifact lookups shared with the vector routes are in ``admin``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Query, Request

from steerserve.api.admin import (
    Ref,
    Version,
    admin_router,
    check_description,
    delete_selected,
    latest_versions,
    listing,
    run_sync,
    select_versions,
    service_of,
)
from steerserve.api.admin_schemas import PairCreate
from steerserve.api.apidoc import ArtifactList, PairList, PairOut, errors
from steerserve.api.document import PAIR_EXAMPLES
from steerserve.errors import SteerError
from steerserve.store.artifacts import ArtifactMeta, ArtifactStore

router = admin_router()


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
    check_description(body.description, request)
    meta = await service_of(request).create_pair(body.name, body.positive, body.negative, body.layer, body.coeff,
                                                  body.description)
    return {**meta.to_dict(), "positive": body.positive, "negative": body.negative, "layer": body.layer,
            "coeff": body.coeff}


@router.get("/pairs", response_model=None, responses={200: {"model": PairList}})
async def list_pairs(request: Request, all_versions: bool = Query(False, alias="all")) -> dict[str, Any]:
    store = service_of(request).store

    def work() -> list[dict[str, Any]]:
        metas = store.list("pair")
        if all_versions:
            return [_pair_dict(store, m) for m in metas]
        latest = latest_versions(metas)
        by_ref = {m.ref(): m for m in metas}
        return [{**_pair_dict(store, by_ref[d["ref"]]), "versions": d["versions"]} for d in latest]

    return {"object": "list", "data": await run_sync(work)}


@router.get("/pairs/{name}", response_model=None, responses={200: {"model": PairList}, **errors(404)})
async def show_pair(name: Ref, request: Request) -> dict[str, Any]:
    store = service_of(request).store

    def work() -> list[dict[str, Any]]:
        return [_pair_dict(store, m) for m in select_versions(store, "pair", name)]

    return {"object": "list", "data": await run_sync(work)}


@router.delete("/pairs/{name}", response_model=None, responses={200: {"model": ArtifactList}, **errors(404)})
async def delete_pair(name: Ref, request: Request, version: Version = None) -> dict[str, Any]:
    return listing(await run_sync(delete_selected, service_of(request).store, "pair", name, version))
