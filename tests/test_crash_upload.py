"""Crash test for the artifact store: SIGKILL a real server in the middle of a burst of uploads, restart it.

The server runs as a subprocess (``python -m steerserve serve --engine hf``) on a temp ``--home``. Each of
three rounds uploads 50 small random vectors through ``POST /admin/vectors`` while another thread
SIGKILLs the server after a random delay, so the kill can land anywhere in an upload: before the temp file,
between the rename and the manifest commit, after the commit but before the response. The server is then
restarted on the same home, and the test checks what the store promises (README, "Artifact store"):

- no acknowledged upload is lost: every 201 before the kill is listed after the restart, with the same
  sha256 (a version number reused after a crash would show up as a different hash);
- no phantom: at most the one upload in flight at the kill appears without having been acknowledged;
- every listed version loads and steers (``/generate`` with it returns 200 and names it as applied);
- no orphan: the files ``<home>/store/<fingerprint>/artifacts/<name>/<v>.safetensors`` are exactly the
  listed versions, and no ``.tmp-*`` file remains.

``pytest -s`` shows the figures of every round. ``STEERSERVE_CRASH_SEED`` replays the same random choices
(the moment the kill lands still depends on timing).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from steerserve.model import prepare_default_model
from tests.conftest import wait_healthy
from tests.paths import models_dir

pytestmark = pytest.mark.slow

ADMIN_KEY = "k"
HIDDEN, LAYERS = 576, 30  # the default model (SmolLM2-135M-Instruct)
ROUNDS = 3
UPLOADS_PER_ROUND = 50
CALIBRATION_UPLOADS = 5  # the first uploads of a round time the server; the kill lands among the rest
NAMES = tuple(f"crash-{i}" for i in range(5))  # few names, so versions pile up across crashes
NORM = 2.0  # per layer: far below the server's norm limit (10x the model's typical activation norm)
START_TIMEOUT_S = 120.0
VERIFY_WORKERS = 16  # the hf engine batches up to 16 sequences: concurrent checks share forward passes
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """One ``steerserve serve`` subprocess; its output goes to a log file (a pipe nobody reads could fill)."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        wait_healthy(self.proc, self.base_url, self.log_tail, timeout, poll_s=0.1)

    def kill(self) -> None:
        """SIGKILL and reap; harmless if it is already dead."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


class Launcher:
    """Starts servers on one home; teardown kills every one it started, whatever the test did."""

    def __init__(self, home: Path, model: Path, logs: Path) -> None:
        self.home, self.model, self.logs = home, model, logs
        self.started: list[ServerProcess] = []

    def start(self) -> ServerProcess:
        port = _free_port()  # a fresh port per start: the killed server's socket may linger
        log_path = self.logs / f"server-{len(self.started)}.log"
        cmd = [sys.executable, "-m", "steerserve", "serve", "--engine", "hf", "--port", str(port),
               "--home", str(self.home), "--admin-key", ADMIN_KEY, "--no-vectors", "--model", str(self.model),
               "--log-level", "warning"]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
        self.started.append(server)
        server.wait_healthy()
        return server

    def kill_all(self) -> None:
        for server in self.started:
            server.kill()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    model = prepare_default_model(models_dir())
    (tmp_path / "logs").mkdir()
    launch = Launcher(tmp_path / "home", model, tmp_path / "logs")
    try:
        yield launch
    finally:
        launch.kill_all()


@dataclass
class RoundResult:
    """What one round's upload loop saw before the server died."""

    acked: dict[str, str] = field(default_factory=dict)  # ref -> sha256 from the 201 response
    attempts: int = 0  # uploads sent, including the one the kill interrupted
    in_flight_at_kill: bool = False  # the last upload got no response: it may or may not have committed
    kill_delay_s: float = 0.0
    overran: bool = False  # the kill had not landed after UPLOADS_PER_ROUND uploads


