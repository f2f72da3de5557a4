"""The KL vetting of uploads (``methods.vetting``), over HTTP on the live server's engine: what an artifact does
at its declared strength is measured on calibration prompts before the commit, recorded in the manifest, and
an upload over the budget is refused with the figures, leaving nothing behind."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors
import safetensors.torch
import torch

from steerserve.config import Settings
from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.prompts import PromptRenderer
from steerserve.service import Service

DIRECTION = Path(__file__).resolve().parents[1] / "vectors" / "refusal_direction.safetensors"
RAW = "application/octet-stream"


def direction_file(use: str | None) -> bytes:
    """The shipped refusal direction with ``declared_use`` set to ``use`` (None: left out)."""
    with safetensors.safe_open(str(DIRECTION), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.pop("declared_use", None)
    if use is not None:
        meta["declared_use"] = use
    return safetensors.torch.save(tensors, metadata=meta)


def upload(client: httpx.Client, headers: dict[str, str], name: str, data: bytes) -> httpx.Response:
    return client.post("/admin/vectors", params={"name": name}, content=data, headers={**headers, "Content-Type": RAW})


async def test_first_logprobs_are_the_models_own(hf_engine: HFEngine) -> None:
    ids = PromptRenderer(hf_engine.tokenizer, 2048).render(messages=[{"role": "user", "content": "Hi!"}]).token_ids
    req = GenerationRequest(uuid.uuid4().hex, ids, SamplingParams(max_tokens=3), first_logprobs=True)
    outs = [o async for o in hf_engine.generate(req)]
    got = outs[0].extra["first_logprobs"]
    assert all("first_logprobs" not in o.extra for o in outs[1:])
    with torch.no_grad():
        want = torch.log_softmax(hf_engine.model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    assert isinstance(got, torch.Tensor) and torch.allclose(got, want, atol=1e-5)
    assert int(got.argmax()) == outs[0].token_ids[0]  # greedy samples from exactly that distribution


def test_upload_records_the_kl_at_its_declared_use(client: httpx.Client, admin_headers: dict[str, str],
                                                    service: Service) -> None:
    r = upload(client, admin_headers, "vet-direction", direction_file('{"coeff": 0.39}'))
    assert r.status_code == 201, r.text
    vetting = r.json()["provenance"]["vetting"]
    assert set(vetting["per_setting"]) == {"coeff=+0.39", "coeff=-0.39"} and vetting["calibration_prompts"] == 8
    assert vetting["kl"] == max(vetting["per_setting"].values())
    assert 0.1 < vetting["kl"] <= service.settings.max_upload_kl
    # A smaller declared use moves the distribution less: the figure is measured, not assumed.
    r = upload(client, admin_headers, "vet-direction-small", direction_file('{"coeff": 0.05}'))
    assert r.status_code == 201, r.text
    assert r.json()["provenance"]["vetting"]["kl"] < vetting["kl"] / 4


def test_a_controller_is_vetted_as_served(client: httpx.Client, admin_headers: dict[str, str]) -> None:
    data = (DIRECTION.parent / "refusal_controller.safetensors").read_bytes()
    r = upload(client, admin_headers, "vet-controller", data)
    assert r.status_code == 201, r.text
    vetting = r.json()["provenance"]["vetting"]
    assert set(vetting["per_setting"]) == {"alpha=0.9"}
    assert vetting["kl"] < 0.2  # it stays quiet on ordinary requests: its decision runs in the vetting too


def test_over_budget_upload_is_refused_with_figures(client: httpx.Client, admin_headers: dict[str, str],
                                                    service: Service) -> None:
    r = upload(client, admin_headers, "vet-too-strong", direction_file('{"coeff": 3}'))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "file" and err["code"] == "vetting_failed"
    budget = service.settings.max_upload_kl
    assert f"over the budget of {budget:g}" in err["message"] and "coeff=+3" in err["message"]
    assert client.get("/admin/vectors/vet-too-strong", headers=admin_headers).status_code == 404  # nothing stored
    r = client.post("/generate", json={"prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200, r.text  # and the server keeps serving


def test_without_a_declared_use_a_direction_is_vetted_at_coeff_one(client: httpx.Client,
                                                                   admin_headers: dict[str, str]) -> None:
    r = upload(client, admin_headers, "vet-undeclared", direction_file(None))
    assert r.status_code == 422 and "coeff=+1" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("use", ['{"coeff": -1}', '"strong"', '{"coeff": 0.3, "layers": [3]}', "{",
                                 '{"coeff": true}', '{"coeff": 0.3, "layers": []}'])
def test_bad_declared_use_is_refused(client: httpx.Client, admin_headers: dict[str, str], use: str) -> None:
    r = upload(client, admin_headers, "vet-bad", direction_file(use))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "metadata.declared_use"


def test_json_uploads_are_vetted_too(fresh_vector: Any) -> None:
    vetting = fresh_vector("vet-json")["provenance"]["vetting"]
    assert set(vetting["per_setting"]) == {"coeff=+1", "coeff=-1"} and 0 < vetting["kl"] < 0.1


def test_budget_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEERSERVE_MAX_UPLOAD_KL", "0.5")
    assert Settings.from_env().max_upload_kl == 0.5
    assert json.loads(json.dumps(Settings().max_upload_kl)) == 4.0
