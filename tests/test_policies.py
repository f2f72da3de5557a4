"""Policies over HTTP, on the live server: admin CRUD and its validation, and what a key's policy does to
``/generate`` and the OpenAI-compatible routes (forbidden methods, caps, mandatory interventions, keys)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from steerserve.service import Service

STORY = [{"role": "user", "content": "Tell me a short story about a dog."}]
MODEL = "SmolLM2-135M-Instruct"


def error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["param"] == param, err
    return err


def generate(client: httpx.Client, key: str | None = None, steering: list[dict[str, Any]] | None = None,
             path: str = "/generate") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    body: dict[str, Any] = {"temperature": 0, "max_tokens": 16,
                            "steering": None if steering is None else {"interventions": steering}}
    if path == "/v1/completions":
        body["prompt"] = "Once upon a time"
    else:
        body["messages"] = STORY
    return client.post(path, json=body, headers=headers)


@pytest.fixture(scope="module")
def safe(fresh_vector: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The mandatory intervention of these tests: a random all-layer vector, strong enough to change text."""
    fresh_vector("pol-safe")
    return {"method": "add", "vector": "pol-safe", "coeff": 8.0}


def test_policy_crud_and_validation(client: httpx.Client, admin_headers: dict[str, str], safe: dict[str, Any]) -> None:
    h = admin_headers
    default = client.get("/admin/policies/default", headers=h).json()
    assert default["mandatory"] == [] and default["allowed_methods"] is None and default["max_coeff"] is None
    assert "default" in [p["name"] for p in client.get("/admin/policies", headers=h).json()["data"]]

    bad: list[tuple[dict[str, Any], str]] = [
        ({"allowed_methods": ["add", "frobnicate"]}, "allowed_methods.1"),
        ({"method_caps": {"frobnicate": 1}}, "method_caps.frobnicate"),
        ({"mandatory": [{"method": "frobnicate"}]}, "mandatory.0.method"),
        ({"mandatory": [safe, {"method": "add", "vector": "no-such-vector", "coeff": 1}]}, "mandatory.1.vector"),
        ({"mandatory": [{"method": "add", "vector": "pol-safe", "coeff": 1, "layers": [99]}]}, "mandatory.0.layers.0"),
        ({"mandatory": [{"vector": "pol-safe"}]}, "mandatory.0.method"),
        ({"max_coeff": -1}, "max_coeff"),
        ({"mandatory": [safe] * 5}, "mandatory"),  # more than max_interventions
    ]
    for body, param in bad:
        error(client.post("/admin/policies", headers=h, json={"name": "crud", **body}), 400, param)
        error(client.get("/admin/policies/crud", headers=h), 404, "name")  # nothing half written
    r = client.post("/admin/policies", headers={**h, "Content-Type": "application/json"},
                    content=b'{"name": "crud", "method_caps": {"add": 1e999}}')  # infinity
    error(r, 400, "method_caps.add")

    body = {"name": "crud", "mandatory": [safe], "allowed_methods": ["add"], "max_coeff": 4,
            "method_caps": {"add": 2.5}, "description": "for the CRUD test"}
    r = client.post("/admin/policies", headers=h, json=body)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["mandatory"] == [safe] and made["allowed_methods"] == ["add"] and made["method_caps"] == {"add": 2.5}
    error(client.post("/admin/policies", headers=h, json=body), 409, "name")
    r = client.put("/admin/policies/crud", headers=h, json={"max_coeff": 1})
    assert r.status_code == 200, r.text
    assert r.json()["mandatory"] == [] and r.json()["max_coeff"] == 1 and r.json()["created"] == made["created"]
    assert client.get("/admin/policies/crud", headers=h).json() == r.json()

    r = client.post("/admin/keys", headers=h, json={"policy": "crud"})
    assert r.status_code == 201 and r.json()["key"].startswith("ssk-")
    key_id = r.json()["id"]
    (listed,) = [k for k in client.get("/admin/keys", headers=h).json()["data"] if k["id"] == key_id]
    assert listed == {k: v for k, v in r.json().items() if k != "key"}  # the key itself is shown once only
    add = [{"method": "add", "vector": "pol-safe", "coeff": 2}]
    error(generate(client, r.json()["key"], add), 403, "steering.interventions.0.coeff")
    assert client.put("/admin/policies/crud", headers=h, json={"max_coeff": 3}).status_code == 200
    assert generate(client, r.json()["key"], add).status_code == 200  # a bound key follows the new rules at once
    error(client.delete("/admin/policies/crud", headers=h), 409, "name")  # a key is bound to it
    error(client.delete("/admin/policies/default", headers=h), 409, "name")
    error(client.post("/admin/keys", headers=h, json={"policy": "no-such-policy"}), 400, "policy")
    error(client.post("/admin/keys", headers=h, json={"policy": "crud", "key": "short"}), 400, "key")
    assert client.delete(f"/admin/keys/{key_id}", headers=h).status_code == 200
    error(client.delete(f"/admin/keys/{key_id}", headers=h), 404, "id")
    assert client.delete("/admin/policies/crud", headers=h).json()["name"] == "crud"
    error(client.get("/admin/policies/crud", headers=h), 404, "name")
    error(client.put("/admin/policies/crud", json={}), 401, None)  # the admin key guards these routes too


