"""The artifact store: steering vectors, directions, refusal controllers, SafeSwitch probes and heads, MoE
expert sets and ActAdd prompt pairs as safetensors files plus manifest rows.

Files live at ``<root>/artifacts/<name>/<version>.safetensors``; the SQLite manifest (``db.py``) decides
what exists. A write lands the file first (temp file, fsync, rename, fsync of the folder) and only then
commits the row, so a reader that finds a row always finds its file. The store is bound to one model and
refuses vectors that do not fit it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from sqlalchemy.engine import Engine

from steerserve.errors import SteerError
from steerserve.model_info import LAYER_CONVENTION, ModelInfo
from steerserve.runtime.controller import ControllerWeights
from steerserve.runtime.safeswitch import HeadDelta, Probe
from steerserve.store import audit, db
from steerserve.store.audit import AuditLog
from steerserve.store.controllers import check_controller
from steerserve.store.db import ArtifactMeta, check_name, parse_ref
from steerserve.store.expert_sets import ExpertSet, check_expert_set
from steerserve.store.formats import file_header, from_gguf, gguf_field
from steerserve.store.gguf_io import is_gguf
from steerserve.store.sae import Sae, SaeFile, check_sae
from steerserve.store.safeswitch import check_head, check_probes
from steerserve.store.uploads import FILE_KINDS, Declared, read_upload
from steerserve.store.vetting import NormPolicy, check_vectors

__all__ = ["FILE_KINDS", "ArtifactMeta", "ArtifactStore", "StoredController", "StoredPair", "StoredVector",
           "Vet", "check_name", "file_header", "parse_ref"]

KINDS = ("vector", "pair", "direction", "controller", "probe", "head", "expert_set", "sae")
STEERING_KINDS = ("vector", "direction")  # what ``add`` and ``ablate`` take (``directions`` describes the latter)
Vet = Callable[[Declared], Mapping[str, Any]]  # the server's KL vetting of an upload (``methods.vetting``)


@dataclass(frozen=True)
class StoredVector:
    meta: ArtifactMeta
    tensors: dict[int, torch.Tensor]  # layer -> [hidden] float32
    header: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the file's safetensors metadata

    def calibration(self) -> dict[str, Any] | None:
        """The ``calibration`` metadata ``steerserve calibrate`` wrote (JSON), or None if uncalibrated."""
        raw = self.header.get("calibration")
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    @property
    def is_direction(self) -> bool:
        return self.meta.kind == "direction"

    def scale(self) -> float:
        """A direction's ``scale`` (the layer's mean residual norm: ``add``'s unit of ``coeff``)."""
        return float(self.header["scale"])

    def candidates(self) -> list[Any]:
        """A direction's candidate table (JSON), or [] if it has none."""
        value = json.loads(self.header.get("candidates", "[]"))
        return value if isinstance(value, list) else []


@dataclass(frozen=True)
class StoredController:
    """A refusal controller (``store.controllers``): its fp32 weights and default ``alpha``."""

    meta: ArtifactMeta
    weights: ControllerWeights
    alpha: float
    header: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the file's safetensors metadata


@dataclass(frozen=True)
class StoredPair:
    meta: ArtifactMeta
    positive: str
    negative: str
    layer: int | None
    coeff: float | None