def _random_upload(rng: random.Random) -> dict[str, Any]:
    """A few layers, each a random direction scaled to ``NORM`` (never all-zero, never too large)."""
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    layers = rng.sample(range(LAYERS), k=rng.randint(1, 4))
    vectors = {}
    for layer in layers:
        v = torch.randn(HIDDEN, generator=gen, dtype=torch.float64)
        vectors[str(layer)] = (v / v.norm() * NORM).tolist()
    return {"name": rng.choice(NAMES), "vectors": vectors, "description": "crash test"}


def _killer_done(killer: threading.Thread | None) -> bool:
    """Whether the kill has been sent."""
    return killer is not None and not killer.is_alive()


def _killer(server: ServerProcess, delay: float) -> None:
    time.sleep(delay)
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGKILL)


def _upload_until_killed(server: ServerProcess, rng: random.Random) -> RoundResult:
    """``UPLOADS_PER_ROUND`` uploads with a SIGKILL scheduled at a random moment among them.

    Should the kill be late (the machine sped up), uploading goes on until it lands, up to twice as many:
    the point of the round is a kill during an upload.
    """
    result = RoundResult()
    killer: threading.Thread | None = None
    with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=30) as client:
        t0 = 0.0
        for i in range(2 * UPLOADS_PER_ROUND):
            if i == UPLOADS_PER_ROUND and not _killer_done(killer):
                result.overran = True
            if i == 1:
                t0 = time.monotonic()  # the first upload of a fresh server is slower: leave it out of the rate
            elif i == CALIBRATION_UPLOADS:
                # Spread the kill over the time the remaining uploads should take at the rate just measured,
                # so it lands inside the loop whatever the machine's load.
                per_upload = (time.monotonic() - t0) / (CALIBRATION_UPLOADS - 1)
                result.kill_delay_s = rng.uniform(0.0, 0.9 * per_upload * (UPLOADS_PER_ROUND - i))
                killer = threading.Thread(target=_killer, args=(server, result.kill_delay_s), daemon=True)
                killer.start()
            body = _random_upload(rng)
            result.attempts += 1
            try:
                r = client.post("/admin/vectors", json=body)
            except httpx.ConnectError:  # refused: the kill landed between requests, this one never arrived
                break
            except httpx.TransportError:  # the connection died under the request: it may have committed
                result.in_flight_at_kill = True
                break
            assert r.status_code == 201, f"upload {i} refused while the server was up: {r.status_code} {r.text}"
            meta = r.json()
            assert meta["ref"] not in result.acked, f"version {meta['ref']} handed out twice"
            result.acked[meta["ref"]] = meta["sha256"]
    assert killer is not None, f"the server went away before the kill was scheduled:\n{server.log_tail()}"
    killer.join()
    server.proc.wait(timeout=30)
    assert server.proc.returncode == -signal.SIGKILL, (
        f"the server died on its own (exit {server.proc.returncode}), not by our kill:\n{server.log_tail()}")
    return result


def _store_artifacts(home: Path) -> Path:
    stores = sorted((home / "store").glob("*/artifacts"))
    assert len(stores) == 1, f"expected one store (one model fingerprint), found {stores}"
    return stores[0]


def _files_on_disk(artifacts: Path) -> tuple[set[str], list[Path]]:
    """(refs of ``<name>/<v>.safetensors`` files, every other file: temp files and anything unexpected)."""
    refs, other = set(), []
    for path in artifacts.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(artifacts).parts
        if len(rel) == 2 and path.suffix == ".safetensors" and path.stem.isdigit():
            refs.add(f"{rel[0]}@{int(path.stem)}")
        else:
            other.append(path)
    return refs, other


def _crash_leftovers(artifacts: Path) -> str:
    """What the kill left on disk before the restart cleans it: temp files and files without a manifest row.

    Only reported (the assertions are on the state after the restart); read-only, so that looking does not
    change what the restarted server finds.
    """
    files, other = _files_on_disk(artifacts)
    try:
        with contextlib.closing(sqlite3.connect(f"file:{artifacts.parent / 'manifest.sqlite'}?mode=ro",
                                                uri=True)) as db:
            rows = {f"{n}@{v}" for n, v in db.execute("SELECT name, version FROM artifacts")}
    except sqlite3.Error as exc:
        return f"{len(other)} temp/other file(s), rows unreadable ({exc})"
    return f"{len(other)} temp/other file(s), {len(files - rows)} file(s) without a row"