def test_forbidden_method_is_403_naming_it(client: httpx.Client, make_key: Callable[..., str],
                                           fresh_vector: Callable[[str], dict[str, Any]]) -> None:
    fresh_vector("pol-any")
    key = make_key("no-add", allowed_methods=["ablate"])
    add = {"method": "add", "vector": "pol-any", "coeff": 1}
    for path in ("/generate", "/v1/chat/completions", "/v1/completions"):
        err = error(generate(client, key, [{"method": "ablate", "vector": "pol-any"}, add], path), 403,
                    "steering.interventions.1.method")
        assert err["code"] == "policy_forbidden" and "'no-add'" in err["message"] and "'add'" in err["message"]
        assert generate(client, key, [{"method": "ablate", "vector": "pol-any"}], path).status_code == 200
        assert generate(client, None, [add], path).status_code == 200  # no key: the default policy allows it


def test_coefficient_over_the_cap_is_403(client: httpx.Client, admin_headers: dict[str, str],
                                         make_key: Callable[..., str],
                                         fresh_vector: Callable[[str], dict[str, Any]]) -> None:
    fresh_vector("pol-any")
    key = make_key("capped", max_coeff=5, method_caps={"add": 2})
    err = error(generate(client, key, [{"method": "add", "vector": "pol-any", "coeff": -2.5}]), 403,
                "steering.interventions.0.coeff")
    assert "2" in err["message"] and "'capped'" in err["message"]
    assert generate(client, key, [{"method": "add", "vector": "pol-any", "coeff": -2}]).status_code == 200
    # A strength the method takes from an artifact is capped too: a stored pair's coefficient.
    r = client.post("/admin/pairs", headers=admin_headers,
                    json={"name": "pol-pair", "positive": "Love", "negative": "Hate", "layer": 3, "coeff": 6.0})
    assert r.status_code == 201, r.text
    error(generate(client, key, [{"method": "actadd", "pair": "pol-pair"}]), 403, "steering.interventions.0.coeff")
    assert generate(client, key, [{"method": "actadd", "pair": "pol-pair", "coeff": 5}]).status_code == 200
    assert generate(client, None, [{"method": "actadd", "pair": "pol-pair"}]).status_code == 200


