"""The audit log of the admin API: one entry per admin request, in the store's SQLite manifest.

An entry says who (``actor``: a stable id of the credential, ``actor_id``; never the secret itself), what
(``action``, the route, and the artifact's name, version and kind), when (``at``, ISO-8601 UTC), the sha256
of the artifact bytes where there are bytes (an uploaded file's, even a refused one's; a stored
artifact's), and the outcome: ``ok``, ``refused`` (4xx) or ``failed`` (5xx), with the status and, when
refused or failed, the field and the reason the client was given.

Entries are only ever added; ``entries`` lists them newest first. Which requests are logged, and how an
entry is filled in from one, is the API's business (``api.admin_audit``).

An admin request that stores an artifact gets its entry in the same transaction as the artifact's row
(``Acting``): a crash between the two can leave neither or both, never an artifact nobody is recorded as
having stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from steerserve.store import db

OUTCOMES = ("ok", "refused", "failed")
_TEXT_CAP = 1024  # characters kept of a name or a reason: a client chooses them, the log must stay small


def actor_id(secret: str, role: str = "admin") -> str:
    """``"<role>:<first 8 hex of sha256(secret)>"``: names the credential in the log without revealing it."""
    return f"{role}:{hashlib.sha256(secret.encode()).hexdigest()[:8]}"


def outcome_of(status: int) -> str:
    return "ok" if status < 400 else "refused" if status < 500 else "failed"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _cap(text: str | None) -> str | None:
    return None if text is None else text[:_TEXT_CAP]


@dataclass(frozen=True)
class AuditEntry:
    """One admin request. ``artifacts``: every artifact it acted on, ``{"ref", "kind", "sha256"}`` each;
    ``name``/``version``/``kind``/``sha256`` describe the one artifact (or what the request named)."""

    actor: str
    action: str  # upload, compute, create, enable, disable, delete, read, ...
    route: str  # "POST /admin/vectors"
    status: int
    at: str = dataclasses.field(default_factory=now)
    name: str | None = None
    version: int | None = None
    kind: str | None = None
    sha256: str | None = None
    artifacts: tuple[dict[str, Any], ...] = ()
    field: str | None = None  # the refused input, as the error's ``param`` named it
    reason: str | None = None  # the error message the client got
    id: int | None = None  # assigned when recorded

    @property
    def outcome(self) -> str:
        return outcome_of(self.status)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``outcome``; ``id`` and ``at`` first."""
        d = asdict(self)
        return {"id": d.pop("id"), "at": d.pop("at"), **d, "artifacts": list(self.artifacts),
                "outcome": self.outcome}


@dataclass
class Acting:
    """The admin request being served, for a store commit made on its behalf: who (``actor``), and what
    (``describe()`` -> action, route; asked at commit time, when routing has named the route). The commit
    records its entry in its own transaction and leaves the entry's id in ``recorded``."""

    actor: str
    describe: Callable[[], tuple[str, str]]
    recorded: int | None = None

    def entry(self, ref: str, name: str, version: int, kind: str, sha256: str) -> AuditEntry:
        action, route = self.describe()
        return AuditEntry(actor=self.actor, action=action, route=route, status=201, name=name, version=version,
                          kind=kind, sha256=sha256, artifacts=({"ref": ref, "kind": kind, "sha256": sha256},))


# Set by the audit middleware around an admin request; copied into the worker threads it runs the store in.
ACTING: ContextVar[Acting | None] = ContextVar("steerserve_audit_acting", default=None)


def insert(conn: Connection, entry: AuditEntry) -> int:
    """Append ``entry`` inside the caller's write transaction; its id."""
    row = {**asdict(entry), "name": _cap(entry.name), "reason": _cap(entry.reason), "field": _cap(entry.field),
           "artifacts": list(entry.artifacts), "outcome": entry.outcome}
    del row["id"]
    key = conn.execute(sa.insert(db.audit).values(**row)).inserted_primary_key
    assert key is not None  # an INSERT always has one
    return int(key[0])


class AuditLog:
    """The ``audit`` table of one store's manifest (``db.make_engine`` creates it); safe to share between
    threads. Writes are short ``BEGIN IMMEDIATE`` transactions, like the store's own."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def record(self, entry: AuditEntry) -> AuditEntry:
        """Append ``entry``; returns it with its ``id``."""
        with db.write(self._engine) as conn:
            key = insert(conn, entry)
        return dataclasses.replace(entry, id=key)

    def entries(self, *, limit: int = 100, before: int | None = None, action: str | None = None,
                name: str | None = None, kind: str | None = None, outcome: str | None = None,
                actor: str | None = None) -> list[AuditEntry]:
        """At most ``limit`` entries, newest first, older than entry ``before`` if given, matching every
        filter given (exact matches)."""
        t = db.audit
        q = sa.select(t).order_by(t.c.id.desc()).limit(max(0, int(limit)))
        if before is not None:
            q = q.where(t.c.id < before)
        for column, value in ((t.c.action, action), (t.c.name, name), (t.c.kind, kind), (t.c.outcome, outcome),
                              (t.c.actor, actor)):
            if value is not None:
                q = q.where(column == value)
        with db.read(self._engine) as conn:
            rows = conn.execute(q).mappings().all()
        out = []
        for r in rows:
            values = {k: v for k, v in r.items() if k != "outcome"}  # derived from the status
            out.append(AuditEntry(**{**values, "artifacts": tuple(values["artifacts"])}))
        return out