class ArtifactStore:
    """Versioned vectors and pairs for one loaded model; safe to share between threads."""

    def __init__(self, root: Path, model: ModelInfo, url: str | None = None) -> None:
        """Open (creating if needed) the store under ``root`` and remove what a crashed write left behind.
        ``url``: a PostgreSQL manifest shared by replicas (whose ``root`` is on storage they share) instead
        of ``root/manifest.sqlite``."""
        self.root, self.model = Path(root), model
        self.dir = self.root / "artifacts"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._engine = db.make_engine(url if url is not None else self.root / "manifest.sqlite")
        self.audit = AuditLog(self._engine)  # the admin API's log, in the same manifest
        self.policy = NormPolicy()  # no norm limit until set_norm_policy
        self.max_description_chars = 1024
        # The database's write lock (``db.write``) already serialises writers, across processes too; this
        # lock only queues our own threads in Python instead of letting them wait on SQLITE_BUSY.
        self._lock = threading.Lock()
        with self._lock, db.write(self._engine) as conn:
            db.remove_orphans(conn, self.dir)

    def set_norm_policy(self, typical_norms: list[float], max_ratio: float) -> None:
        """Refuse vectors whose norm at a layer exceeds ``max_ratio`` x the model's typical residual-stream
        norm there (``tools.norms``): such a vector would swamp the stream (or overflow it) at any useful
        coefficient. Without a policy only non-finite values and zero layers are refused."""
        if len(typical_norms) != self.model.num_layers:
            raise ValueError(f"{len(typical_norms)} norms for a model of {self.model.num_layers} layers")
        self.policy = NormPolicy(tuple(typical_norms), float(max_ratio))

    def close(self) -> None:
        """Release the database connections (the store must not be used afterwards)."""
        self._engine.dispose()

    @property
    def engine(self) -> Engine:
        """The manifest's engine, shared with the tables kept beside the artifacts (``store.policies``)."""
        return self._engine

    def put_vector(self, name: str, tensors: Mapping[int, torch.Tensor], *, method: str = "upload",
                   provenance: Mapping[str, Any] | None = None, description: str = "",
                   hidden_size: int | None = None, num_layers: int | None = None,
                   vet: Vet | None = None) -> ArtifactMeta:
        """Store per-layer vectors as the next version of ``name``. ``hidden_size``/``num_layers`` are
        what the producer declares; they, and every tensor, are checked against the loaded model. ``vet``:
        as ``put_vector_file``'s (the declared strength of a JSON upload is 1: the vectors as given)."""
        check_name(name)
        vecs = check_vectors(self.model, tensors, hidden_size, num_layers, self.policy)
        data = safetensors.torch.save({f"layer.{i}": v for i, v in sorted(vecs.items())},
                                      metadata=self._header("vector", method=method))
        if vet is not None:
            provenance = {**(provenance or {}), "vetting": dict(vet(Declared("vector", 1.0, vecs)))}
        return self._commit(name, "vector", data, vecs, method, provenance, description)

    def put_vector_file(self, name: str, data: bytes, *, description: str = "",
                        provenance: Mapping[str, Any] | None = None, vet: Vet | None = None,
                        once: bool = False) -> ArtifactMeta:
        """Store uploaded safetensors bytes (checked by ``uploads.read_upload``): tensors named ``layer.<i>``
        (a vector, or a ``direction``: one unit vector and its layer), or a ``controller``, ``probe`` or
        ``head`` file with its own tensors. ``vet`` (the server's KL vetting) runs on what the file does at
        its declared strength before the commit; its figures go into the provenance (``vetting``), and a
        refusal (a ``SteerError``) stores nothing.

        Once checked, the bytes are stored verbatim, so ``sha256`` is that of the upload: importing the same
        file again is recognisable (the start-up import of ``vectors_dir`` relies on it). A llama.cpp / repeng
        GGUF control vector (``formats.from_gguf``) is stored as the safetensors file it converts to, with
        the same checks; the provenance's ``imported_from`` records the GGUF's own sha256 and keys. ``once``:
        if a version of ``name`` already holds these bytes, return it and store nothing, decided under the
        write lock (replicas starting together import the shipped vectors once between them).
        """
        check_name(name)
        source: dict[str, Any] | None = None
        if is_gguf(data):
            data, source = from_gguf(self.model, data)
        try:
            upload = read_upload(self.model, data, self.policy)
        except SteerError as exc:
            if source is not None:
                exc.field = gguf_field(exc.field)
            raise
        # The candidate table can be long: it stays in the file, the manifest row keeps the rest.
        shown = {k: v for k, v in upload.header.items() if k != "candidates"}
        prov = {"source": "file upload", "file_metadata": shown, **({"imported_from": source} if source else {}),
                **(provenance or {})}
        if vet is not None:
            prov["vetting"] = dict(vet(upload.declared))
        return self._commit(name, upload.kind, data, upload.vectors, upload.header.get("method") or "upload", prov,
                            description, layers=upload.layers, once=once)

    def put_pair(self, name: str, positive: str, negative: str, *, layer: int | None = None,
                 coeff: float | None = None, description: str = "",
                 provenance: Mapping[str, Any] | None = None) -> ArtifactMeta:
        """Store an ActAdd prompt pair (texts in the file's metadata) as the next version of ``name``."""
        check_name(name)
        for field, text in (("positive", positive), ("negative", negative)):
            if not isinstance(text, str) or not text.strip():
                raise SteerError("must be a non-empty string", field=field)
        header, n = self._header("pair", positive=positive, negative=negative), self.model.num_layers
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
                raise SteerError(f"layer {layer!r} is outside [0, {n}) for the loaded model", field="layer")
            header["layer"] = str(layer)
        if coeff is not None:
            if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff):
                raise SteerError(f"must be a finite number, got {coeff!r}", field="coeff")
            header["coeff"] = repr(float(coeff))  # repr round-trips a float exactly
        # safetensors needs at least one tensor; the pair itself lives in the metadata.
        data = safetensors.torch.save({"pair": torch.zeros(1)}, metadata=header)
        return self._commit(name, "pair", data, {}, None, provenance, description)

    def set_enabled(self, name: str, enabled: bool, version: int | None = None) -> list[ArtifactMeta]:
        """Enable or disable one version (all of them when ``version`` is None); returns the new rows."""
        check_name(name)
        with self._lock, db.write(self._engine) as conn:
            metas = db.targets(conn, name, version)
            db.update_enabled(conn, name, [m.version for m in metas], bool(enabled))
        return [replace(m, enabled=bool(enabled)) for m in metas]

    def delete(self, name: str, version: int | None = None) -> list[ArtifactMeta]:
        """Delete one version (all when ``version`` is None); returns what was deleted.

        The row goes first: once it commits the artifact is invisible, and a crash before the file is
        unlinked leaves an orphan that the next open removes. Version numbers are never reused.
        """
        check_name(name)
        with self._lock:
            with db.write(self._engine) as conn:
                metas = db.targets(conn, name, version)
                db.delete_rows(conn, name, [m.version for m in metas])
            for m in metas:
                self._path(m.name, m.version).unlink(missing_ok=True)
            folder = self.dir / name
            if folder.is_dir():
                db.fsync_dir(folder)
                if not any(folder.iterdir()):  # the last version went: no empty folder stays behind
                    folder.rmdir()
                    db.fsync_dir(self.dir)
        return metas

    def get(self, ref: str, kind: str | tuple[str, ...] | None = None, *, field: str = "name",
            require_enabled: bool = False) -> ArtifactMeta:
        """Resolve ``name`` (latest version) or ``name@v``, of ``kind`` (or one of several kinds) if given;
        every failure is a 400 naming ``field``."""
        kinds = (kind,) if isinstance(kind, str) else kind
        for k in kinds or ():
            if k not in KINDS:
                raise SteerError(f"unknown kind {k!r}; expected one of {list(KINDS)}", field="kind")
        name, version = parse_ref(ref, field)
        what = " or ".join(kinds) if kinds else "artifact"
        with db.read(self._engine) as conn:
            meta = db.find(conn, name, version)
            latest = None if meta or version is None else db.find(conn, name, None)
        if meta is None:
            hint = f" (latest is {latest.ref()})" if latest else ""
            raise SteerError(f"unknown {what} {ref!r}{hint}", field=field, code="unknown_artifact")
        if kinds is not None and meta.kind not in kinds:
            raise SteerError(f"{meta.ref()!r} is a {meta.kind}, not a {what}", field=field, code="wrong_kind")
        if require_enabled and not meta.enabled:
            raise SteerError(f"{what} {meta.ref()!r} is disabled", field=field, code="disabled_artifact")
        return meta

    def load_vector(self, ref: str, *, field: str = "vector", require_enabled: bool = True,
                    kinds: tuple[str, ...] = ("vector",)) -> StoredVector:
        """The vector ``ref`` names, with its per-layer tensors, if it was made for the loaded model.
        ``kinds=STEERING_KINDS`` also accepts a direction (its one layer holds the unit vector)."""
        meta = self.get(ref, kinds, field=field, require_enabled=require_enabled)
        data = self._read(meta, field)
        tensors = safetensors.torch.load(data)
        # Uploaded files are stored as sent (maybe float16); callers always get float32.
        return StoredVector(meta, {int(k.split(".", 1)[1]): v.float() for k, v in tensors.items()},
                            db.header_metadata(data))

    def file_bytes(self, ref: str, kind: str | tuple[str, ...] | None = None, *,
                   field: str = "name") -> tuple[ArtifactMeta, bytes]:
        """The artifact ``ref`` names and its verified file bytes (enabled or not), if made for the loaded
        model: what an export writes out."""
        meta = self.get(ref, kind, field=field)
        return meta, self._read(meta, field)

    def load_probes(self, ref: str, *, field: str = "probe",
                    require_enabled: bool = True) -> tuple[ArtifactMeta, Probe, Probe, float]:
        """The SafeSwitch probes ``ref`` names: ``(meta, stage 1, stage 2, default threshold)``, fp32."""
        meta = self.get(ref, "probe", field=field, require_enabled=require_enabled)
        data = self._read(meta, field)
        stage1, stage2, threshold = check_probes(self.model, db.header_metadata(data), safetensors.torch.load(data))
        return meta, stage1, stage2, threshold

    def load_head(self, ref: str, *, field: str = "head",
                  require_enabled: bool = True) -> tuple[ArtifactMeta, HeadDelta]:
        """The refusal head ``ref`` names: ``(meta, delta)``, fp32 (``meta.provenance`` holds its metadata)."""
        meta = self.get(ref, "head", field=field, require_enabled=require_enabled)
        data = self._read(meta, field)
        return meta, check_head(self.model, db.header_metadata(data), safetensors.torch.load(data))
    def load_expert_set(self, ref: str, *, field: str = "experts",
                        require_enabled: bool = True) -> tuple[ArtifactMeta, ExpertSet]:
        """The expert set ``ref`` names (``store.expert_sets``), checked against the loaded model's MoE layout."""
        meta = self.get(ref, "expert_set", field=field, require_enabled=require_enabled)
        data = self._read(meta, field)
        return meta, check_expert_set(self.model, db.header_metadata(data), safetensors.torch.load(data))

    def load_controller(self, ref: str, *, field: str = "controller",
                        require_enabled: bool = True) -> StoredController:
        """The refusal controller ``ref`` names (fp32 weights, default ``alpha``), if made for the loaded model."""
        meta = self.get(ref, "controller", field=field, require_enabled=require_enabled)
        data = self._read(meta, field)
        header = db.header_metadata(data)
        weights, alpha = check_controller(self.model, header, safetensors.torch.load(data))
        return StoredController(meta, weights, alpha, header)

    def load_pair(self, ref: str, *, field: str = "pair", require_enabled: bool = True) -> StoredPair:
        """The prompt pair ``ref`` names, if it was made for the loaded model."""
        meta = self.get(ref, "pair", field=field, require_enabled=require_enabled)
        h = db.header_metadata(self._read(meta, field))
        layer, coeff = h.get("layer"), h.get("coeff")
        return StoredPair(meta, h["positive"], h["negative"], None if layer is None else int(layer),
                          None if coeff is None else float(coeff))

    def _path(self, name: str, version: int) -> Path:
        return self.dir / name / f"{version}.safetensors"

    def _header(self, kind: str, **extra: str) -> dict[str, str]:
        return file_header(self.model, kind, **extra)

    def _commit(self, name: str, kind: str, data: bytes, vecs: dict[int, torch.Tensor], method: str | None,
                provenance: Mapping[str, Any] | None, description: str,
                layers: tuple[int, ...] | None = None, once: bool = False) -> ArtifactMeta:
        """Allocate the next version, land the file durably, then insert its row, in one write transaction."""
        try:  # a deep, JSON-clean copy: the manifest stores it as JSON and must not fail at commit
            prov = json.loads(json.dumps(dict(provenance or {}), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise SteerError(f"must be a JSON object: {e}", field="provenance") from None
        if not isinstance(description, str):
            raise SteerError("must be a string", field="description")
        if len(description) > self.max_description_chars:
            raise SteerError(f"is {len(description)} characters; the limit is {self.max_description_chars}",
                             field="description")
        sha, m = hashlib.sha256(data).hexdigest(), self.model
        norms = {i: float(v.norm()) for i, v in sorted(vecs.items())}
        layers = tuple(sorted(vecs)) if layers is None else layers
        with self._lock:
            final: Path | None = None
            written: os.stat_result | None = None
            try:
                with db.write(self._engine) as conn:
                    same = db.find_sha(conn, name, sha) if once else None
                    if same is not None:
                        return same
                    version = db.next_version(conn, name)
                    final = self._path(name, version)
                    written = db.write_durably(final, data)
                    created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
                    meta = ArtifactMeta(name, version, kind, m.fingerprint, m.name, m.hidden_size,
                                        m.num_layers, layers, method, prov, norms, sha, created, True,
                                        description, LAYER_CONVENTION)
                    db.insert_row(conn, meta)
                    acting = audit.ACTING.get()
                    if acting is not None:  # the admin request's entry commits with the row, or neither does
                        acting.recorded = audit.insert(conn, acting.entry(meta.ref(), name, version, kind, sha))
            except BaseException:
                # The row did not commit, so the file must not stay: no reader may see a file without a row.
                # Only our own file, though: a replica whose database connection died mid-commit lost its
                # version, which another replica may since have allocated and written at the same path.
                if final is not None and written is not None and db.same_file(final, written):
                    final.unlink()
                    db.fsync_dir(final.parent)
                raise
        return meta

    def load_sae(self, ref: str, *, field: str = "sae") -> tuple[ArtifactMeta, Sae]:
        """The whole dictionary ``ref`` names (encoder included: what inspecting features needs), fp32."""
        meta = self.get(ref, "sae", field=field, require_enabled=True)
        data = self._read(meta, field)
        return meta, check_sae(self.model, db.header_metadata(data), safetensors.torch.load(data))

    def open_sae(self, ref: str, *, field: str = "sae") -> SaeFile:
        """The dictionary ``ref`` names, opened for reading decoder rows (its bytes were checked at commit; a
        dictionary of a million features is not hashed again per request)."""
        meta = self.get(ref, "sae", field=field)
        self._mine(meta, field)
        return SaeFile.open(meta, self._path(meta.name, meta.version))

    def _mine(self, meta: ArtifactMeta, field: str) -> None:
        """Refuse an artifact made for another model."""
        if meta.model_fingerprint != self.model.fingerprint:
            theirs = f"{meta.model_name!r} (fingerprint {meta.model_fingerprint})"
            mine = f"{self.model.name!r} (fingerprint {self.model.fingerprint})"
            msg = f"{meta.kind} {meta.ref()!r} was made for model {theirs}, not the loaded model {mine}"
            raise SteerError(msg, field=field, code="model_mismatch")

    def _read(self, meta: ArtifactMeta, field: str) -> bytes:
        """The artifact's verified file bytes, refused if it was made for another model."""
        self._mine(meta, field)
        try:
            data = self._path(meta.name, meta.version).read_bytes()
        except FileNotFoundError:
            # delete() drops the row before the file, so a missing file usually means it was just deleted.
            self.get(meta.ref(), meta.kind, field=field)
            raise SteerError(f"{meta.kind} {meta.ref()!r} has a manifest row but no file", field=field,
                             status=500, code="missing_artifact") from None
        if hashlib.sha256(data).hexdigest() != meta.sha256:
            raise SteerError(f"{meta.kind} {meta.ref()!r} does not match its recorded sha256", field=field,
                             status=500, code="corrupt_artifact")
        return data

    # Last in the class body: once defined, ``list`` here would shadow the builtin in later annotations.
    def list(self, kind: str | tuple[str, ...] | None = None) -> list[ArtifactMeta]:
        """Every version of every artifact (of ``kind``, or of one of several, if given), whatever model it
        was made for."""
        kinds = (kind,) if isinstance(kind, str) else kind
        for k in kinds or ():
            if k not in KINDS:
                raise SteerError(f"unknown kind {k!r}; expected one of {list(KINDS)}", field="kind")
        with db.read(self._engine) as conn:
            rows = db.select(conn)
        return rows if kinds is None else [m for m in rows if m.kind in kinds]
