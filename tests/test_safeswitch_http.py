"""SafeSwitch over HTTP on the live server: artifacts uploaded through the admin API, replies streamed to
real clients (``/generate`` SSE and the official ``openai`` client), the pilot never leaked.

Probes here are random with a large output bias, so that they either always fire (+20) or never (-20): what
is tested is the serving path (upload, the in-graph probes, the hold-back, the switch), not the probes'
quality (``vectors/README.md`` and the issue note measure that on the shipped ones).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch
from openai import OpenAI

from steerserve.runtime.safeswitch import HeadDelta, Probe
from steerserve.service import Service
from steerserve.store.safeswitch import head_header, probe_header, probe_tensors

PROMPT = [{"role": "user", "content": "Tell me about your day."}]
MAX_TOKENS = 16


def _probe(seed: int, hidden: int, bias: float) -> Probe:
    g = torch.Generator().manual_seed(seed)
    return Probe(torch.randn(64, hidden, generator=g) / hidden**0.5, torch.zeros(64),
                 torch.randn(2, 64, generator=g) / 8, torch.tensor([0.0, bias]))


def upload(client: httpx.Client, headers: dict[str, str], name: str, data: bytes) -> None:
    r = client.post(f"/admin/vectors?name={name}", content=data,
                    headers={**headers, "content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def artifacts(client: httpx.Client, admin_headers: dict[str, str], service: Service) -> dict[str, str]:
    info = service.info
    for name, bias in (("ss-fire", 20.0), ("ss-never", -20.0)):
        tensors = probe_tensors(_probe(1, info.hidden_size, bias), _probe(2, info.hidden_size, bias))
        upload(client, admin_headers, name, safetensors.torch.save(tensors, metadata=probe_header(info, 0.5)))
    g = torch.Generator().manual_seed(3)
    delta = HeadDelta(torch.randn(8, info.hidden_size, generator=g) / info.hidden_size**0.5,
                      torch.randn(info.vocab_size, 8, generator=g) * 2)
    data = safetensors.torch.save({"a": delta.a, "b": delta.b}, metadata=head_header(info, 8, "tied_embeddings"))
    upload(client, admin_headers, "ss-head", data)
    return {"fire": "ss-fire", "never": "ss-never", "head": "ss-head"}


def spec(probes: str, head: str) -> dict[str, Any]:
    return {"interventions": [{"method": "safeswitch", "probes": probes, "head": head}]}


def sse(client: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return events


@pytest.fixture(scope="module")
def oai(base_url: str, client: httpx.Client, admin_headers: dict[str, str]) -> Iterator[OpenAI]:
    r = client.post("/admin/keys", headers=admin_headers, json={"policy": "default", "label": "safeswitch tests"})
    assert r.status_code == 201, r.text
    with OpenAI(base_url=f"{base_url}/v1", api_key=r.json()["key"], max_retries=0, timeout=120) as c:
        yield c


def test_flagged_reply_never_streams_the_pilot(client: httpx.Client, artifacts: dict[str, str],
                                               oai: OpenAI) -> None:
    body = {"messages": PROMPT, "temperature": 0, "max_tokens": MAX_TOKENS}
    plain = client.post("/generate", json=body).json()
    switched = client.post("/generate", json={**body, "steering": spec(artifacts["fire"], artifacts["head"])}).json()
    report = switched["steering"]["report"]
    assert report["switched"] is True and report["probe_stage1"] > 0.99
    pilot = plain["text"][:8]
    assert not switched["text"].startswith(pilot), "the head's reply must differ from the plain one for this test"
    events = sse(client, {**body, "steering": spec(artifacts["fire"], artifacts["head"])})
    assert "".join(e["text"] for e in events) == switched["text"]
    assert not events[0]["text"].startswith(pilot)  # the first thing a client sees is already the head's
    assert events[-1]["steering"]["report"]["switched"] is True
    stream = oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=PROMPT, max_tokens=MAX_TOKENS,
                                         temperature=0, stream=True,
                                         extra_body={"steering": spec(artifacts["fire"], artifacts["head"])})
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == switched["text"]
    assert not next(p for p in parts if p).startswith(pilot[:4])


def test_unflagged_reply_is_the_plain_one(client: httpx.Client, artifacts: dict[str, str], oai: OpenAI) -> None:
    body = {"messages": PROMPT, "temperature": 0, "max_tokens": MAX_TOKENS}
    plain = client.post("/generate", json=body).json()
    kept = client.post("/generate", json={**body, "steering": spec(artifacts["never"], artifacts["head"])}).json()
    assert kept["text"] == plain["text"] and kept["usage"] == plain["usage"]
    assert kept["steering"]["report"]["switched"] is False
    events = sse(client, {**body, "steering": spec(artifacts["never"], artifacts["head"])})
    assert "".join(e["text"] for e in events) == plain["text"]
    out = oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=PROMPT, max_tokens=MAX_TOKENS,
                                      temperature=0,
                                      extra_body={"steering": spec(artifacts["never"], artifacts["head"])})
    assert out.choices[0].message.content == plain["text"]


@pytest.mark.parametrize(("param", "value", "field"), [
    ("threshold", 1.5, "threshold"), ("threshold", float("nan"), "threshold"), ("probes", "nope", "probes"),
    ("head", "ss-fire", "head"), ("probes", "ss-head", "probes")])
def test_bad_safeswitch_specs_name_the_field(client: httpx.Client, artifacts: dict[str, str], param: str,
                                             value: Any, field: str) -> None:
    iv = {"method": "safeswitch", "probes": artifacts["never"], "head": artifacts["head"], param: value}
    content = json.dumps({"messages": PROMPT, "max_tokens": 4, "steering": {"interventions": [iv]}},
                         allow_nan=True)
    r = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert r.status_code in (400, 404, 422), r.text
    assert field in json.dumps(r.json())
    assert client.post("/generate", json={"messages": PROMPT, "max_tokens": 2}).status_code == 200


def test_mandatory_safeswitch_under_a_key_policy(client: httpx.Client, admin_headers: dict[str, str],
                                                 artifacts: dict[str, str]) -> None:
    """A policy that always applies SafeSwitch: its key's requests are switched whatever they send, and a
    client that tries to loosen it (another threshold) is refused with a 403 naming its intervention."""
    mandatory = {"method": "safeswitch", "probes": artifacts["fire"], "head": artifacts["head"]}
    r = client.put("/admin/policies/ss-always", headers=admin_headers, json={"mandatory": [mandatory]})
    assert r.status_code in (200, 201), r.text
    r = client.post("/admin/keys", headers=admin_headers, json={"policy": "ss-always", "label": "ss"})
    assert r.status_code == 201, r.text
    auth = {"Authorization": f"Bearer {r.json()['key']}"}
    body = {"messages": PROMPT, "temperature": 0, "max_tokens": MAX_TOKENS}
    plain = client.post("/generate", json=body).json()
    got = client.post("/generate", json=body, headers=auth).json()
    assert got["steering"]["report"]["switched"] is True and got["text"] != plain["text"]
    assert any(a.get("mandatory") for a in got["steering"]["applied"])
    loosen = {**mandatory, "threshold": 0.99}
    r = client.post("/generate", json={**body, "steering": {"interventions": [loosen]}}, headers=auth)
    assert r.status_code == 403 and "steering.interventions.0" in json.dumps(r.json())
