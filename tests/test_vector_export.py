"""Artifacts out over HTTP (``GET /admin/vectors/{name}/export``, ``store.formats.export_artifact``, shared
with ``steerserve vectors export``) and GGUF control vectors in ``--vectors-dir`` at start-up
(``bootstrap.import_vectors``). On the session's live server: no engine of its own."""

from __future__ import annotations

from pathlib import Path

import httpx
import safetensors.torch
import torch

from steerserve.bootstrap import import_vectors
from steerserve.model import model_info, prepare_default_model
from steerserve.service import Service
from steerserve.store.artifacts import ArtifactStore
from steerserve.store.db import header_metadata
from steerserve.store.formats import HOOK_SITE
from steerserve.store.gguf_io import is_gguf
from tests.paths import models_dir
from tests.test_vector_formats import STORY, random_vectors, repeng_gguf


def _greedy(client: httpx.Client, vector: str | None) -> str:
    steering = {"interventions": [{"method": "add", "vector": vector, "coeff": 4.0}]} if vector else None
    r = client.post("/generate", json={"messages": STORY, "temperature": 0, "max_tokens": 12, "steering": steering})
    assert r.status_code == 200, r.text
    text: str = r.json()["text"]
    return text


def _upload(client: httpx.Client, headers: dict[str, str], name: str, data: bytes) -> dict[str, object]:
    r = client.post("/admin/vectors", headers=headers, data={"name": name},
                    files={"file": (f"{name}.bin", data, "application/octet-stream")})
    assert r.status_code == 201, r.text
    meta: dict[str, object] = r.json()
    return meta


def test_export_round_trips_over_http(client: httpx.Client, admin_headers: dict[str, str],
                                      service: Service) -> None:
    norms = service.store.policy.typical_norms
    assert norms is not None
    vecs = {k: v * norms[k] for k, v in random_vectors([8, 9, 10], seed=21, norm=0.1).items()}
    _upload(client, admin_headers, "exp-src", safetensors.torch.save({f"layer.{k}": v for k, v in vecs.items()}))
    url = "/admin/vectors/exp-src/export"
    g = client.get(url, params={"format": "gguf"}, headers=admin_headers)
    assert g.status_code == 200, g.text
    assert is_gguf(g.content) and g.headers["content-type"] == "application/octet-stream"
    assert g.headers["x-steerserve-artifact"] == "exp-src@1" and "exp-src-v1.gguf" in g.headers["content-disposition"]
    st = client.get(url, params={"format": "safetensors"}, headers=admin_headers)
    assert st.status_code == 200, st.text
    loaded = safetensors.torch.load(st.content)
    assert sorted(loaded) == ["layer.10", "layer.8", "layer.9"]
    assert all(torch.equal(loaded[f"layer.{k}"], v) for k, v in vecs.items())
    default = client.get("/admin/vectors/exp-src@1/export", headers=admin_headers).content  # safetensors
    assert header_metadata(default) == header_metadata(st.content)  # (safetensors orders metadata at random)
    assert header_metadata(st.content)["hook_site"] == HOOK_SITE  # completed: self-describing
    back = _upload(client, admin_headers, "exp-back", g.content)
    assert back["layers"] == [8, 9, 10]
    assert back["provenance"]["imported_from"]["format"] == "gguf control vector"  # type: ignore[index]
    _upload(client, admin_headers, "exp-back-st", st.content)
    steered = _greedy(client, "exp-src")
    assert steered != _greedy(client, None)
    assert _greedy(client, "exp-back") == steered == _greedy(client, "exp-back-st")


def test_export_refusals(client: httpx.Client, admin_headers: dict[str, str]) -> None:
    r = client.post("/admin/pairs", headers=admin_headers,
                    json={"name": "exp-pair", "positive": "Love", "negative": "Hate"})
    assert r.status_code == 201, r.text
    for fmt in ("gguf", "safetensors"):
        r = client.get("/admin/vectors/exp-pair/export", params={"format": fmt}, headers=admin_headers)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "name" and "pair" in err["message"]
    r = client.get("/admin/vectors/exp-nothing/export", params={"format": "gguf"}, headers=admin_headers)
    assert r.status_code == 404 and r.json()["error"]["param"] == "name", r.text
    r = client.get("/admin/vectors/exp-nothing/export", params={"format": "onnx"}, headers=admin_headers)
    assert r.status_code in (400, 422) and "format" in r.text, r.text
    assert client.get("/admin/vectors/exp-nothing/export").status_code == 401


def test_vectors_dir_imports_gguf_control_vectors(tmp_path: Path) -> None:
    info = model_info(prepare_default_model(models_dir()))
    store = ArtifactStore(tmp_path / "store", info)
    folder = tmp_path / "vectors"
    folder.mkdir()
    dirs = random_vectors([4, 7], seed=22)
    repeng_gguf(folder / "calm.gguf", dirs)
    (folder / "plain.safetensors").write_bytes(safetensors.torch.save({"layer.3": random_vectors([3], 23)[3]}))
    (folder / "notes.txt").write_text("not a vector")
    logs: list[str] = []
    import_vectors(store, folder, logs.append)
    assert sorted(m.ref() for m in store.list()) == ["calm@1", "plain@1"], logs
    calm = store.load_vector("calm")
    assert all(torch.equal(calm.tensors[k], v) for k, v in dirs.items())
    assert store.get("calm").provenance["source"] == "vectors/calm.gguf"
    logs.clear()
    import_vectors(store, folder, logs.append)  # once per content: a restart imports nothing again
    assert logs == [] and len(store.list()) == 2
    store.close()
