"""SAE dictionaries (issue 24, first part): the published formats read into our ``sae`` artifact, the store's
checks, and ``sae_feature`` in ``add`` mode on the live server.

The dictionaries here are random: the tests check the formats, the layer mapping and exact identities of a
feature's steering (``add`` of a feature is ``add`` of its decoder row; clamping a feature that reads a
constant is adding its decoder row by the difference), not an effect (the shipped dictionary's effect is
measured by ``steerserve eval``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch

from steerserve.cli import build_parser
from steerserve.errors import SteerError
from steerserve.model import prepare_default_model
from steerserve.service import Service
from steerserve.store.artifacts import ArtifactStore
from steerserve.store.db import header_metadata
from steerserve.store.sae import Sae, check_sae
from steerserve.tools.sae.cli import sae_bytes
from steerserve.tools.sae.formats import layer_of_hook, read_any
from tests.paths import models_dir

H, D_SAE, LAYER = 576, 48, 5  # the default model's hidden size; a small dictionary at layer 5


def _weights(seed: int, d_in: int = H) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(D_SAE, d_in, generator=g)
    dec = dec / dec.norm(dim=1, keepdim=True)  # unit decoder rows, as SAEs are trained
    enc, b_enc = dec.T.contiguous() * 0.5, torch.randn(D_SAE, generator=g) * 0.1
    enc[:, :2] = 0.0  # feature 0 reads 5 at every token, feature 1 never fires: what /features must show
    b_enc[0], b_enc[1] = 5.0, -1.0
    return {"W_enc": enc, "b_enc": b_enc, "W_dec": dec, "b_dec": torch.randn(d_in, generator=g) * 0.05,
            "threshold": torch.rand(D_SAE, generator=g)}


def saelens_dir(root: Path, hook: str = f"blocks.{LAYER}.hook_resid_post", arch: str = "jumprelu",
                d_in: int = H) -> Path:
    folder = root / "saelens"
    folder.mkdir(parents=True, exist_ok=True)
    w = _weights(1, d_in)
    if arch != "jumprelu":
        del w["threshold"]
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": D_SAE, "hook_name": hook, "apply_b_dec_to_input": False,
           "normalize_activations": "none", **({"k": 8} if arch == "topk" else {})}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file(w, str(folder / "sae_weights.safetensors"))
    return folder


def sparsify_dir(root: Path) -> Path:
    folder = root / f"layers.{LAYER}"
    folder.mkdir(parents=True)
    w = _weights(2)
    (folder / "cfg.json").write_text(json.dumps({"k": 8, "num_latents": D_SAE, "expansion_factor": 1}))
    safetensors.torch.save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"],
                                 "W_dec": w["W_dec"], "b_dec": w["b_dec"]}, str(folder / "sae.safetensors"))
    return folder


def test_each_format_reads_into_one_dictionary(tmp_path: Path) -> None:
    x = torch.randn(3, H)
    lens, _ = read_any(saelens_dir(tmp_path))
    assert (lens.layer, lens.activation, lens.center, lens.d_sae) == (LAYER, "jumprelu", False, D_SAE)
    pre = x @ lens.w_enc + lens.b_enc
    assert torch.equal(lens.encode(x), pre * (pre > lens.threshold))  # JumpReLU on x (no centring)
    sp, _ = read_any(sparsify_dir(tmp_path))
    w = _weights(2)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # sparsify: encoder.weight [d_sae, H] reads x - b_dec
    assert (sp.layer, sp.activation, sp.k) == (LAYER, "topk", 8)
    assert torch.allclose(sp.pre(x), pre, atol=1e-5)
    assert int((sp.encode(x) != 0).sum(dim=-1).max()) <= 8
    npz = tmp_path / "gemmascope" / "params.npz"
    npz.parent.mkdir()
    np.savez(npz, **{k: v.numpy() for k, v in _weights(3).items()})
    with pytest.raises(SteerError) as info:
        read_any(npz)
    assert info.value.field == "layer"
    gs, _ = read_any(npz, layer=7)
    assert (gs.layer, gs.activation, gs.center) == (7, "jumprelu", False)


HOOKS = [("blocks.5.hook_resid_post", 5), ("blocks.6.hook_resid_pre", 5), ("layers.12", 12), ("model.layers.3", 3),
         ("blocks.0.hook_resid_pre", None), ("blocks.5.hook_mlp_out", None), ("blocks.5.attn.hook_z", None)]


@pytest.mark.parametrize(("hook", "layer"), HOOKS)
def test_hook_sites_map_onto_our_layers(hook: str, layer: int | None) -> None:
    if layer is not None:
        assert layer_of_hook(hook, "hook") == layer
    else:
        with pytest.raises(SteerError, match="residual-stream"):
            layer_of_hook(hook, "hook")


def test_a_dictionary_the_model_cannot_take_is_refused_naming_the_field(service: Service, tmp_path: Path) -> None:
    model = service.info
    good = sae_bytes(saelens_dir(tmp_path), None, model)
    loaded, header = safetensors.torch.load(good), header_metadata(good)
    cases: list[tuple[dict[str, str], dict[str, torch.Tensor], str]] = [
        ({**header, "sae_layer": "30"}, loaded, "metadata.sae_layer"),
        ({**header, "sae_activation": "gelu"}, loaded, "metadata.sae_activation"),
        (header, {**loaded, "W_dec": loaded["W_dec"][:, :512]}, "tensors.W_dec"),
        (header, {**loaded, "W_enc": loaded["W_enc"][:512]}, "tensors.W_enc"),
        (header, {**loaded, "b_enc": loaded["b_enc"].clone().fill_(float("nan"))}, "tensors.b_enc"),
        (header, {k: v for k, v in loaded.items() if k != "threshold"}, "tensors.threshold"),
        ({**header, "sae_labels": '{"999": "far"}'}, loaded, "metadata.sae_labels"),
    ]
    for h, t, field in cases:
        with pytest.raises(SteerError) as info:
            check_sae(model, h, t)
        assert info.value.field == field, (field, str(info.value))
    assert isinstance(check_sae(model, header, loaded), Sae)


def _gen(client: httpx.Client, steering: dict[str, Any] | None) -> httpx.Response:
    return client.post("/generate", json={"messages": [{"role": "user", "content": "Tell me about your day."}],
                                          "max_tokens": 12, "temperature": 0, "steering": steering})


def test_a_feature_steers_exactly_as_its_decoder_row(client: httpx.Client, admin_headers: dict[str, str],
                                                     tmp_path: Path, service: Service) -> None:
    """Uploaded over HTTP (multipart), a SAELens dictionary steers by feature: strength s on feature i is
    bit-identical to ``add`` of ``W_dec[i]`` at the dictionary's layer with coeff s, strength 0 is the
    unsteered text, and a bad request names its field."""
    data = sae_bytes(saelens_dir(tmp_path), None, service.info, labels={0: "always on", 3: "the third"})
    r = client.post("/admin/vectors", headers=admin_headers, files=[("name", (None, "sae-test")),
                                                                    ("file", ("sae.safetensors", data))])
    assert r.status_code == 201, r.text
    assert (r.json()["kind"], r.json()["layers"]) == ("sae", [LAYER])
    row = _weights(1)["W_dec"][3]
    r = client.post("/admin/vectors", headers=admin_headers,
                    json={"name": "sae-row-3", "vectors": {str(LAYER): row.tolist()}})
    assert r.status_code == 201, r.text
    plain = _gen(client, None).json()["text"]
    by_feature = _gen(client, {"interventions": [{"method": "sae_feature", "sae": "sae-test", "features": {"3": 60}}]})
    by_row = _gen(client, {"interventions": [{"method": "add", "vector": "sae-row-3", "coeff": 60}]})
    assert by_feature.status_code == 200, by_feature.text
    assert by_feature.json()["text"] == by_row.json()["text"] != plain
    applied = by_feature.json()["steering"]["applied"][0]
    assert applied["artifacts"] == ["sae-test@1"] and applied["detail"]["features"] == {"3": 60.0}
    zero = _gen(client, {"interventions": [{"method": "sae_feature", "sae": "sae-test", "features": {"3": 0}}]})
    assert zero.json()["text"] == plain
    for iv, field in (({"features": {"3": 1}, "mode": "set"}, "mode"),
                      ({"features": {str(i): 1 for i in range(5)}, "mode": "clamp"}, "features"),
                      ({"features": {str(D_SAE): 1}}, f"features.{D_SAE}"),
                      ({"features": {"3": 1e9}}, "features.3"), ({"features": {}}, "features")):
        r = _gen(client, {"interventions": [{"method": "sae_feature", "sae": "sae-test", **iv}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == f"steering.interventions.0.{field}", r.text


def test_sae_import_cli(service: Service, tmp_path: Path) -> None:
    root = tmp_path / "store"
    model = str(prepare_default_model(models_dir()))
    for i, folder in enumerate((saelens_dir(tmp_path), sparsify_dir(tmp_path))):
        args = build_parser().parse_args(["sae", "import", str(folder), "--name", f"imported-{i}", "--store",
                                          str(root), "--model", model])
        assert args.func(args) == 0
    store = ArtifactStore(root / service.info.fingerprint, service.info)
    try:
        got = {m.ref(): (m.kind, m.layers) for m in store.list("sae")}
        assert got == {"imported-0@1": ("sae", (LAYER,)), "imported-1@1": ("sae", (LAYER,))}
        assert store.open_sae("imported-1").d_sae == D_SAE
        assert torch.equal(store.open_sae("imported-1").rows([2, 7]), _weights(2)["W_dec"][[2, 7]])
    finally:
        store.close()


def test_features_lists_the_active_features_per_token(client: httpx.Client, admin_headers: dict[str, str],
                                                      tmp_path: Path, service: Service) -> None:
    """``POST /features`` on the dictionary uploaded above (``sae-test``): every prompt token, at most
    ``top_k`` features each, most active first and all above 0, labels where the dictionary has them;
    feature 0 (encoder row 0, bias 5) reads exactly 5 at every token and feature 1 (bias -1) never fires."""
    if not any(m["ref"] == "sae-test@1" for m in client.get("/admin/vectors", headers=admin_headers).json()["data"]):
        test_a_feature_steers_exactly_as_its_decoder_row(client, admin_headers, tmp_path, service)
    chat = [{"role": "user", "content": "Hello there."}]
    prompt = service.render(messages=chat)
    for top_k in (2, D_SAE):
        r = client.post("/features", json={"messages": chat, "sae": "sae-test", "top_k": top_k})
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["sae"], out["layer"], out["d_sae"]) == ("sae-test@1", LAYER, D_SAE)
        assert [t["position"] for t in out["tokens"]] == list(range(len(prompt.token_ids)))
        for t in out["tokens"]:
            acts = [f["activation"] for f in t["features"]]
            assert 1 <= len(acts) <= top_k and acts == sorted(acts, reverse=True) and min(acts) > 0
            by_id = {f["id"]: f for f in t["features"]}
            assert 1 not in by_id
            if top_k == D_SAE:  # every active feature is listed
                assert by_id[0]["activation"] == 5.0 and by_id[0]["label"] == "always on"
    for body, field in (({"prompt": "Hi", "sae": "nope"}, "sae"), ({"prompt": "Hi", "sae": "sae-test", "top_k": 65},
                                                                    "top_k")):
        r = client.post("/features", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def _upload(client: httpx.Client, admin_headers: dict[str, str], name: str, data: bytes) -> None:
    r = client.post("/admin/vectors", headers=admin_headers, files=[("name", (None, name)),
                                                                    ("file", ("sae.safetensors", data))])
    assert r.status_code == 201, r.text


def _sae(name: str, features: dict[str, float], mode: str = "clamp", **kw: Any) -> dict[str, Any]:
    return {"interventions": [{"method": "sae_feature", "sae": name, "features": features, "mode": mode, **kw}]}


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_clamp_sets_a_feature_through_the_serving_engine(fmt: str, client: httpx.Client, admin_headers: dict[str, str],
                                                         tmp_path: Path, service: Service) -> None:
    """A SAELens (JumpReLU on ``x``) and a sparsify (TopK on ``x - b_dec``) dictionary, uploaded over HTTP, clamp
    on the serving engine. Feature 0 reads exactly 5 at every token (encoder column 0, bias 5), so: clamping it
    to 5 is the unsteered text; clamping it to 45 is ``add`` of its decoder row at 40, token for token; a
    clamp of a real feature (3) to 30 changes the text, and with feature 0 beside it too."""
    name = f"sae-clamp-{fmt}"
    folder = saelens_dir(tmp_path) if fmt == "saelens" else sparsify_dir(tmp_path)
    _upload(client, admin_headers, name, sae_bytes(folder, None, service.info))
    plain = _gen(client, None).json()["text"]
    same = _gen(client, _sae(name, {"0": 5.0}))
    assert same.status_code == 200, same.text
    assert same.json()["text"] == plain
    clamped = _gen(client, _sae(name, {"0": 45.0})).json()["text"]
    added = _gen(client, _sae(name, {"0": 40.0}, mode="add")).json()["text"]
    assert clamped == added != plain
    three = _gen(client, _sae(name, {"3": 30.0})).json()
    assert three["text"] != plain and three["steering"]["applied"][0]["detail"]["mode"] == "clamp"
    both = _gen(client, _sae(name, {"3": 30.0, "0": 5.0})).json()["text"]
    assert both == three["text"]  # feature 0 held at its own value adds exactly nothing beside feature 3


def test_features_of_a_steered_reply(client: httpx.Client, admin_headers: dict[str, str], tmp_path: Path,
                                     service: Service) -> None:
    """``POST /features`` with steering and ``max_tokens``: the greedy reply is the one /generate gives, its
    tokens are marked, and each listed feature carries its unsteered activation: feature 3, clamped to 30,
    reads ``a + (30 - a) * (enc . dec)`` = ``15 + a / 2`` here (``enc = dec / 2``, unit decoder rows), above
    its unsteered ``a`` at every token; a closed loop cannot be replayed (400 naming steering)."""
    name = "sae-clamp-saelens"
    if not any(m["ref"] == f"{name}@1" for m in client.get("/admin/vectors", headers=admin_headers).json()["data"]):
        _upload(client, admin_headers, name, sae_bytes(saelens_dir(tmp_path), None, service.info))
    chat = [{"role": "user", "content": "Tell me about your day."}]
    steering = _sae(name, {"3": 30.0})
    r = client.post("/features", json={"messages": chat, "sae": name, "top_k": D_SAE, "steering": steering,
                                       "max_tokens": 12})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["text"] == _gen(client, steering).json()["text"]
    assert out["steering"]["applied"][0]["detail"]["features"] == {"3": 30.0}
    n_prompt = len(service.render(messages=chat).token_ids)
    assert [t["reply"] for t in out["tokens"]] == [i >= n_prompt for i in range(len(out["tokens"]))]
    assert len(out["tokens"]) > n_prompt
    listed = [f for t in out["tokens"] for f in t["features"] if f["id"] == 3]
    assert len(listed) >= len(out["tokens"]) / 2  # (a token whose pre-activation sits far below stays off)
    for f3 in listed:
        assert f3["activation"] > f3["unsteered"]
        if f3["unsteered"] > 0:  # it fired unsteered: pre' = pre + (30 - pre) / 2, exactly
            assert f3["activation"] == pytest.approx(15 + f3["unsteered"] / 2, abs=1e-3)
    plain = client.post("/features", json={"messages": chat, "sae": name, "top_k": 4}).json()
    assert "text" not in plain and all("unsteered" not in f for t in plain["tokens"] for f in t["features"])
    loop = {"interventions": [{"method": "entropic", "vector": "sae-row-3", "target_entropy": 2.0}]}
    if client.get("/admin/vectors/sae-row-3", headers=admin_headers).status_code == 200:
        r = client.post("/features", json={"messages": chat, "sae": name, "steering": loop, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "steering", r.text


def test_a_policy_caps_and_forbids_features(client: httpx.Client, admin_headers: dict[str, str], tmp_path: Path,
                                            service: Service, make_key: Callable[..., str]) -> None:
    """A key whose policy allows only ``sae_feature``, capped at 10: a clamp or add over the cap is a 403 naming
    the feature, on /generate and on /features with steering; within it, 200; another method, 403."""
    name = "sae-clamp-saelens"
    if not any(m["ref"] == f"{name}@1" for m in client.get("/admin/vectors", headers=admin_headers).json()["data"]):
        _upload(client, admin_headers, name, sae_bytes(saelens_dir(tmp_path), None, service.info))
    bound = make_key("sae-capped", allowed_methods=["sae_feature"], method_caps={"sae_feature": 10})
    key = {"Authorization": f"Bearer {bound}"}
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    for mode in ("clamp", "add"):
        r = client.post("/generate", headers=key, json={**body, "steering": _sae(name, {"0": 5, "3": 20}, mode)})
        assert r.status_code == 403 and r.json()["error"]["param"] == "steering.interventions.0.features.3", r.text
        r = client.post("/generate", headers=key, json={**body, "steering": _sae(name, {"3": 9.5}, mode)})
        assert r.status_code == 200, r.text
    r = client.post("/features", headers=key, json={"prompt": "Hi", "sae": name, "max_tokens": 2,
                                                    "steering": _sae(name, {"3": 20})})
    assert r.status_code == 403 and r.json()["error"]["param"] == "steering.interventions.0.features.3", r.text
    plain_add = {"interventions": [{"method": "add", "vector": name, "coeff": 1}]}
    r = client.post("/generate", headers=key, json={**body, "steering": plain_add})
    assert r.status_code == 403 and r.json()["error"]["param"] == "steering.interventions.0.method", r.text
