"""Multipart uploads and the admin audit log, over HTTP on the live server (the real default model).

A multipart upload is the raw upload's bytes in a form: it must store the same bytes and steer identically;
its refusals name the part. Every request with the admin key leaves one audit entry with the sha256 of the
bytes involved, refusals included; the key itself is never stored.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import replace
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch
from starlette.types import Message

from steerserve.api import create_app
from steerserve.config import Settings
from steerserve.service import Service
from tests.conftest import ADMIN_KEY
from tests.test_edge_hardening import asgi

MiB = 1024 * 1024
ACTOR = "admin:" + hashlib.sha256(ADMIN_KEY.encode()).hexdigest()[:8]
STORY = [{"role": "user", "content": "Tell me a short story about a dog."}]
LAYERS = (2, 3, 4, 5, 6)


def vector_file(seed: int, norm: float = 20.0, nan_layer: int | None = None) -> bytes:
    """Safetensors bytes: a seeded random vector of L2 ``norm`` at each of ``LAYERS`` (576 = hidden size)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in LAYERS:
        v = torch.randn(576, generator=gen)
        tensors[f"layer.{layer}"] = v / v.norm() * norm
    if nan_layer is not None:
        tensors[f"layer.{nan_layer}"][7] = float("nan")
    data: bytes = safetensors.torch.save(tensors)
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def form_upload(client: httpx.Client, headers: dict[str, str], name: str | None, data: bytes | None,
                **fields: str) -> httpx.Response:
    parts: list[tuple[str, Any]] = [(k, (None, v)) for k, v in fields.items()]
    if name is not None:
        parts.append(("name", (None, name)))
    if data is not None:
        parts.append(("file", ("v.safetensors", data)))
    return client.post("/admin/vectors", headers=headers, files=parts)


def generate(client: httpx.Client, vector: str | None) -> dict[str, Any]:
    steering = {"interventions": [{"method": "add", "vector": vector, "coeff": 1.0}]} if vector else None
    r = client.post("/generate", json={"messages": STORY, "temperature": 0, "max_tokens": 12, "steering": steering})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["param"] == param, err
    return err


def audit(client: httpx.Client, headers: dict[str, str], **filters: Any) -> list[dict[str, Any]]:
    r = client.get("/admin/audit", headers=headers, params=filters)
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def test_multipart_upload_steers_like_a_raw_upload(client: httpx.Client, admin_headers: dict[str, str]) -> None:
    data = vector_file(1)
    raw = client.post("/admin/vectors", params={"name": "mp-raw"}, content=data,
                      headers={**admin_headers, "Content-Type": "application/octet-stream"})
    assert raw.status_code == 201, raw.text
    form = form_upload(client, admin_headers, "mp-form", data, description="from a form")
    assert form.status_code == 201, form.text
    meta = form.json()
    assert meta["ref"] == "mp-form@1" and meta["kind"] == "vector" and meta["description"] == "from a form"
    assert meta["sha256"] == raw.json()["sha256"] == sha(data)  # the very bytes sent, stored as sent
    assert meta["layers"] == raw.json()["layers"] == list(LAYERS)

    plain, by_raw, by_form = generate(client, None), generate(client, "mp-raw"), generate(client, "mp-form")
    assert by_form["steering"]["applied"][0]["artifacts"] == ["mp-form@1"]
    assert by_form["text"] == by_raw["text"] and by_form["usage"] == by_raw["usage"]
    assert by_form["text"] != plain["text"]  # the vector does steer: the equality above says something