def _listed(client: httpx.Client) -> dict[str, str]:
    r = client.get("/admin/vectors", params={"all": "true"})
    assert r.status_code == 200, r.text
    return {d["ref"]: d["sha256"] for d in r.json()["data"]}


def _steer_failures(client: httpx.Client, refs: list[str]) -> list[str]:
    """Refs whose steered generation did not return 200 naming exactly that ref as applied."""

    def check(ref: str) -> str | None:
        body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0,
                "steering": {"interventions": [{"method": "add", "vector": ref, "coeff": 4}]}}
        r = client.post("/generate", json=body)
        if r.status_code != 200:
            return f"{ref}: {r.status_code} {r.text[:200]}"
        applied = [a for entry in r.json()["steering"]["applied"] for a in entry["artifacts"]]
        return None if applied == [ref] else f"{ref}: applied {applied}"

    with ThreadPoolExecutor(VERIFY_WORKERS) as pool:
        return [f for f in pool.map(check, refs) if f is not None]


def test_uploads_survive_sigkill(launcher: Launcher) -> None:
    seed = int(os.environ.get("STEERSERVE_CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    print(f"\ncrash test: seed {seed} (STEERSERVE_CRASH_SEED), home {launcher.home}")
    acked_all: dict[str, str] = {}
    listed_before: set[str] = set()
    server = launcher.start()
    for round_no in range(1, ROUNDS + 1):
        result = _upload_until_killed(server, rng)
        leftovers = _crash_leftovers(_store_artifacts(launcher.home))
        assert not set(result.acked) & set(acked_all), "a version number was handed out again after a crash"
        acked_all.update(result.acked)

        server = launcher.start()  # same home: the store opens, cleans up, and must hold every acknowledged row
        limits = httpx.Limits(max_connections=VERIFY_WORKERS)
        with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=60, limits=limits) as client:
            listed = _listed(client)
            lost = sorted(ref for ref in acked_all if ref not in listed)
            changed = sorted(ref for ref, sha in acked_all.items() if ref in listed and listed[ref] != sha)
            unacked = sorted(set(listed) - set(acked_all) - listed_before)  # committed, response never sent
            failures = _steer_failures(client, sorted(listed))
        files, other = _files_on_disk(_store_artifacts(launcher.home))
        orphan_files, missing_files = sorted(files - set(listed)), sorted(set(listed) - files)

        print(f"round {round_no}: kill after {result.kill_delay_s * 1000:.0f} ms, at upload {result.attempts} of "
              f"{UPLOADS_PER_ROUND}{' (overran)' if result.overran else ''} "
              f"({'mid-request' if result.in_flight_at_kill else 'between requests'}); "
              f"acknowledged {len(result.acked)} (total {len(acked_all)}); listed after restart {len(listed)} "
              f"(committed but unacknowledged: {len(unacked)}); lost {len(lost)}; left by the crash: "
              f"{leftovers}; after restart: orphan files {len(orphan_files)}, rows without file "
              f"{len(missing_files)}, temp/other files {len(other)}; steer check failures {len(failures)}")

        assert not lost, f"acknowledged uploads missing after restart: {lost}"
        assert not changed, f"acknowledged uploads whose bytes changed: {changed}"
        assert len(unacked) <= int(result.in_flight_at_kill), f"versions nobody uploaded: {unacked}"
        assert not failures, f"listed vectors that do not load or steer: {failures[:5]}"
        assert not orphan_files, f"files without a manifest row: {orphan_files}"
        assert not missing_files, f"manifest rows without a file: {missing_files}"
        assert not other, f"temp or unexpected files in the store: {other}"
        listed_before = set(listed)
