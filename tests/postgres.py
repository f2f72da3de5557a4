"""A real PostgreSQL server for the replica tests, and a fresh database on it per test.

``postgres_server`` starts a throwaway server from the machine's own PostgreSQL binaries (``initdb`` and
``pg_ctl``, found under /usr/lib/postgresql/*/bin, via ``pg_config --bindir`` or on PATH) in a temp folder,
on a free loopback port, without fsync; as root it runs them as the ``postgres`` OS user, since PostgreSQL
refuses to run as root. Where no binaries are found it falls back to the server at
``$STEERSERVE_TEST_PG_URL`` (default: the local service, ``postgresql://postgres@127.0.0.1:5432/postgres``).
Neither available: the tests fail under CI (``$CI`` set) and are skipped elsewhere, saying why.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

FALLBACK_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, newest major version first; None if there is none."""
    candidates = [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        candidates.append(Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                              check=True).stdout.strip()))
    if (initdb := shutil.which("initdb")) is not None:
        candidates.append(Path(initdb).parent)
    return next((d for d in candidates if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _throwaway(bindir: Path) -> Iterator[str]:
    """initdb + pg_ctl start in a temp folder; yields the admin URL; stops the server and removes the folder."""
    # Not pytest's tmp_path: it sits under a 0700 folder of root's that the postgres user cannot enter.
    folder = Path(tempfile.mkdtemp(prefix="steerserve-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    pg_ctl = [*run_as, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        # -k: the Unix socket in our folder (the default one may belong to the machine's own service).
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        subprocess.run([*pg_ctl, "-o", options, "-l", str(folder / "log"), "-w", "-t", "60", "start"],
                       check=True, capture_output=True)
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"no PostgreSQL for the replica tests: {reason}")
    pytest.skip(f"no PostgreSQL: {reason}")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """An admin URL (database ``postgres``) of a server the tests may create databases on."""
    bindir = _bindir()
    with contextlib.ExitStack() as stack:
        if bindir is not None:
            try:
                url = stack.enter_context(_throwaway(bindir))
            except subprocess.CalledProcessError as exc:
                detail = (exc.stderr or b"").decode(errors="replace")[-2000:]
                _unavailable(f"starting a server from {bindir} failed: {detail}")
        else:
            url = os.environ.get("STEERSERVE_TEST_PG_URL", FALLBACK_URL)
            engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
            except sa.exc.OperationalError as exc:
                _unavailable(f"no initdb/pg_ctl on this machine and {url} does not answer: {exc}")
            finally:
                engine.dispose()
        yield url


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server (dropped afterwards, with any connections left to it)."""
    name = f"steerserve_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url.replace("postgresql://", "postgresql+psycopg://", 1),
                             isolation_level="AUTOCOMMIT")  # CREATE/DROP DATABASE cannot run in a transaction
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
