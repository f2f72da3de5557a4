"""Two server replicas on one shared artifact store: a real PostgreSQL manifest (``tests.postgres``) and one
folder of artifact files, as behind a load balancer (README, "Replicas").

Two ``python -m steerserve serve --engine hf`` processes start together on the default model, each with
its own ``--home`` and port, the same ``--store-url`` and ``--store-dir``. The test checks that:

- the tables are created and the shipped vectors imported once between them (one version per file);
- a vector uploaded on A steers on B by name (B's greedy output differs from its unsteered one), and B's
  audit log shows A's upload;
- uploads of one name raced across both get distinct versions (1..N, all 201), which both list with the
  sha256 each upload was answered with and both steer with; the folder holds exactly those files.

Both also name one real Redis (``--redis-url``, the machine's at 127.0.0.1:6379), and then:

- a key limited to N requests a minute gets N in all, across both, not N per replica;
- the in-flight bound (``STEERSERVE_MAX_PENDING``) holds for the fleet: with it reached by streams held open
  on A and B, a request to B is refused although B alone holds fewer;
- a key revoked on A is refused on B at its next request, and once every key is revoked, unknown keys stay
  refused on both (the deployment does not fall back open).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from steerserve.model import prepare_default_model
from tests import postgres
from tests.conftest import wait_healthy
from tests.paths import models_dir

pytestmark = pytest.mark.slow

ADMIN_KEY = "replica-key"
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
HIDDEN, LAYERS = 576, 30  # the default model (SmolLM2-135M-Instruct)
RACERS = 6
START_TIMEOUT_S = 240.0  # two models load at once on a small machine
REDIS_URL = os.environ.get("STEERSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MAX_PENDING = RACERS  # the fleet's in-flight bound: the raced steering below fills it exactly
REPO = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Tell me about your day."}]


def _start(name: str, tmp: Path, store_url: str, store_dir: Path, model: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = postgres._free_port()
    cmd = [sys.executable, "-m", "steerserve", "serve", "--engine", "hf", "--port", str(port),
           "--home", str(tmp / f"home-{name}"), "--store-url", store_url, "--store-dir", str(store_dir),
           "--admin-key", ADMIN_KEY, "--model", str(model), "--vectors-dir", str(REPO / "vectors"),
           "--redis-url", REDIS_URL, "--log-level", "warning"]
    env = {**os.environ, "STEERSERVE_MAX_PENDING": str(MAX_PENDING)}
    with open(tmp / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return proc, f"http://127.0.0.1:{port}"


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    wait_healthy(proc, url, lambda: log.read_text(errors="replace")[-4000:], START_TIMEOUT_S)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, httpx.Client, Path]]:
    """Clients of replicas A and B, and the shared store folder."""
    model = prepare_default_model(models_dir())
    tmp = tmp_path_factory.mktemp("replicas")
    store_dir = tmp / "shared-store"
    with postgres.postgres_server() as server, postgres.fresh_database(server) as url:
        procs = [_start(name, tmp, url, store_dir, model) for name in ("a", "b")]  # together: they race at start
        try:
            for (proc, base), name in zip(procs, ("a", "b"), strict=True):
                _wait_healthy(proc, base, tmp / f"{name}.log")
            limits = httpx.Limits(max_connections=RACERS)
            with httpx.Client(base_url=procs[0][1], headers=HEADERS, timeout=120, limits=limits) as a, \
                    httpx.Client(base_url=procs[1][1], headers=HEADERS, timeout=120, limits=limits) as b:
                yield a, b, store_dir
        finally:
            for proc, _ in procs:
                proc.terminate()
            for proc, _ in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _listed(client: httpx.Client) -> dict[str, str]:
    r = client.get("/admin/vectors", params={"all": "true"})
    assert r.status_code == 200, r.text
    return {d["ref"]: d["sha256"] for d in r.json()["data"]}


def _generate(client: httpx.Client, steering: dict[str, Any] | None, max_tokens: int = 16) -> dict[str, Any]:
    r = client.post("/generate", json={"messages": PROMPT, "temperature": 0, "max_tokens": max_tokens,
                                       "steering": steering})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_shipped_vectors_imported_once(replicas: tuple[httpx.Client, httpx.Client, Path]) -> None:
    a, b, _ = replicas
    listed = _listed(a)
    shipped = sorted(p.stem for p in (REPO / "vectors").glob("*.safetensors"))
    assert sorted(ref.split("@")[0] for ref in listed if ref.split("@")[0] in shipped) == shipped
    assert all(f"{name}@1" in listed for name in shipped)
    assert _listed(b) == listed


def test_upload_on_one_replica_steers_on_the_other(replicas: tuple[httpx.Client, httpx.Client, Path]) -> None:
    a, b, _ = replicas
    data = (REPO / "vectors" / "joy.safetensors").read_bytes()
    r = a.post("/admin/vectors", files=[("name", (None, "joy-replica")), ("file", ("joy.safetensors", data))])
    assert r.status_code == 201, r.text
    assert (r.json()["ref"], r.json()["sha256"]) == ("joy-replica@1", hashlib.sha256(data).hexdigest())
    steering = {"interventions": [{"method": "add", "vector": "joy-replica", "layers": [4, 5, 6, 7, 8],
                                   "coeff": 1.5}]}
    steered, plain = _generate(b, steering), _generate(b, None)
    assert [x for e in steered["steering"]["applied"] for x in e["artifacts"]] == ["joy-replica@1"]
    assert steered["text"] != plain["text"]
    r = b.get("/admin/audit", params={"name": "joy-replica", "action": "upload"})
    assert r.status_code == 200, r.text
    assert [(e["outcome"], e["version"]) for e in r.json()["data"]] == [("ok", 1)]


def _random_upload(seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    vectors = {}
    for layer in (3, 10, 20):
        v = torch.randn(HIDDEN, generator=gen, dtype=torch.float64)
        vectors[str(layer)] = (v / v.norm() * 2.0).tolist()
    return {"name": "raced", "vectors": vectors, "description": f"racer {seed}"}


def test_raced_uploads_of_one_name(replicas: tuple[httpx.Client, httpx.Client, Path]) -> None:
    a, b, store_dir = replicas

    def upload(seed: int) -> tuple[int, dict[str, Any]]:
        r = (a, b)[seed % 2].post("/admin/vectors", json=_random_upload(seed))
        return r.status_code, r.json()

    start = time.monotonic()
    with ThreadPoolExecutor(RACERS) as pool:
        results = list(pool.map(upload, range(RACERS)))
    print(f"\n{RACERS} raced uploads: {time.monotonic() - start:.1f} s")
    assert [status for status, _ in results] == [201] * RACERS, results
    answered = {body["ref"]: body["sha256"] for _, body in results}
    assert sorted(answered, key=lambda ref: int(ref.split("@")[1])) == [f"raced@{v}" for v in range(1, RACERS + 1)]
    for client in (a, b):
        assert {ref: sha for ref, sha in _listed(client).items() if ref.startswith("raced@")} == answered

    def steer(job: tuple[httpx.Client, str]) -> list[str]:
        client, ref = job
        body = _generate(client, {"interventions": [{"method": "add", "vector": ref, "coeff": 4}]}, max_tokens=1)
        return [x for e in body["steering"]["applied"] for x in e["artifacts"]]

    jobs = [(client, ref) for ref in sorted(answered) for client in (a, b)]
    start = time.monotonic()
    with ThreadPoolExecutor(RACERS) as pool:
        assert list(pool.map(steer, jobs)) == [[ref] for _, ref in jobs]
    print(f"{len(jobs)} steered requests: {time.monotonic() - start:.1f} s")
    folders = list(store_dir.glob("*/artifacts/raced"))
    assert len(folders) == 1
    assert sorted(p.name for p in folders[0].iterdir()) == sorted(f"{v}.safetensors" for v in range(1, RACERS + 1))


def _key(client: httpx.Client, policy: str) -> tuple[str, dict[str, str]]:
    r = client.post("/admin/keys", json={"policy": policy, "label": "fleet"})
    assert r.status_code == 201, r.text
    return r.json()["id"], {"Authorization": f"Bearer {r.json()['key']}"}


def _status(client: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    return client.post("/generate", headers=headers, json={"messages": PROMPT, "temperature": 0, "max_tokens": 1})


def test_a_keys_rate_is_counted_once_for_the_fleet(replicas: tuple[httpx.Client, httpx.Client, Path]) -> None:
    """4 a minute, 10 requests alternating between A and B within seconds: 4 pass in all (without Redis,
    each replica would pass 4). The refusals say when the shared bucket has a token again (15 s at 4/min)."""
    a, b, _ = replicas
    r = a.post("/admin/policies", json={"name": "fleet-rate", "requests_per_minute": 4})
    assert r.status_code == 201, r.text
    _, key = _key(a, "fleet-rate")
    answers = [_status((a, b)[i % 2], key) for i in range(10)]
    assert sum(r.status_code == 200 for r in answers) == 4, [r.status_code for r in answers]
    refused = [r for r in answers if r.status_code != 200]
    assert all(r.status_code == 429 and r.json()["error"]["code"] == "rate_limited" for r in refused)
    assert all(1 <= int(r.headers["retry-after"]) <= 15 for r in refused)
    assert {i % 2 for i, r in enumerate(answers) if r.status_code == 429} == {0, 1}  # refused on both


def test_the_in_flight_bound_is_the_fleets(replicas: tuple[httpx.Client, httpx.Client, Path]) -> None:
    a, b, _ = replicas
    body = {"messages": PROMPT, "max_tokens": 512, "ignore_eos": True, "stream": True}
    with contextlib.ExitStack() as streams:
        for i in range(MAX_PENDING):  # admitted once its response has started: A holds 4, B holds 2
            r = streams.enter_context((a if i < MAX_PENDING - 2 else b).stream("POST", "/v1/chat/completions",
                                                                            json=body))
            assert r.status_code == 200
        full = _status(b, HEADERS)
        assert full.status_code == 429, full.text
        assert full.json()["error"]["code"] == "server_overloaded" and int(full.headers["retry-after"]) >= 1
    for _ in range(50):  # the streams' releases reach Redis in the background
        if (r := _status(b, HEADERS)).status_code == 200:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_a_revocation_on_one_replica_holds_on_the_other(replicas: tuple[httpx.Client, httpx.Client, Path]) -> None:
    a, b, _ = replicas
    key_id, key = _key(a, "default")
    assert _status(b, key).status_code == 200
    stranger = {"Authorization": "Bearer a-key-nobody-ever-bound-0123"}
    assert _status(b, stranger).status_code == 401  # a key is bound: unknown keys are refused
    for k in a.get("/admin/keys").json()["data"]:  # revoke every key there is
        assert a.delete(f"/admin/keys/{k['id']}").status_code == 200
    for client in (b, a):
        assert _status(client, key).status_code == 401  # at once, on the replica that did not revoke it too
        assert _status(client, stranger).status_code == 401  # and no key bound does not reopen the deployment
    assert _status(b, {}).status_code == 200  # no key at all: the default policy, as before
