"""Policies and the client API keys bound to them, in the store's SQLite manifest.

A ``Policy`` says what a request under it may steer with and what it gets anyway: ``mandatory``
interventions are applied to every such request whatever the client sends; ``allowed_methods`` (None: all)
and the coefficient caps bound the client's own interventions. ``methods.policy`` enforces them.

An API key is bound to one policy. Only the sha256 of a key is stored, never the key itself; a generated
key is returned once, when it is created. Requests without a key are governed by the ``default`` policy,
which always exists: without a row it is the built-in one with no restrictions, until an admin replaces it.

This module checks shapes only (names, numbers); whether the mandatory interventions resolve against the
loaded model is the service's check, made before anything is written.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from steerserve.errors import Conflict, NotFound, SteerError
from steerserve.store import db
from steerserve.store.db import check_name

DEFAULT = "default"
KEY_PREFIX = "ssk-"  # generated keys: the prefix plus 43 URL-safe characters (256 random bits)
MIN_KEY_CHARS, MAX_KEY_CHARS = 16, 256


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def key_hash(key: str) -> str:
    """What the store keeps of a key: its sha256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_key(key: str, f: str = "key") -> str:
    """A client-chosen key: 16-256 visible ASCII characters (it travels in an HTTP header)."""
    if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS or not all("!" <= c <= "~" for c in key):
        raise SteerError(f"must be {MIN_KEY_CHARS}-{MAX_KEY_CHARS} visible ASCII characters, no spaces", field=f)
    return key


# The slowest rate a policy may set: one request an hour. Anything slower is a typo or a lock-out (a bucket
# at 5e-324 a minute would never refill), refused when the policy is stored.
MIN_RATE_PER_MINUTE = 1 / 60


@dataclass(frozen=True)
class Policy:
    """What requests under one policy may steer with, and what they get anyway."""

    name: str
    mandatory: tuple[Mapping[str, Any], ...] = ()  # intervention objects, {"method": ..., <params>}
    allowed_methods: tuple[str, ...] | None = None  # None: every method
    max_coeff: float | None = None  # cap on |strength| (coeff, beta, beta_max, gamma) of any client intervention
    method_caps: Mapping[str, float] = field(default_factory=dict)  # tighter caps per method
    description: str = ""
    requests_per_minute: float | None = None  # per API key (``admission``); None: no limit
    created: str = ""
    updated: str = ""

    def __post_init__(self) -> None:
        check_name(self.name)
        for i, iv in enumerate(self.mandatory):
            if not isinstance(iv, Mapping) or not isinstance(iv.get("method"), str):
                raise SteerError("must be an object with a 'method' string", field=f"mandatory.{i}")
        caps = {"max_coeff": self.max_coeff, **{f"method_caps.{m}": c for m, c in self.method_caps.items()},
                "requests_per_minute": self.requests_per_minute}
        for f, cap in caps.items():
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))
                                    or not math.isfinite(cap) or cap < 0):
                raise SteerError("must be a finite number >= 0", field=f)
        rate = self.requests_per_minute
        if rate is not None and rate < MIN_RATE_PER_MINUTE:
            raise SteerError(f"must be at least {MIN_RATE_PER_MINUTE:.6g} (one request an hour); for no requests at "
                             "all, bind no key to this policy", field="requests_per_minute")

    def cap(self, method: str) -> float | None:
        """The cap on the strengths of a client's ``method`` intervention, or None if uncapped."""
        caps = [c for c in (self.max_coeff, self.method_caps.get(method)) if c is not None]
        return min(caps) if caps else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mandatory": [dict(m) for m in self.mandatory],
                "allowed_methods": None if self.allowed_methods is None else list(self.allowed_methods),
                "max_coeff": self.max_coeff, "method_caps": dict(self.method_caps), "description": self.description,
                "requests_per_minute": self.requests_per_minute, "created": self.created, "updated": self.updated}


@dataclass(frozen=True)
class ApiKey:
    """A bound key as the store describes it (never the key itself)."""

    id: str
    policy: str
    label: str
    created: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "policy": self.policy, "label": self.label, "created": self.created}


def _row_to_policy(row: Mapping[Any, Any]) -> Policy:
    allowed = row["allowed_methods"]
    return Policy(row["name"], tuple(row["mandatory"]), None if allowed is None else tuple(allowed),
                  row["max_coeff"], dict(row["method_caps"]), row["description"], row.get("requests_per_minute"),
                  row["created"], row["updated"])


def _find(conn: Connection, name: str) -> Policy | None:
    row = conn.execute(sa.select(db.policies).where(db.policies.c.name == name)).mappings().first()
    if row is not None:
        return _row_to_policy(row)
    return Policy(DEFAULT) if name == DEFAULT else None


