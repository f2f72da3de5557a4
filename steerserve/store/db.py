"""Persistence for the artifact store: the manifest (SQLAlchemy Core; SQLite, or PostgreSQL shared by
replicas) and durable file writes.

A row is the artifact's existence: a file on disk without a row is an orphan of a crash and is removed
when the store opens. ``ArtifactMeta`` is the Python view of a row. Nothing here knows the loaded model;
validation against it is ``artifacts.py``'s job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from steerserve.errors import NotFound, SteerError
from steerserve.store import backend
from steerserve.store.backend import read as read  # re-exported: callers use db.read / db.write
from steerserve.store.backend import write as write

log = logging.getLogger(__name__)

# A row's key is (name, version); a reference is "name" (latest version) or "name@version".
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
NAME_RE = re.compile(_NAME)
REF_RE = re.compile(rf"(?P<name>{_NAME})(?:@(?P<version>[1-9][0-9]*))?")

metadata = sa.MetaData()

artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("model_fingerprint", sa.String, nullable=False),
    sa.Column("model_name", sa.String, nullable=False),
    sa.Column("hidden_size", sa.Integer, nullable=False),
    sa.Column("num_layers", sa.Integer, nullable=False),
    sa.Column("layers", sa.JSON, nullable=False),  # list[int]
    sa.Column("method", sa.String, nullable=True),
    sa.Column("provenance", sa.JSON, nullable=False),
    sa.Column("norms", sa.JSON, nullable=False),  # {"<layer>": norm}: JSON object keys are strings
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("created", sa.String, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("layer_convention", sa.Text, nullable=False),
)

# The highest version ever allocated per name. Kept apart from ``artifacts`` so that deleting the latest
# version never lets a later upload reuse its number: "name@3" must always mean the same bytes.
counters = sa.Table(
    "counters",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("last_version", sa.Integer, nullable=False),
)

# One row per admin request (``audit.py``): who, what, when, the artifact bytes' sha256, the outcome.
audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),  # the order requests finished in
    sa.Column("at", sa.String, nullable=False),  # ISO-8601 UTC
    sa.Column("actor", sa.String, nullable=False),  # a credential's id ("admin:<8 hex>"), never the secret
    sa.Column("action", sa.String, nullable=False),
    sa.Column("route", sa.String, nullable=False),  # "DELETE /admin/vectors/{name}"
    sa.Column("name", sa.String, nullable=True),
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("kind", sa.String, nullable=True),
    sa.Column("sha256", sa.String(64), nullable=True),
    sa.Column("artifacts", sa.JSON, nullable=False),  # [{"ref", "kind", "sha256"}] acted on
    sa.Column("outcome", sa.String(8), nullable=False),  # ok | refused | failed
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("field", sa.String, nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
)


# Policies (``store.policies``): what a client key may steer with and what every request under it gets.
# ``default`` governs requests without a key; with no row it is the built-in unrestricted one.
policies = sa.Table(
    "policies",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("mandatory", sa.JSON, nullable=False),  # list of intervention objects ({"method": ..., ...})
    sa.Column("allowed_methods", sa.JSON, nullable=True),  # list[str]; NULL: every method
    sa.Column("max_coeff", sa.Float, nullable=True),
    sa.Column("method_caps", sa.JSON, nullable=False),  # {"<method>": cap}
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("created", sa.String, nullable=False),
    sa.Column("updated", sa.String, nullable=False),
    sa.Column("requests_per_minute", sa.Float, nullable=True),  # added after the first release: see backend._create
)

# Client API keys: only the sha256 of a key is stored, never the key; ``id`` is what admins revoke by.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("policy", sa.String(64), nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("created", sa.String, nullable=False),
)

# Facts about the deployment as a whole that outlive the rows they were learnt from. ``client_keys`` =
# ``closed`` once a first client key was bound: unknown keys stay refused after every key is revoked.
deployment = sa.Table(
    "deployment",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

@dataclass(frozen=True)
class ArtifactMeta:
    """One manifest row: what an artifact is, what model it was made for and how it was made."""

    name: str
    version: int
    kind: str  # "vector" | "pair"
    model_fingerprint: str
    model_name: str
    hidden_size: int
    num_layers: int
    layers: tuple[int, ...]  # layers with a vector (empty for pairs)
    method: str | None  # how it was made: "mean_diff", "upload", "pca", ...
    provenance: dict[str, Any]  # free JSON
    norms: dict[int, float]  # L2 norm per layer (empty for pairs)
    sha256: str  # of the safetensors file bytes
    created: str  # ISO-8601 UTC
    enabled: bool
    description: str
    layer_convention: str

    def ref(self) -> str:
        """The exact reference, ``name@version``, that always resolves to these bytes."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (norms keyed by the layer as a string, as JSON requires)."""
        return {**meta_to_row(self), "ref": self.ref()}


