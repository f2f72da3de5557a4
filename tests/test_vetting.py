"""Upload vetting over HTTP: vectors and pairs that could only do harm (or never be used) are refused at
upload with the figures; ``ablate`` never divides by zero; ``actadd`` refuses blank prompts; ``/metrics``
shows the front end's bank gate on the vllm engine."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from steerserve.config import Settings
from steerserve.errors import SteerError
from steerserve.methods.ablate import Ablate
from steerserve.model_info import ModelInfo
from steerserve.service import Service
from steerserve.spec import PromptInfo, ResolveContext
from steerserve.store.artifacts import ArtifactMeta, StoredVector


def error(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    return err


def _layers(service: Service, **special: list[float]) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    out = {str(i): (torch.randn(service.info.hidden_size, generator=g) / 24).tolist() for i in range(3)}
    out.update(special)
    return out


def test_norms_are_measured_once_and_recorded(service: Service) -> None:
    record = json.loads((service.store.root / "activation_norms.json").read_text())
    assert record["model_fingerprint"] == service.info.fingerprint
    norms = record["median_norm"]
    assert len(norms) == service.info.num_layers and all(10 < n < 2000 for n in norms)
    assert service.store.policy.typical_norms == tuple(norms)


@pytest.mark.parametrize(("special", "needle"), [
    ({"1": [0.0] * 576}, "all zeros"),
    ({"2": [3e38] * 576}, "exceeds 10 x the model's typical activation norm at layer 2"),
    ({"0": [1e3] * 576}, "exceeds 10 x the model's typical activation norm at layer 0"),
])
def test_degenerate_vectors_are_refused_with_figures(client: httpx.Client, admin_headers: dict[str, str],
                                                      service: Service, special: dict[str, list[float]],
                                                      needle: str) -> None:
    body = {"name": "degenerate", "vectors": _layers(service, **special)}
    err = error(client.post("/admin/vectors", headers=admin_headers, json=body))
    assert err["param"] == f"vectors.{next(iter(special))}" and needle in err["message"], err
    assert client.get("/admin/vectors/degenerate", headers=admin_headers).status_code == 404


def test_non_finite_safetensors_are_refused(client: httpx.Client, admin_headers: dict[str, str]) -> None:
    data = safetensors.torch.save({"layer.4": torch.full((576,), float("nan"))})
    r = client.post("/admin/vectors?name=nan", content=data,
                    headers={**admin_headers, "content-type": "application/octet-stream"})
    err = error(r)
    assert err["param"] == "tensors.layer.4" and "576 NaN or infinite" in err["message"]


def test_long_descriptions_are_refused(client: httpx.Client, admin_headers: dict[str, str],
                                       service: Service) -> None:
    body = {"name": "wordy", "vectors": _layers(service), "description": "x" * 5000}
    assert error(client.post("/admin/vectors", headers=admin_headers, json=body))["param"] == "description"


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"positive": "   ", "negative": "Hate"}, "positive", "blank"),
    ({"positive": "Love " * 80, "negative": "Hate"}, "positive", "tokens"),
    ({"positive": "Love", "negative": "Hate", "coeff": 1e9}, "coeff", "exceeds the server's limit"),
    ({"positive": "Love", "negative": "Hate", "layer": 30}, "layer", "outside"),
])
def test_unusable_pairs_are_refused(client: httpx.Client, admin_headers: dict[str, str], body: dict[str, Any],
                                    param: str, needle: str) -> None:
    err = error(client.post("/admin/pairs", headers=admin_headers, json={"name": "unusable", **body}))
    assert err["param"] == param and needle in err["message"], err


def test_actadd_refuses_blank_prompts(client: httpx.Client) -> None:
    steering = {"interventions": [{"method": "actadd", "positive": " \n ", "negative": "Hate", "layer": 6,
                                   "coeff": 5}]}
    r = client.post("/generate", json={"prompt": "Hi", "max_tokens": 2, "steering": steering})
    assert error(r)["param"] == "steering.interventions.0.positive"


async def test_ablate_never_divides_by_zero() -> None:
    """A zero layer in a vector stored before vetting existed: ``ablate`` refuses it, naming the field."""
    info = ModelInfo("m", "LlamaForCausalLM", 2, 4, 10, 64, "float32", "fp")
    meta = ArtifactMeta("old", 1, "vector", "fp", "m", 4, 2, (0, 1), "upload", {}, {}, "", "", True, "", "")

    class Store:
        def load_vector(self, ref: str, *, field: str = "vector", kinds: tuple[str, ...] = ("vector",)) -> StoredVector:
            return StoredVector(meta, {0: torch.ones(4), 1: torch.zeros(4)})

    async def no_states(*_: Any) -> list[torch.Tensor]:
        raise AssertionError("not needed")

    ctx = ResolveContext(Settings(), info, Store(), lambda s: [1], no_states)  # type: ignore[arg-type]
    with pytest.raises(SteerError) as e:
        await Ablate().compile({"vector": "old"}, PromptInfo((1, 2), 0), ctx, "steering.interventions.0")
    assert e.value.field == "steering.interventions.0.vector" and "zero" in e.value.message
    ok = await Ablate().compile({"vector": "old", "layers": [0]}, PromptInfo((1, 2), 0), ctx, "s")
    assert torch.allclose(ok.ops[0].vector.data.norm(), torch.tensor(1.0))


def test_metrics_show_the_bank_gate(client: httpx.Client, settings: Settings, service: Service) -> None:
    if type(service.engine).__name__ != "VLLMEngine":
        pytest.skip("the bank gate is the vllm engine's front end")
    text = client.get("/metrics").text
    for what in ("gate_rows", "gate_requests", "gate_waiting"):
        assert f'steerserve_engine{{what="{what}"}} 0.0' in text, what