class PolicyStore:
    """Policies and API keys over a manifest's engine (shared with the artifact store); thread-safe."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()  # queue our own writers in Python, as ArtifactStore does

    def get(self, name: str) -> Policy:
        with db.read(self._engine) as conn:
            policy = _find(conn, name)
        if policy is None:
            raise NotFound(f"no policy named {name!r}", field="name")
        return policy

    def list_policies(self) -> list[Policy]:
        """Every policy by name, ``default`` included."""
        with db.read(self._engine) as conn:
            rows = conn.execute(sa.select(db.policies).order_by(db.policies.c.name)).mappings().all()
        found = {r["name"]: _row_to_policy(r) for r in rows}
        found.setdefault(DEFAULT, Policy(DEFAULT))
        return [found[n] for n in sorted(found)]

    def put(self, policy: Policy, *, replace: bool) -> tuple[Policy, bool]:
        """Store ``policy`` (validated by the caller); returns it as stored and whether it is new.
        ``replace=False`` refuses an existing name (409); the built-in ``default`` counts as not stored."""
        with self._lock, db.write(self._engine) as conn:
            old = conn.execute(sa.select(db.policies.c.created).where(db.policies.c.name == policy.name)).scalar()
            if old is not None and not replace:
                raise Conflict(f"policy {policy.name!r} exists; PUT /admin/policies/{policy.name} replaces it",
                               field="name")
            now = _now()
            row = {**policy.to_dict(), "created": old or now, "updated": now}
            if old is None:
                conn.execute(sa.insert(db.policies).values(**row))
            else:
                conn.execute(sa.update(db.policies).where(db.policies.c.name == policy.name).values(**row))
        return _row_to_policy(row), old is None

    def delete(self, name: str) -> Policy:
        """Delete a policy no key is bound to (409 otherwise); ``default`` cannot be deleted."""
        if name == DEFAULT:
            raise Conflict("the default policy cannot be deleted; PUT it with no restrictions to reset it",
                           field="name")
        with self._lock, db.write(self._engine) as conn:
            policy = _find(conn, name)
            if policy is None:
                raise NotFound(f"no policy named {name!r}", field="name")
            bound = conn.execute(sa.select(sa.func.count()).select_from(db.api_keys)
                                 .where(db.api_keys.c.policy == name)).scalar()
            if bound:
                raise Conflict(f"{bound} API key(s) are bound to policy {name!r}; revoke or rebind them first",
                               field="name")
            conn.execute(sa.delete(db.policies).where(db.policies.c.name == name))
        return policy

    def add_key(self, policy: str, key: str | None = None, label: str = "") -> tuple[ApiKey, str | None]:
        """Bind ``key`` (or a new generated one) to ``policy``. Returns the key's record and the generated
        key (None when the caller gave one): the only time the store hands out a key."""
        generated = KEY_PREFIX + secrets.token_urlsafe(32) if key is None else None
        secret = generated if generated is not None else check_key(key or "")
        record = ApiKey("key_" + secrets.token_hex(8), policy, label, _now())
        with self._lock, db.write(self._engine) as conn:
            if _find(conn, policy) is None:
                raise SteerError(f"no policy named {policy!r}", field="policy")
            digest = key_hash(secret)
            if conn.execute(sa.select(db.api_keys.c.id).where(db.api_keys.c.sha256 == digest)).first():
                raise Conflict("this key is already bound; revoke it first", field="key")
            conn.execute(sa.insert(db.api_keys).values(**record.to_dict(), sha256=digest))
            marked = sa.select(db.deployment.c.value).where(db.deployment.c.name == "client_keys")
            if conn.execute(marked).first() is None:  # closed from now on (``closed``)
                conn.execute(sa.insert(db.deployment).values(name="client_keys", value="closed"))
        return record, generated

    def list_keys(self) -> list[ApiKey]:
        with db.read(self._engine) as conn:
            rows = conn.execute(sa.select(db.api_keys).order_by(db.api_keys.c.created, db.api_keys.c.id)).mappings()
            return [ApiKey(r["id"], r["policy"], r["label"], r["created"]) for r in rows]

    def revoke(self, key_id: str) -> ApiKey:
        """Remove a key by its id; requests with it get 401 from then on, on every replica sharing the store (each
        request looks its key up in the store)."""
        with self._lock, db.write(self._engine) as conn:
            row = conn.execute(sa.select(db.api_keys).where(db.api_keys.c.id == key_id)).mappings().first()
            if row is None:
                raise NotFound(f"no API key with id {key_id!r}", field="id")
            conn.execute(sa.delete(db.api_keys).where(db.api_keys.c.id == key_id))
        return ApiKey(row["id"], row["policy"], row["label"], row["created"])

    def closed(self) -> bool:
        """Whether a client key was ever bound (or one is bound, in a store from before this was recorded):
        from then on a key no policy binds is refused, also once every key is revoked."""
        with db.read(self._engine) as conn:
            marked = conn.execute(sa.select(db.deployment.c.value).where(db.deployment.c.name == "client_keys"))
            return marked.first() is not None or conn.execute(sa.select(db.api_keys.c.id).limit(1)).first() is not None

    def policy_for_key(self, key: str) -> Policy | None:
        """The policy ``key`` is bound to, or None for a key the store does not know."""
        with db.read(self._engine) as conn:
            name = conn.execute(sa.select(db.api_keys.c.policy)
                                .where(db.api_keys.c.sha256 == key_hash(key))).scalar()
            return None if name is None else _find(conn, name)