def test_multipart_refusals_name_the_part(client: httpx.Client, admin_headers: dict[str, str],
                                          service: Service) -> None:
    good = vector_file(2)
    truncated = good[:-7]
    error(form_upload(client, admin_headers, "mp-trunc", truncated), 400, "file")
    error(form_upload(client, admin_headers, "mp-head", good[:5]), 400, "file")  # cut inside the header length
    error(form_upload(client, admin_headers, "mp-empty", b""), 400, "file")
    err = error(form_upload(client, admin_headers, "mp-nofile", None), 400, "file")
    assert "required" in err["message"]
    err = error(client.post("/admin/vectors", headers=admin_headers,
                            files=[("name", (None, "mp-text")), ("file", (None, good))]), 400, "file")
    assert "file part" in err["message"]
    error(form_upload(client, admin_headers, None, good), 400, "name")
    error(form_upload(client, admin_headers, "bad name!", good), 400, "name")
    err = error(client.post("/admin/vectors", headers=admin_headers,
                            files=[("name", (None, "mp-type")), ("file", ("v.txt", good, "text/plain"))]), 415, "file")
    assert "application/octet-stream" in err["message"]
    error(form_upload(client, admin_headers, "mp-extra", good, colour="red"), 400, "colour")
    error(client.post("/admin/vectors", headers=admin_headers,
                      files=[("name", (None, "mp-twice")), ("file", ("a", good)), ("file", ("b", good))]), 400, "file")
    error(form_upload(client, admin_headers, "mp-long", good, description="x" * 1025), 400, "description")
    err = error(client.post("/admin/vectors", content=b"--x\r\n", headers={**admin_headers,
                            "Content-Type": "multipart/form-data"}), 400, None)  # no boundary
    assert err["code"] == "invalid_multipart"
    error(form_upload(client, admin_headers, "mp-nan", vector_file(3, nan_layer=4)), 400, "tensors.layer.4")

    names = {"mp-trunc", "mp-head", "mp-empty", "mp-nofile", "mp-text", "mp-type", "mp-extra", "mp-twice",
             "mp-long", "mp-nan"}
    listed = {d["name"] for d in client.get("/admin/vectors", headers=admin_headers).json()["data"]}
    assert not names & listed
    assert not [n for n in names if (service.store.dir / n).exists()]  # not even a file without its row
    (entry,) = audit(client, admin_headers, name="mp-trunc")
    assert (entry["action"], entry["outcome"], entry["status"], entry["field"]) == ("upload", "refused", 400, "file")
    assert entry["sha256"] == sha(truncated) and entry["version"] is None and entry["artifacts"] == []
    assert generate(client, None)["text"]  # the server still serves


