"""The admin API: auth, vector upload (JSON and safetensors), listing, enable/disable, delete, compute, pairs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from steerserve.api import create_app
from steerserve.config import Settings
from steerserve.service import Service

STORY = [{"role": "user", "content": "Tell me a short story about a dog."}]


def steer(vector: str, coeff: float = 4.0) -> dict[str, Any]:
    return {"interventions": [{"method": "add", "vector": vector, "coeff": coeff}]}


def generate(client: httpx.Client, steering: dict[str, Any] | None = None, max_tokens: int = 4) -> httpx.Response:
    return client.post("/generate", json={"messages": STORY, "temperature": 0, "max_tokens": max_tokens,
                                          "steering": steering})


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    data: bytes = safetensors.torch.save(tensors, metadata=metadata)
    return data


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"},
                                     {"Authorization": "Basic dGVzdC1rZXk="}])
def test_missing_or_wrong_key_is_401(client: httpx.Client, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/admin/vectors"), ("POST", "/admin/pairs"), ("DELETE", "/admin/vectors/x")):
        err = error(client.request(method, path, headers=headers, json={}), 401)
        assert err["type"] == "authentication_error"


def test_vector_lifecycle(client: httpx.Client, admin_headers: dict[str, str], service: Service,
                          unit_vectors: Callable[[str, int, int], dict[str, list[float]]]) -> None:
    info = service.info
    vectors = unit_vectors("life", info.num_layers, info.hidden_size)
    r = client.post("/admin/vectors", headers=admin_headers,
                    json={"name": "life", "description": "lifecycle", "vectors": vectors})
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["ref"] == "life@1" and meta["kind"] == "vector" and meta["enabled"] is True
    assert meta["layers"] == list(range(30))
    assert meta["norms"]["0"] == pytest.approx(1.0, abs=1e-5)
    assert meta["description"] == "lifecycle"

    # A second version from safetensors bytes, sent raw.
    data = safetensors_bytes({"layer.3": torch.randn(info.hidden_size), "layer.7": torch.randn(info.hidden_size)})
    r = client.post("/admin/vectors", params={"name": "life", "description": "from a file"}, content=data,
                    headers={**admin_headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert r.json()["ref"] == "life@2" and r.json()["layers"] == [3, 7]

    listed = client.get("/admin/vectors", headers=admin_headers).json()["data"]
    (entry,) = [d for d in listed if d["name"] == "life"]
    assert entry["version"] == 2 and entry["versions"] == 2
    every = client.get("/admin/vectors", params={"all": "true"}, headers=admin_headers).json()["data"]
    assert [d["version"] for d in every if d["name"] == "life"] == [1, 2]

    shown = client.get("/admin/vectors/life", headers=admin_headers).json()["data"]
    assert [d["ref"] for d in shown] == ["life@1", "life@2"]
    one = client.get("/admin/vectors/life@1", headers=admin_headers).json()["data"]
    assert [d["ref"] for d in one] == ["life@1"]
    error(client.get("/admin/vectors/life@9", headers=admin_headers), 404)
    error(client.get("/admin/vectors/nothing-here", headers=admin_headers), 404)

    r = generate(client, steer("life@1"))
    assert r.status_code == 200, r.text
    assert r.json()["steering"]["applied"][0]["artifacts"] == ["life@1"]
    assert generate(client, steer("life")).json()["steering"]["applied"][0]["artifacts"] == ["life@2"]

    r = client.patch("/admin/vectors/life", headers=admin_headers, json={"enabled": False})
    assert r.status_code == 200, r.text
    assert [d["enabled"] for d in r.json()["data"]] == [False, False]
    err = error(generate(client, steer("life")), 400)
    assert err["param"] == "steering.interventions.0.vector"
    assert "disabled" in err["message"]

    r = client.patch("/admin/vectors/life", headers=admin_headers, json={"enabled": True, "version": 1})
    assert [d["ref"] for d in r.json()["data"]] == ["life@1"]
    assert generate(client, steer("life@1")).status_code == 200
    error(generate(client, steer("life@2")), 400)
    client.patch("/admin/vectors/life@2", headers=admin_headers, json={"enabled": True})
    assert generate(client, steer("life@2")).status_code == 200

    r = client.delete("/admin/vectors/life", params={"version": 2}, headers=admin_headers)
    assert r.status_code == 200 and [d["ref"] for d in r.json()["data"]] == ["life@2"]
    r = client.delete("/admin/vectors/life", headers=admin_headers)
    assert r.status_code == 200 and [d["ref"] for d in r.json()["data"]] == ["life@1"]
    err = error(generate(client, steer("life")), 400)
    assert err["param"] == "steering.interventions.0.vector"
    error(client.delete("/admin/vectors/life", headers=admin_headers), 404)
    # The server still serves after all of that.
    assert generate(client).status_code == 200


def test_upload_wrong_hidden_size_or_layer_is_400(client: httpx.Client, admin_headers: dict[str, str]) -> None:
    err = error(client.post("/admin/vectors", headers=admin_headers,
                            json={"name": "wide", "vectors": {"0": [0.1] * 768}}), 400)
    assert err["param"] == "vectors.0"
    assert "768" in err["message"] and "576" in err["message"]
    err = error(client.post("/admin/vectors", headers=admin_headers,
                            json={"name": "deep", "vectors": {"30": [0.1] * 576}}), 400)
    assert err["param"] == "vectors.30"
    assert "layer 30" in err["message"]
    err = error(client.post("/admin/vectors", headers=admin_headers,
                            json={"name": "odd", "vectors": {"first": [0.1] * 576}}), 400)
    assert err["param"] == "vectors.first"
    err = error(client.post("/admin/vectors", headers=admin_headers, json={"name": "none"}), 400)
    assert err["param"] == "vectors"

    raw = {**admin_headers, "Content-Type": "application/octet-stream"}
    err = error(client.post("/admin/vectors", params={"name": "wide"}, headers=raw,
                            content=safetensors_bytes({"layer.0": torch.randn(768)})), 400)
    assert "768" in err["message"] and err["param"] == "tensors.layer.0"
    err = error(client.post("/admin/vectors", params={"name": "deep"}, headers=raw,
                            content=safetensors_bytes({"layer.30": torch.randn(576)})), 400)
    assert "layer 30" in err["message"] and err["param"] == "tensors.layer.30"
    err = error(client.post("/admin/vectors", params={"name": "junk"}, headers=raw, content=b"not safetensors"), 400)
    assert err["param"] == "file"
    err = error(client.post("/admin/vectors", headers=raw, content=safetensors_bytes({"layer.0": torch.randn(576)})),
                400)
    assert err["param"] == "name"
    error(client.post("/admin/vectors", headers={**admin_headers, "Content-Type": "text/plain"}, content=b"x"), 415)
    err = error(client.post("/admin/vectors", headers=admin_headers, data={"name": "multi"},
                            files={"file": ("v.safetensors", b"x")}), 400)
    assert err["param"] == "file"
    listed = client.get("/admin/vectors", headers=admin_headers).json()["data"]
    assert not {"wide", "deep", "odd", "none", "junk", "multi"} & {d["name"] for d in listed}


def test_compute_vector_from_prompts(client: httpx.Client, admin_headers: dict[str, str]) -> None:
    r = client.post("/admin/vectors/compute", headers=admin_headers, json={
        "name": "sentiment", "positive": ["I love this", "This is wonderful"],
        "negative": ["I hate this", "This is awful"], "layers": [6], "description": "love - hate"})
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["layers"] == [6] and meta["method"] == "mean_diff"
    assert meta["norms"]["6"] > 0
    assert meta["provenance"]["positive"] == 2
    r = generate(client, {"interventions": [{"method": "add", "vector": "sentiment", "coeff": 4, "layers": [6]}]})
    assert r.status_code == 200, r.text
    err = error(client.post("/admin/vectors/compute", headers=admin_headers, json={
        "name": "sentiment", "positive": ["a"], "negative": ["b"], "layers": [30]}), 400)
    assert err["param"] == "layers.0"
    err = error(client.post("/admin/vectors/compute", headers=admin_headers, json={
        "name": "bad name!", "positive": ["a"], "negative": ["b"]}), 400)
    assert err["param"] == "name"


def test_pairs(client: httpx.Client, admin_headers: dict[str, str]) -> None:
    r = client.post("/admin/pairs", headers=admin_headers, json={
        "name": "love-hate", "positive": "Love", "negative": "Hate", "layer": 6, "coeff": 5.0,
        "description": "ActAdd"})
    assert r.status_code == 201, r.text
    assert r.json()["ref"] == "love-hate@1" and r.json()["kind"] == "pair"
    pairs = client.get("/admin/pairs", headers=admin_headers).json()["data"]
    (listed,) = [d for d in pairs if d["name"] == "love-hate"]
    assert listed["positive"] == "Love" and listed["layer"] == 6 and listed["coeff"] == 5.0
    assert listed["versions"] == 1

    plain = generate(client, max_tokens=12).json()
    r = generate(client, {"interventions": [{"method": "actadd", "pair": "love-hate"}]}, max_tokens=12)
    assert r.status_code == 200, r.text
    (applied,) = r.json()["steering"]["applied"]
    assert applied["method"] == "actadd" and applied["artifacts"] == ["love-hate@1"]
    assert applied["detail"]["layer"] == 6 and applied["detail"]["coeff"] == 5.0
    assert r.json()["text"] != plain["text"]

    # A pair is not a vector, and vice versa.
    error(client.get("/admin/vectors/love-hate", headers=admin_headers), 404)
    err = error(generate(client, steer("love-hate")), 400)
    assert err["param"] == "steering.interventions.0.vector"

    r = client.delete("/admin/pairs/love-hate", headers=admin_headers)
    assert r.status_code == 200 and [d["ref"] for d in r.json()["data"]] == ["love-hate@1"]
    err = error(generate(client, {"interventions": [{"method": "actadd", "pair": "love-hate"}]}), 400)
    assert err["param"] == "steering.interventions.0.pair"
    err = error(client.post("/admin/pairs", headers=admin_headers, json={
        "name": "p", "positive": "a", "negative": "b", "layer": 30}), 400)
    assert err["param"] == "layer"


async def test_admin_disabled_without_key(service: Service, settings: Settings) -> None:
    app = create_app(service, replace(settings, admin_key=None))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
        for headers in ({}, {"Authorization": "Bearer test-key"}):
            r = await ac.get("/admin/vectors", headers=headers)
            err = error(r, 403)
            assert "set STEERSERVE_ADMIN_KEY" in err["message"]
        r = await ac.post("/admin/pairs", json={"name": "x", "positive": "a", "negative": "b"})
        assert r.status_code == 403