def test_mandatory_intervention_is_applied_anyway(client: httpx.Client, make_key: Callable[..., str],
                                                  safe: dict[str, Any]) -> None:
    key = make_key("safe", mandatory=[safe])
    plain = generate(client).json()
    itself = generate(client, None, [safe]).json()  # a request that sent the intervention itself
    under = generate(client, key).json()
    assert itself["text"] != plain["text"]
    assert under["text"] == itself["text"]
    (applied,) = under["steering"]["applied"]
    assert applied["mandatory"] is True and applied["policy"] == "safe" and applied["artifacts"] == ["pol-safe@1"]
    assert itself["steering"]["applied"][0]["mandatory"] is False

    # An exact copy is applied once, as the policy's; anything else using its vector is refused, naming it.
    copy = generate(client, key, [dict(safe)]).json()
    assert copy["text"] == itself["text"] and len(copy["steering"]["applied"]) == 1
    for attempt in ({**safe, "coeff": -8.0}, {**safe, "coeff": 0}, {"method": "ablate", "vector": "pol-safe@1"}):
        err = error(generate(client, key, [attempt]), 403, "steering.interventions.0.vector")
        assert "mandatory" in err["message"]
    # On the OpenAI routes too, and it does not count against the client's max_interventions.
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = generate(client, key, [], path).json()
        assert r["steering"]["applied"][0]["mandatory"] is True
    assert generate(client, None, [], "/v1/completions").json()["choices"][0]["text"] != \
        generate(client, key, [], "/v1/completions").json()["choices"][0]["text"]


def test_broken_mandatory_fails_closed(client: httpx.Client, admin_headers: dict[str, str],
                                       make_key: Callable[..., str],
                                       fresh_vector: Callable[[str], dict[str, Any]]) -> None:
    fresh_vector("pol-gone")
    key = make_key("fragile", mandatory=[{"method": "add", "vector": "pol-gone", "coeff": 4}])
    assert generate(client, key).status_code == 200
    assert client.patch("/admin/vectors/pol-gone", headers=admin_headers, json={"enabled": False}).status_code == 200
    err = error(generate(client, key), 503, "policy.mandatory.0.vector")
    assert err["code"] == "policy_unavailable" and "'fragile'" in err["message"]
    assert generate(client).status_code == 200  # the server keeps serving everyone else
    client.patch("/admin/vectors/pol-gone", headers=admin_headers, json={"enabled": True})
    assert generate(client, key).status_code == 200


