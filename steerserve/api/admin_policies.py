"""The admin routes for policies and the client API keys bound to them.

- ``GET /admin/policies``, ``GET /admin/policies/{name}``; ``POST /admin/policies`` creates (409 if the
  name exists), ``PUT /admin/policies/{name}`` creates or replaces, ``DELETE /admin/policies/{name}``
  (409 while keys are bound to it; ``default`` cannot be deleted, only replaced).
- ``POST /admin/keys`` binds a key to a policy: without ``key`` the server generates one and returns it in
  this response only (the store keeps its sha256); with ``key`` it binds that one. ``GET /admin/keys``
  lists the bound keys (never the keys), ``DELETE /admin/keys/{id}`` revokes one.

A policy is checked before anything is written: every method it names exists and every mandatory
intervention resolves against the loaded model and store (a 400 naming ``mandatory.<j>.<param>``).
What a policy does to requests is ``steerserve.methods.policy``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from steerserve.api.admin import admin_router, check_description, run_sync, service_of
from steerserve.api.admin_audit import audit_note
from steerserve.api.apidoc import KeyList, KeyOut, PolicyList, PolicyOut, errors
from steerserve.api.document import KEY_EXAMPLES, POLICY_EXAMPLES, PUT_POLICY_EXAMPLES
from steerserve.api.schemas import BodyModel, Description, Name, StrictModel
from steerserve.errors import SteerError
from steerserve.store.db import NAME_RE
from steerserve.store.policies import MAX_KEY_CHARS, MIN_KEY_CHARS, MIN_RATE_PER_MINUTE, Policy

router = admin_router()

PolicyName = Annotated[str, Path(pattern=f"^{NAME_RE.pattern}$", description="the policy's name")]
KeyId = Annotated[str, Path(pattern="^key_[0-9a-f]{16}$", description="the id POST /admin/keys returned")]
Cap = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class MandatoryIntervention(BaseModel):
    """An intervention as a request's ``steering`` lists it: the method and its own parameters."""

    model_config = ConfigDict(strict=True, extra="allow")
    method: str


class PolicyBody(StrictModel, BodyModel):
    mandatory: list[MandatoryIntervention] = []  # at most the server's max_interventions (checked by the service)
    allowed_methods: list[Annotated[str, Field(min_length=1)]] | None = None  # None: every method
    max_coeff: Cap | None = None  # cap on |coeff|, |beta|, |beta_max|, |gamma| of the client's interventions
    method_caps: dict[str, Cap] = {}  # tighter caps per method
    description: Description = ""
    requests_per_minute: Annotated[float, Field(ge=MIN_RATE_PER_MINUTE, description=(
        "per API key, across every replica sharing a Redis; a burst of this many, then refilled at this rate; "
        "429 with Retry-After beyond it. At least one an hour"))] | None = None

    def policy(self, name: str) -> Policy:
        return Policy(name, tuple(m.model_dump() for m in self.mandatory),
                      None if self.allowed_methods is None else tuple(self.allowed_methods), self.max_coeff,
                      dict(self.method_caps), self.description, self.requests_per_minute)


class PolicyCreate(PolicyBody):
    name: Name


class KeyCreate(StrictModel, BodyModel):
    policy: Name
    key: Annotated[str, Field(min_length=MIN_KEY_CHARS, max_length=MAX_KEY_CHARS, pattern="^[!-~]+$")] | None = None
    label: Description = ""


def _note(request: Request, kind: str, name: str | None) -> None:
    """What the audit log records of this request: a policy or an API key (by id, never the key)."""
    note = audit_note(request)
    note.kind, note.name = kind, name


async def _store(request: Request, body: PolicyBody, name: str, *, replace: bool) -> JSONResponse:
    _note(request, "policy", name)
    check_description(body.description, request)
    stored, created = await service_of(request).put_policy(body.policy(name), replace=replace)
    return JSONResponse(stored.to_dict(), status_code=201 if created else 200)


@router.get("/policies", response_model=None, responses={200: {"model": PolicyList}})
async def list_policies(request: Request) -> dict[str, Any]:
    policies = await run_sync(service_of(request).policies.list_policies)
    return {"object": "list", "data": [p.to_dict() for p in policies]}


@router.post("/policies", status_code=201, response_model=None, responses={201: {"model": PolicyOut}, **errors(409)})
async def create_policy(body: Annotated[PolicyCreate, Body(openapi_examples=POLICY_EXAMPLES)],
                        request: Request) -> JSONResponse:
    """Create a policy (409 if one of that name exists)."""
    return await _store(request, body, body.name, replace=False)


@router.get("/policies/{name}", response_model=None, responses={200: {"model": PolicyOut}, **errors(404)})
async def show_policy(name: PolicyName, request: Request) -> dict[str, Any]:
    _note(request, "policy", name)
    return (await run_sync(service_of(request).policies.get, name)).to_dict()


@router.put("/policies/{name}", response_model=None,
            responses={200: {"model": PolicyOut}, 201: {"model": PolicyOut}})
async def put_policy(name: PolicyName, body: Annotated[PolicyBody, Body(openapi_examples=PUT_POLICY_EXAMPLES)],
                     request: Request) -> JSONResponse:
    """Create (201) or replace (200) the policy ``name``; keys bound to it follow the new rules at once."""
    return await _store(request, body, name, replace=True)


@router.delete("/policies/{name}", response_model=None,
               responses={200: {"model": PolicyOut}, **errors(404, 409)})
async def delete_policy(name: PolicyName, request: Request) -> dict[str, Any]:
    """Delete a policy no key is bound to; returns what was deleted."""
    _note(request, "policy", name)
    return (await run_sync(service_of(request).policies.delete, name)).to_dict()


@router.post("/keys", status_code=201, response_model=None, responses={201: {"model": KeyOut}, **errors(409)})
async def create_key(body: Annotated[KeyCreate, Body(openapi_examples=KEY_EXAMPLES)],
                     request: Request) -> dict[str, Any]:
    """Bind a key to a policy: a generated one (returned here, once) or ``key``."""
    _note(request, "api_key", None)
    service = service_of(request)
    limit = service.settings.max_description_chars
    if len(body.label) > limit:
        raise SteerError(f"is {len(body.label)} characters; the limit is {limit}", field="label", code="too_long")
    if body.key is not None and body.key == service.settings.admin_key:
        raise SteerError("must not be the admin key", field="key")
    record, generated = await run_sync(service.policies.add_key, body.policy, body.key, body.label)
    _note(request, "api_key", record.id)
    return {**record.to_dict(), **({"key": generated} if generated is not None else {})}


@router.get("/keys", response_model=None, responses={200: {"model": KeyList}})
async def list_keys(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [k.to_dict() for k in await run_sync(service_of(request).policies.list_keys)]}


@router.delete("/keys/{key_id}", response_model=None, responses={200: {"model": KeyOut}, **errors(404)})
async def revoke_key(key_id: KeyId, request: Request) -> dict[str, Any]:
    """Revoke a key: requests with it get 401 from now on."""
    _note(request, "api_key", key_id)
    return (await run_sync(service_of(request).policies.revoke, key_id)).to_dict()
