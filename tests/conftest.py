"""One live server for the whole session: the real default model, the real engine, uvicorn on a free port.

The server's engine is what ``serve`` picks by default (``auto``: vllm where vLLM is installed, else hf);
``STEERSERVE_TEST_ENGINE=hf|vllm`` forces one. Engine-level tests build their own engines.

The default model is prepared once into a shared cache (``$STEERSERVE_TEST_MODELS`` or
``~/.cache/steerserve/models``) so that re-runs start in seconds; the artifact store is a fresh temp dir.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from openai import OpenAI

from steerserve.api import create_app
from steerserve.config import Settings
from steerserve.engines.hf import HFEngine
from steerserve.model import load_hf, prepare_default_model
from steerserve.service import Service, build_service
from tests.paths import models_dir

ADMIN_KEY = "test-key"


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    model = prepare_default_model(models_dir())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default of 4 is more than tests need
    return Settings(engine=os.environ.get("STEERSERVE_TEST_ENGINE", "auto"),
                    home=tmp_path_factory.mktemp("steerserve-home"), model=model, admin_key=ADMIN_KEY,
                    max_batch=8, max_tokens_cap=256, vectors_dir=None)


@pytest.fixture(scope="session")
def service(settings: Settings) -> Service:
    return build_service(settings, log=lambda _msg: None)


@pytest.fixture(scope="session")
def base_url(service: Service, settings: Settings) -> Iterator[str]:
    with serving(create_app(service, settings)) as url:
        yield url


@contextlib.contextmanager
def serving(app: Any, port: int = 0, start_s: float = 900) -> Iterator[str]:
    """``app`` under uvicorn in a thread on 127.0.0.1 (``port`` 0: a free one), until the block ends; ``start_s``
    bounds the start-up (the vllm engine compiles the model then: minutes on CPU)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, host="127.0.0.1", port=sock.getsockname()[1], log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_healthy(proc: Any, url: str, log_tail: Callable[[], str], timeout: float, poll_s: float = 0.2) -> None:
    """Wait until the server process ``proc`` answers ``/health`` at ``url``; fail the test (with its log's tail)
    if it exits first or is not healthy within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{url} exited with {proc.returncode} during start-up:\n{log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if client.get("/health").status_code == 200:
                    return
            time.sleep(poll_s)
    pytest.fail(f"{url} not healthy after {timeout:.0f} s:\n{log_tail()}")


@pytest.fixture(scope="session")
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="session")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def make_key(client: httpx.Client, admin_headers: dict[str, str]) -> Callable[..., str]:
    """``make_key(name, **policy)``: PUT the policy ``name`` and return a new key bound to it."""

    def make(name: str, **policy: Any) -> str:
        r = client.put(f"/admin/policies/{name}", headers=admin_headers, json=policy)
        assert r.status_code in (200, 201), r.text
        r = client.post("/admin/keys", headers=admin_headers, json={"policy": name, "label": "test"})
        assert r.status_code == 201, r.text
        key: str = r.json()["key"]
        return key

    return make


@pytest.fixture(scope="session")
def oai(base_url: str, client: httpx.Client, admin_headers: dict[str, str]) -> Iterator[OpenAI]:
    """The official ``openai`` client on the live server. It always sends a key, and once any key is bound a
    key no policy binds is a 401: one bound to the default policy."""
    r = client.post("/admin/keys", headers=admin_headers, json={"policy": "default", "label": "openai client tests"})
    assert r.status_code == 201, r.text
    with OpenAI(base_url=f"{base_url}/v1", api_key=r.json()["key"], max_retries=0, timeout=120) as c:
        yield c


def random_unit_vectors(name: str, num_layers: int, hidden: int) -> dict[str, list[float]]:
    """Seeded by ``name``: the same name always gives the same unit-norm vector per layer."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    out = {}
    for layer in range(num_layers):
        v = torch.randn(hidden, generator=gen, dtype=torch.float64)
        out[str(layer)] = (v / v.norm()).tolist()
    return out


@pytest.fixture(scope="session")
def unit_vectors() -> Callable[[str, int, int], dict[str, list[float]]]:
    """``random_unit_vectors`` as a fixture, for tests that build their own uploads."""
    return random_unit_vectors


@pytest.fixture(scope="session")
def fresh_vector(client: httpx.Client, service: Service,
                 admin_headers: dict[str, str]) -> Callable[[str], dict[str, Any]]:
    """``fresh_vector(name)`` uploads a random unit-norm vector for every layer once; returns its metadata."""
    made: dict[str, dict[str, Any]] = {}

    def make(name: str) -> dict[str, Any]:
        if name not in made:
            vectors = random_unit_vectors(name, service.info.num_layers, service.info.hidden_size)
            r = client.post("/admin/vectors", headers=admin_headers,
                            json={"name": name, "vectors": vectors, "description": "test vector"})
            assert r.status_code == 201, r.text
            made[name] = r.json()
        return made[name]

    return make


@pytest.fixture(scope="module")
async def hf_engine() -> AsyncIterator[HFEngine]:
    """A started hf engine on the default model, of its own (not the live server's), per test module."""
    model, tokenizer, info = load_hf(prepare_default_model(models_dir()))
    eng = HFEngine(model, tokenizer, info, Settings(max_batch=8, bank_slots=128))
    await eng.start()
    yield eng
    await eng.stop()


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny random MoE checkpoints (``tests.moe_models``), built once per session: arch -> folder."""
    from tests import moe_models

    root = tmp_path_factory.mktemp("moe-models")
    tokenizer = prepare_default_model(models_dir())
    return {arch: moe_models.build(arch, root / arch, tokenizer) for arch in moe_models.ARCHS}