@pytest.mark.parametrize("authorization", ["Bearer not-a-bound-key-123456", "Basic dGVzdC1rZXk=", "not-a-key"])
def test_unknown_key_is_401(client: httpx.Client, authorization: str, make_key: Callable[..., str]) -> None:
    make_key("bound-first")  # unknown keys are refused once any key is bound (``unknown_keys="auto"``)
    for method, path in (("POST", "/generate"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        r = client.request(method, path, headers={"Authorization": authorization},
                           json={"messages": STORY, "max_tokens": 1})
        err = error(r, 401, None)
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"


def test_revoked_key_is_401(client: httpx.Client, admin_headers: dict[str, str], make_key: Callable[..., str]) -> None:
    key = make_key("revoke-me")
    assert generate(client, key).status_code == 200
    keys = client.get("/admin/keys", headers=admin_headers).json()["data"]
    (entry,) = [k for k in keys if k["policy"] == "revoke-me"]
    assert client.delete(f"/admin/keys/{entry['id']}", headers=admin_headers).status_code == 200
    error(generate(client, key), 401, None)


def test_given_key_is_stored_as_a_hash(client: httpx.Client, admin_headers: dict[str, str], service: Service) -> None:
    key = "my-very-own-client-key-0123456789"
    r = client.post("/admin/keys", headers=admin_headers, json={"policy": "default", "key": key, "label": "mine"})
    assert r.status_code == 201 and "key" not in r.json()
    assert generate(client, key).status_code == 200
    error(client.post("/admin/keys", headers=admin_headers, json={"policy": "default", "key": key}), 409, "key")
    root = service.store.root
    stored = b"".join(p.read_bytes() for p in root.iterdir() if p.name.startswith("manifest.sqlite"))
    assert key.encode() not in stored
    client.delete(f"/admin/keys/{r.json()['id']}", headers=admin_headers)


def test_default_policy_governs_requests_without_a_key(client: httpx.Client, admin_headers: dict[str, str],
                                                       fresh_vector: Callable[[str], dict[str, Any]]) -> None:
    fresh_vector("pol-any")
    add = [{"method": "add", "vector": "pol-any", "coeff": 1}]
    assert generate(client, None, add).status_code == 200
    assert generate(client, "test-key", add).status_code == 200  # the admin key counts as no key
    r = client.put("/admin/policies/default", headers=admin_headers, json={"allowed_methods": ["ablate"]})
    try:
        assert r.status_code == 201, r.text
        error(generate(client, None, add), 403, "steering.interventions.0.method")
        error(generate(client, "test-key", add), 403, "steering.interventions.0.method")
    finally:
        r = client.put("/admin/policies/default", headers=admin_headers, json={})
        assert r.status_code == 200, r.text
    assert generate(client, None, add).status_code == 200


@pytest.fixture(scope="module")
def bound_oai(base_url: str, make_key: Callable[..., str], safe: dict[str, Any]) -> Iterator[OpenAI]:
    key = make_key("oai-policy", mandatory=[safe], allowed_methods=["ablate"])
    with OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120) as c:
        yield c


def test_openai_client_with_a_bound_key(bound_oai: OpenAI, base_url: str, client: httpx.Client,
                                        safe: dict[str, Any]) -> None:
    r = bound_oai.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=16)  # type: ignore[arg-type]
    itself = generate(client, None, [safe], "/v1/chat/completions").json()
    assert r.choices[0].message.content == itself["choices"][0]["message"]["content"]
    (applied,) = (r.model_extra or {})["steering"]["applied"]
    assert applied["mandatory"] is True and applied["policy"] == "oai-policy"
    add = {"method": "add", "vector": "pol-safe", "coeff": 1}
    with pytest.raises(openai.PermissionDeniedError) as denied:
        bound_oai.chat.completions.create(model=MODEL, messages=STORY, max_tokens=4,  # type: ignore[arg-type]
                                          extra_body={"steering": {"interventions": [add]}})
    assert denied.value.status_code == 403
    assert isinstance(denied.value.body, dict) and denied.value.body["param"] == "steering.interventions.0.method"
    with OpenAI(base_url=f"{base_url}/v1", api_key="sk-not-bound-anywhere", max_retries=0) as stranger, \
            pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_a_second_closed_loop_under_a_mandatory_one_is_403(client: httpx.Client, make_key: Callable[..., str],
                                                           fresh_vector: Callable[[str], dict[str, Any]]) -> None:
    fresh_vector("pol-loop")
    fresh_vector("pol-any")
    loop = {"method": "entropic", "target_entropy": 1.0, "layer": 18}
    key = make_key("looped", mandatory=[{**loop, "vector": "pol-loop"}])
    r = generate(client, key)
    assert r.status_code == 200, r.text
    err = error(generate(client, key, [{**loop, "vector": "pol-any"}]), 403, "steering.interventions.0")
    assert "closed-loop" in err["message"] and "'looped'" in err["message"]
    error(generate(client, None, [{**loop, "vector": "pol-any"}, {**loop, "vector": "pol-loop"}]), 400,
          "steering.interventions.1")  # without a policy: the client's own clash, as before


def test_audit_log_names_policies_and_key_ids_never_keys(client: httpx.Client, admin_headers: dict[str, str],
                                                         make_key: Callable[..., str]) -> None:
    key = make_key("audited", description="audit me")
    entries = client.get("/admin/audit", headers=admin_headers, params={"limit": 1000}).json()["data"]
    assert any(e["kind"] == "policy" and e["name"] == "audited" and e["action"] == "update" for e in entries)
    assert any(e["kind"] == "api_key" and e["action"] == "create" and e["outcome"] == "ok" for e in entries)
    assert key not in str(entries)