def check_name(name: object, field: str = "name") -> str:
    """Return ``name`` if it is a valid artifact name, else raise a 400 naming ``field``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SteerError(f"invalid name {name!r}: 1-64 of A-Z a-z 0-9 _ . -, starting alphanumeric",
                         field=field)
    return name


def parse_ref(ref: object, field: str) -> tuple[str, int | None]:
    """Split ``"name"`` / ``"name@3"`` into (name, version or None for the latest)."""
    m = REF_RE.fullmatch(ref) if isinstance(ref, str) else None
    if m is None:
        raise SteerError(f"invalid reference {ref!r}: expected 'name' or 'name@version' (version >= 1)",
                         field=field)
    return m["name"], int(m["version"]) if m["version"] else None


def meta_to_row(meta: ArtifactMeta) -> dict[str, Any]:
    """Column values for ``artifacts`` (also the body of ``to_dict``): JSON-ready, deep-copied."""
    row = asdict(meta)
    row["layers"] = list(meta.layers)
    row["norms"] = {str(k): v for k, v in sorted(meta.norms.items())}
    return row


def row_to_meta(row: Mapping[Any, Any]) -> ArtifactMeta:
    """Inverse of ``meta_to_row`` for a row read back from SQLite."""
    return ArtifactMeta(**{
        **row,
        "layers": tuple(int(x) for x in row["layers"]),
        "provenance": dict(row["provenance"]),
        "norms": {int(k): float(v) for k, v in row["norms"].items()},
        "enabled": bool(row["enabled"]),
    })


def make_engine(target: Path | str) -> Engine:
    """An engine for the manifest, shared by threads and processes, with the tables created: a SQLite file
    (a ``Path``, the default) or a PostgreSQL URL that several replicas share (``store.backend``)."""
    return backend.make_engine(target, metadata)


# ---- queries (all take a connection inside a ``read``/``write`` transaction) ----------------------------


def next_version(conn: Connection, name: str) -> int:
    """Allocate the next version of ``name``; call inside ``write`` so no other writer can race it."""
    last = conn.execute(sa.select(counters.c.last_version).where(counters.c.name == name)).scalar()
    top = conn.execute(sa.select(sa.func.max(artifacts.c.version)).where(artifacts.c.name == name)).scalar()
    version = max(last or 0, top or 0) + 1
    if last is None:
        conn.execute(sa.insert(counters).values(name=name, last_version=version))
    else:
        conn.execute(sa.update(counters).where(counters.c.name == name).values(last_version=version))
    return version


def insert_row(conn: Connection, meta: ArtifactMeta) -> None:
    """Add the row that makes an artifact visible."""
    conn.execute(sa.insert(artifacts).values(**meta_to_row(meta)))


def find(conn: Connection, name: str, version: int | None) -> ArtifactMeta | None:
    """The row for ``name@version`` (the latest version when None), or None."""
    q = sa.select(artifacts).where(artifacts.c.name == name).order_by(artifacts.c.version.desc()).limit(1)
    row = conn.execute(q if version is None else q.where(artifacts.c.version == version)).mappings().first()
    return None if row is None else row_to_meta(row)


def find_sha(conn: Connection, name: str, sha256: str) -> ArtifactMeta | None:
    """The earliest version of ``name`` whose file bytes have this sha256, or None."""
    q = sa.select(artifacts).where(artifacts.c.name == name, artifacts.c.sha256 == sha256)
    row = conn.execute(q.order_by(artifacts.c.version).limit(1)).mappings().first()
    return None if row is None else row_to_meta(row)


def select(conn: Connection, *, name: str | None = None, kind: str | None = None) -> list[ArtifactMeta]:
    """Rows, optionally of one name and/or kind, sorted by name then version."""
    q = sa.select(artifacts).order_by(artifacts.c.name, artifacts.c.version)
    q = q if name is None else q.where(artifacts.c.name == name)
    q = q if kind is None else q.where(artifacts.c.kind == kind)
    return [row_to_meta(r) for r in conn.execute(q).mappings().all()]


def targets(conn: Connection, name: str, version: int | None) -> list[ArtifactMeta]:
    """The rows an admin operation acts on (all versions when None); an unknown one is a 404."""
    rows = [m for m in select(conn, name=name) if version is None or m.version == version]
    if not rows:
        if version is None:
            raise NotFound(f"no artifact named {name!r}", field="name")
        raise NotFound(f"artifact {name!r} has no version {version}", field="version")
    return rows


def update_enabled(conn: Connection, name: str, versions: list[int], enabled: bool) -> None:
    """Set the ``enabled`` flag of some versions of ``name``."""
    conn.execute(sa.update(artifacts).where(artifacts.c.name == name, artifacts.c.version.in_(versions))
                 .values(enabled=enabled))


def delete_rows(conn: Connection, name: str, versions: list[int]) -> None:
    """Remove rows; the version counter stays, so their numbers are never handed out again."""
    conn.execute(sa.delete(artifacts).where(artifacts.c.name == name, artifacts.c.version.in_(versions)))


# ---- files ----------------------------------------------------------------------------------------------

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable: without it a power cut can undo the directory entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def same_file(path: Path, stat: os.stat_result) -> bool:
    """Whether ``path`` is still the file ``stat`` was taken of (not one renamed over it since)."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (stat.st_dev, stat.st_ino)


