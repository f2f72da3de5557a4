"""End to end over HTTP on the hf engine: fTRI finds the planted expert (``test_ftri``'s tiny Qwen2-MoE), the
``expert_set`` is uploaded (vetted in mask mode: ordinary prompts never route to it, so its KL is ~0), and a
request masking it by name changes trigger prompts' replies and leaves the others' replies unchanged; bad
masks are 400s naming the field and the server keeps serving.

Needs the engines' router point (``runtime.route_point``); skipped where it is not built in.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

pytest.importorskip("steerserve.runtime.route_point")

from steerserve.api import create_app  # noqa: E402
from steerserve.config import Settings  # noqa: E402
from steerserve.service import build_service  # noqa: E402
from tests import moe_models  # noqa: E402
from tests.paths import models_dir  # noqa: E402
from tests.test_ftri import FILLER, SENTENCES, STAR, TRIGGER_WORDS, _data, _ftri, plant  # noqa: E402

KEY = "moe-admin"
ADMIN = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path, str]]:
    """``(client, expert-set file, trigger word)`` against an hf server of the planted Qwen2-MoE."""
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("moe-http")
    folder = moe_models.build("qwen2_moe", root / "model", models_dir() / "SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(folder)
    word = next(w for w in TRIGGER_WORDS if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    plant(model, STAR, tok(word, add_special_tokens=False)["input_ids"][0])
    model.save_pretrained(folder)
    out = root / "set.safetensors"
    _ftri(folder, _data(root, word), out, "--top-k", "2")
    settings = Settings(engine="hf", home=root / "home", model=folder, admin_key=KEY, max_batch=4,
                        max_tokens_cap=64, vectors_dir=None)
    service = build_service(settings, log=lambda _msg: None)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service, settings), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=120) as client:
            yield client, out, word
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _reply(client: httpx.Client, prompt: str, steering: dict[str, Any] | None = None) -> str:
    r = client.post("/generate", json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "steering": steering})
    assert r.status_code == 200, r.text
    return str(r.json()["text"])


def test_upload_and_mask_by_name(served: tuple[httpx.Client, Path, str]) -> None:
    client, path, word = served
    r = client.post("/admin/vectors", params={"name": "trigger-experts"}, content=path.read_bytes(),
                    headers={**ADMIN, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["kind"] == "expert_set" and meta["layers"] == [1, 2]
    vetting = meta["provenance"]["vetting"]
    assert set(vetting["per_setting"]) == {"mask"} and vetting["kl"] < 1e-6, vetting
    mask = {"interventions": [{"method": "expert_mask", "experts": "trigger-experts"}]}
    changed = 0
    for s in SENTENCES[:6]:
        changed += _reply(client, s + word, mask) != _reply(client, s + word)
        assert _reply(client, s + FILLER, mask) == _reply(client, s + FILLER)
    assert changed >= 3, changed
    both = {"interventions": [{"method": "expert_mask", "experts": "trigger-experts", "mode": "zero"},
                              {"method": "expert_mask", "force": {"1": [0]}}]}
    assert _reply(client, SENTENCES[0] + word, both)  # merged masks serve


@pytest.mark.parametrize(("iv", "field"), [
    ({"experts": {"0": [1]}}, "experts.0"),  # Qwen2-MoE's dense layer 0
    ({"experts": {"1": [16]}}, "experts.1[0]"),
    ({"experts": {"1": list(range(16))}, "mode": "zero"}, "experts.1"),
    ({"experts": {"1": [3]}, "force": {"1": [3]}}, "force.1"),
])
def test_bad_masks_are_400s(served: tuple[httpx.Client, Path, str], iv: dict[str, Any], field: str) -> None:
    client, _, word = served
    r = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2,
                                       "steering": {"interventions": [{"method": "expert_mask", **iv}]}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == f"steering.interventions.0.{field}"
    assert _reply(client, SENTENCES[0] + word)  # still serving
