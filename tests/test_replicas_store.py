"""The artifact store on a shared PostgreSQL manifest, as replicas use it (in-process: two store instances on
one database and one folder stand for two replicas; ``test_replicas.py`` runs real server processes).

Each test gets a fresh database on a real PostgreSQL server (``tests.postgres``). The SQLite cases beside
them check that the same guarantees still hold on the default backend.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import sqlalchemy as sa

from steerserve.store import ArtifactStore
from steerserve.store import db as store_db
from steerserve.store.audit import ACTING, Acting, AuditEntry
from steerserve.store.policies import Policy, PolicyStore
from tests import postgres
from tests.test_store import MODEL, _put_concurrently, files, vecs

Opener = Callable[[], ArtifactStore]  # opens another "replica" on the same manifest and folder


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    with postgres.postgres_server() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    with postgres.fresh_database(pg_server) as url:
        yield url


@pytest.fixture(params=["postgres", "sqlite"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    opened: list[ArtifactStore] = []

    def open_store() -> ArtifactStore:
        opened.append(ArtifactStore(tmp_path, MODEL, url))
        return opened[-1]

    yield open_store
    for s in opened:
        s.close()


def test_manifest_is_in_postgres_not_sqlite(pg_url: str, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, MODEL, pg_url)
    try:
        store.put_vector("v", vecs(1))
        assert not list(tmp_path.glob("manifest.sqlite*"))
        engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.connect() as conn:
            rows = conn.execute(sa.select(store_db.artifacts.c.name, store_db.artifacts.c.version)).all()
        engine.dispose()
        assert [tuple(r) for r in rows] == [("v", 1)]
    finally:
        store.close()


def test_concurrent_puts_through_two_replicas(opener: Opener, tmp_path: Path) -> None:
    a, b = opener(), opener()
    got = _put_concurrently([a, b], 12)
    assert sorted(got) == list(range(1, 13))  # distinct versions, none lost
    assert len(files(tmp_path)) == 12
    for version, seed in got.items():  # each version holds its own upload's bytes, seen from both replicas
        for s in (a, b):
            assert s.load_vector(f"same@{version}").tensors[1].equal(vecs(seed)[1])


def test_opening_a_replica_keeps_another_replicas_upload_in_flight(opener: Opener, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Replica A has landed its file (no row yet) and pauses before committing; replica B opens meanwhile.
    # B's orphan cleanup must wait for A's write lock and then find A's row, not delete A's file.
    a = opener()
    landed, go_on = threading.Event(), threading.Event()
    real = store_db.write_durably

    def paused(final: Path, data: bytes) -> os.stat_result:
        written = real(final, data)
        landed.set()
        assert go_on.wait(30)
        return written

    monkeypatch.setattr(store_db, "write_durably", paused)
    put: dict[str, Any] = {}
    writer = threading.Thread(target=lambda: put.setdefault("meta", a.put_vector("inflight", vecs(7))))
    writer.start()
    assert landed.wait(30)
    assert (tmp_path / "artifacts" / "inflight" / "1.safetensors").exists()
    opened: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: opened.setdefault("store", opener()))
    reader.start()
    reader.join(timeout=1.5)
    assert reader.is_alive(), "the second replica finished opening while the first held the write lock"
    go_on.set()
    writer.join(timeout=30)
    reader.join(timeout=30)
    assert not writer.is_alive() and not reader.is_alive()
    assert put["meta"].ref() == "inflight@1"
    assert files(tmp_path) == ["inflight/1.safetensors"]
    assert opened["store"].load_vector("inflight").tensors[2].equal(vecs(7)[2])


def test_a_replica_that_lost_its_database_spares_the_file_another_wrote(opener: Opener, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A lands "v@1" and then loses its connection before the row commits; meanwhile B (which the database
    # gave version 1 once A's transaction died) wrote its own file at the same path. A's cleanup must not
    # delete B's file: it removes only the file it wrote itself.
    a = opener()
    real = store_db.insert_row
    other = b"the bytes replica B wrote"

    def connection_lost(conn: Any, meta: Any) -> None:
        store_db.write_durably(tmp_path / "artifacts" / "v" / "1.safetensors", other)  # B, at the same path
        raise sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(store_db, "insert_row", connection_lost)
    with pytest.raises(sa.exc.OperationalError):
        a.put_vector("v", vecs(1))
    assert (tmp_path / "artifacts" / "v" / "1.safetensors").read_bytes() == other
    monkeypatch.setattr(store_db, "insert_row", real)

    def failed_alone(conn: Any, meta: Any) -> None:
        raise sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))

    (tmp_path / "artifacts" / "v" / "1.safetensors").unlink()
    monkeypatch.setattr(store_db, "insert_row", failed_alone)
    with pytest.raises(sa.exc.OperationalError):
        a.put_vector("w", vecs(1))
    assert files(tmp_path) == []  # its own file is still removed


def test_an_admin_commit_and_its_audit_entry_are_one_transaction(opener: Opener, tmp_path: Path) -> None:
    store = opener()
    acting = Acting("admin:0123abcd", lambda: ("upload", "POST /admin/vectors"))
    token = ACTING.set(acting)
    try:
        meta = store.put_vector("audited", vecs(3))
    finally:
        ACTING.reset(token)
    (entry,) = store.audit.entries(name="audited")
    assert (entry.id, entry.action, entry.version, entry.sha256, entry.status) == \
        (acting.recorded, "upload", 1, meta.sha256, 201)
    assert entry.artifacts == ({"ref": "audited@1", "kind": "vector", "sha256": meta.sha256},)

    def broken() -> tuple[str, str]:
        raise RuntimeError("the audit entry could not be written")

    token = ACTING.set(Acting("admin:0123abcd", broken))
    try:
        with pytest.raises(RuntimeError):
            store.put_vector("audited", vecs(4))
    finally:
        ACTING.reset(token)
    assert [m.ref() for m in store.list() if m.name == "audited"] == ["audited@1"]  # the artifact went with it
    assert files(tmp_path) == ["audited/1.safetensors"]


def test_an_orphan_is_still_removed(opener: Opener, tmp_path: Path) -> None:
    # The other half: a file no writer is landing (a crash's leftover) goes when a replica opens.
    a = opener()
    a.put_vector("v", vecs(1))
    (tmp_path / "artifacts" / "v" / "9.safetensors").write_bytes(b"left by a crash")
    (tmp_path / "artifacts" / "v" / f"{store_db.TMP_PREFIX}dead").write_bytes(b"half")
    opener()
    assert files(tmp_path) == ["v/1.safetensors"]


def test_import_once_across_replicas(opener: Opener) -> None:
    # Replicas starting together import the shipped vectors: one version per file between them.
    stores = [opener(), opener()]
    data = safetensors.torch.save({f"layer.{i}": t for i, t in vecs(3).items()})
    barrier, refs, errors = threading.Barrier(6), [], []

    def work(i: int) -> None:
        try:
            barrier.wait()
            refs.append(stores[i % 2].put_vector_file("shipped", data, once=True).ref())
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and refs == ["shipped@1"] * 6
    assert [m.ref() for m in stores[1].list()] == ["shipped@1"]
    assert stores[0].put_vector_file("shipped", data).ref() == "shipped@2"  # without once: a new version


def test_policies_and_audit_on_postgres(pg_url: str, tmp_path: Path) -> None:
    a, b = ArtifactStore(tmp_path, MODEL, pg_url), ArtifactStore(tmp_path, MODEL, pg_url)
    try:
        PolicyStore(a.engine).put(Policy("tight", max_coeff=2.0), replace=False)
        _, key = PolicyStore(a.engine).add_key("tight")
        assert key is not None
        seen = PolicyStore(b.engine).policy_for_key(key)
        assert seen is not None and (seen.name, seen.max_coeff) == ("tight", 2.0)
        ids = [s.audit.record(AuditEntry("admin:x", "upload", "POST /admin/vectors", 201, name=f"n{i}")).id
               for i, s in enumerate((a, b, a))]
        assert None not in ids and len(set(ids)) == 3
        assert [e.id for e in b.audit.entries()] == ids[::-1]  # ids in the order the entries were recorded
        assert [e.name for e in a.audit.entries()] == ["n2", "n1", "n0"]
    finally:
        a.close()
        b.close()


def test_tables_created_once_by_replicas_starting_together(pg_url: str, tmp_path: Path) -> None:
    # Without the lock around CREATE TABLE, one of several openers on an empty database fails.
    stores: list[ArtifactStore] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work() -> None:
        try:
            barrier.wait()
            stores.append(ArtifactStore(tmp_path, MODEL, pg_url))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [], errors
        assert time.monotonic() - start < 30
        stores[0].put_vector("v", vecs(1))
        assert [m.ref() for m in stores[3].list()] == ["v@1"]
    finally:
        for s in stores:
            s.close()


def test_a_postgres_store_from_an_older_release_gains_new_columns(pg_url: str) -> None:
    # As on SQLite (test_admission): a nullable column added after a release is added when the store opens.
    old = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with old.begin() as conn:
        conn.execute(sa.text("CREATE TABLE policies (name VARCHAR(64) PRIMARY KEY, mandatory JSON NOT NULL, "
                             "allowed_methods JSON, max_coeff FLOAT, method_caps JSON NOT NULL, description TEXT "
                             "NOT NULL, created VARCHAR NOT NULL, updated VARCHAR NOT NULL)"))
        conn.execute(sa.text("INSERT INTO policies VALUES ('old', '[]', NULL, 2.0, '{}', 'before', 'x', 'x')"))
    old.dispose()
    engine = store_db.make_engine(pg_url)
    try:
        policy = PolicyStore(engine).get("old")
        assert (policy.max_coeff, policy.requests_per_minute) == (2.0, None)
    finally:
        engine.dispose()