def write_durably(final: Path, data: bytes) -> os.stat_result:
    """Write ``data`` to ``final`` so that it is either absent or complete, even across a power cut; returns
    the new file's ``stat`` (what ``same_file`` compares).

    The bytes go to a temp file in the same folder (so the rename cannot cross file systems), are fsynced,
    renamed over ``final`` and the folder is fsynced. A failure removes the temp file.
    """
    folder = final.parent
    if not folder.exists():
        folder.mkdir()
        fsync_dir(folder.parent)
    tmp = folder / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        written = os.stat(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return written


def header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` string dict of safetensors bytes (``safetensors.torch.load`` drops it)."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= len(data) - 8:
        raise ValueError("truncated header")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("__metadata__ must map strings to strings")
    return meta


def remove_orphans(conn: Connection, root: Path) -> None:
    """Delete temp files and files without a row under ``root/<name>/``, then empty folders.

    Call inside ``write``: holding the write lock, no writer in any process (or replica sharing the
    PostgreSQL manifest and this folder) is between landing its file and committing its row, since
    ``ArtifactStore`` lands files only inside ``write``; so every such file is an orphan of a crash.
    """
    known = {(r.name, f"{r.version}.safetensors") for r in conn.execute(
        sa.select(artifacts.c.name, artifacts.c.version))}
    for folder in (p for p in root.iterdir() if p.is_dir()):
        stale = [p for p in folder.iterdir() if p.is_file() and (p.name.startswith(TMP_PREFIX) or (
            p.suffix == ".safetensors" and (folder.name, p.name) not in known))]
        for p in stale:
            log.warning("artifact store: removing leftover %s", p)
            p.unlink(missing_ok=True)  # a delete() in another process may unlink it first
        if stale:
            fsync_dir(folder)
        if not any(folder.iterdir()):
            with contextlib.suppress(OSError):
                folder.rmdir()