class Upload:
    """An ASGI ``receive``: a multipart head, then 1 MiB chunks of the file part; counts what was taken."""

    HEAD = (b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\nmp-big\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="v"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")

    def __init__(self, chunks: int) -> None:
        self.chunks, self.taken = chunks, 0

    async def __call__(self) -> Message:
        if self.taken > self.chunks:
            return {"type": "http.disconnect"}
        body = self.HEAD if self.taken == 0 else b"\0" * MiB
        self.taken += 1
        return {"type": "http.request", "body": body, "more_body": self.taken <= self.chunks}


@pytest.fixture(scope="module")
def small_app(service: Service, settings: Settings) -> Any:
    """The app with a 4 MiB upload limit, without its lifespan (the live server owns the engine)."""
    return create_app(service, replace(settings, max_upload_bytes=4 * MiB))


async def test_oversized_multipart_is_413(small_app: Any, client: httpx.Client,
                                          admin_headers: dict[str, str]) -> None:
    headers = {**admin_headers, "content-type": "multipart/form-data; boundary=B"}
    body = Upload(50)
    status, _, out = await asgi(small_app, "POST", "/admin/vectors", {**headers, "content-length": str(50 * MiB)},
                                body)
    assert (status, out["error"]["code"], body.taken) == (413, "too_large", 0)  # refused on the header alone
    body = Upload(50)  # chunked: counted as it arrives, refused at the limit
    status, _, out = await asgi(small_app, "POST", "/admin/vectors", headers, body)
    assert (status, out["error"]["code"]) == (413, "too_large")
    assert body.taken == 1 + 4  # the head and 4 chunks: the 4th takes the body past 4 MiB, and nothing more is read
    assert "mp-big" not in {d["name"] for d in client.get("/admin/vectors", headers=admin_headers).json()["data"]}
    chunked, declared = audit(client, admin_headers, action="upload", limit=2)
    for entry in (chunked, declared):
        assert (entry["route"], entry["outcome"], entry["status"]) == ("POST /admin/vectors", "refused", 413)
        assert entry["actor"] == ACTOR


def test_audit_log(client: httpx.Client, admin_headers: dict[str, str], service: Service) -> None:
    data, too_big = vector_file(4), vector_file(5, norm=1e5)
    assert form_upload(client, admin_headers, "aud", data).status_code == 201
    r = form_upload(client, admin_headers, "aud", too_big)  # vetting refuses it: the norms are too large
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tensors.layer."), r.text
    assert client.patch("/admin/vectors/aud", headers=admin_headers, json={"enabled": False}).status_code == 200
    assert client.delete("/admin/vectors/aud@1", headers=admin_headers).status_code == 200
    error(client.delete("/admin/vectors/aud", headers=admin_headers), 404, "name")
    # Without the key: refused at the edge and not logged (anonymous clients cannot write to the log).
    assert client.delete("/admin/vectors/aud", headers={"Authorization": "Bearer nope"}).status_code == 401

    entries = audit(client, admin_headers, name="aud")
    assert [(e["action"], e["outcome"], e["status"]) for e in entries] == [
        ("delete", "refused", 404), ("delete", "ok", 200), ("disable", "ok", 200), ("upload", "refused", 400),
        ("upload", "ok", 201)]
    assert [e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True)  # newest first
    deleted, disabled, refused, uploaded = entries[1:]
    for e in (uploaded, disabled, deleted):
        assert (e["sha256"], e["version"], e["kind"]) == (sha(data), 1, "vector")
        assert e["artifacts"] == [{"ref": "aud@1", "kind": "vector", "sha256": sha(data)}]
    assert (refused["sha256"], refused["version"], refused["field"]) == (sha(too_big), None,
                                                                        r.json()["error"]["param"])
    assert refused["reason"] == r.json()["error"]["message"] and "exceeds" in refused["reason"]
    assert entries[0]["route"] == "DELETE /admin/vectors/{name}" and entries[0]["field"] == "name"
    assert {e["actor"] for e in entries} == {ACTOR}
    assert all(e["at"].endswith("+00:00") for e in entries)

    # A JSON upload's bytes are the file the store wrote: its sha256 is the one the response gives.
    r = client.post("/admin/vectors", headers=admin_headers,
                    json={"name": "aud-json", "vectors": {"3": [0.5] * 576}})
    assert r.status_code == 201, r.text
    (entry,) = audit(client, admin_headers, name="aud-json")
    assert entry["sha256"] == r.json()["sha256"] and entry["action"] == "upload"

    # Filters and paging.
    assert [e["id"] for e in audit(client, admin_headers, name="aud", outcome="refused")] == [
        entries[0]["id"], refused["id"]]
    assert [e["id"] for e in audit(client, admin_headers, name="aud", limit=2)] == [e["id"] for e in entries[:2]]
    assert [e["id"] for e in audit(client, admin_headers, name="aud", before=disabled["id"])] == [
        refused["id"], uploaded["id"]]
    error(client.get("/admin/audit", headers=admin_headers, params={"limit": 0}), 400, "limit")
    reads = audit(client, admin_headers, action="read", limit=1)
    assert reads[0]["route"] == "GET /admin/audit" and reads[0]["status"] == 400  # the refused read just above

    # The key is never stored: not in any entry, not anywhere in the database files.
    assert ADMIN_KEY not in client.get("/admin/audit", headers=admin_headers, params={"limit": 1000}).text
    with sqlite3.connect(service.store.root / "manifest.sqlite") as db:
        rows = db.execute("SELECT * FROM audit").fetchall()
    assert rows and not [r for r in rows if ADMIN_KEY in repr(r)]
    for path in service.store.root.glob("manifest.sqlite*"):
        assert ADMIN_KEY.encode() not in path.read_bytes(), path
