"""Vector formats: llama.cpp / repeng GGUF control vectors and self-describing safetensors, in and out of the
store (``store.formats``, ``store.gguf_io``), through ``steerserve vectors import|export`` and ``POST
/admin/vectors``, on the real default model."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest
import safetensors.torch
import torch

from steerserve.cli import build_parser
from steerserve.errors import SteerError
from steerserve.model import model_info, prepare_default_model
from steerserve.model_info import LAYER_CONVENTION, ModelInfo
from steerserve.service import Service
from steerserve.store.artifacts import ArtifactStore
from steerserve.store.db import header_metadata
from steerserve.store.formats import HOOK_SITE, SCALE_SEMANTICS, export_bytes
from tests.paths import models_dir

SELF_DESCRIBING = {"kind", "model_fingerprint", "model_name", "model_architecture", "hidden_size", "num_layers",
                   "layer_convention", "hook_site", "method", "dtype", "scale_semantics"}
STORY = [{"role": "user", "content": "Tell me a short story about a dog."}]


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return model_info(prepare_default_model(models_dir()))


@pytest.fixture
def store(tmp_path: Path, info: ModelInfo) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store", info)


def random_vectors(layers: list[int], seed: int, norm: float = 3.0, hidden: int = 576) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        v = torch.randn(hidden, generator=g)
        out[layer] = v / v.norm() * norm
    return out


def repeng_gguf(path: Path, directions: Mapping[int, torch.Tensor], hint: str = "llama",
                arch: str = "controlvector", extra: Mapping[str, str] | None = None) -> bytes:
    """A control vector written with the ``gguf`` library the way repeng's ``export_gguf`` writes one."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", hint)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    for layer, v in directions.items():
        writer.add_tensor(f"direction.{layer}", v.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def stored_file(store: ArtifactStore, ref: str) -> tuple[str, dict[str, str], dict[int, torch.Tensor]]:
    meta, data = store.file_bytes(ref)
    tensors = {int(k.split(".", 1)[1]): t for k, t in safetensors.torch.load(data).items()}
    return meta.kind, header_metadata(data), tensors


def gguf_fields(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def test_round_trip_through_gguf_is_exact(store: ArtifactStore, info: ModelInfo, tmp_path: Path) -> None:
    vecs = random_vectors([1, 5, 29], seed=1)
    store.put_vector("orig", vecs, method="mean_diff")
    kind, header, tensors = stored_file(store, "orig")
    data = export_bytes(info, kind, header, tensors, "gguf")
    (tmp_path / "orig.gguf").write_bytes(data)
    fields, raw = gguf_fields(tmp_path / "orig.gguf")
    # What llama.cpp and repeng read: the architecture, the hint, the count and direction.<L> as F32 [n_embd].
    assert fields["general.architecture"] == "controlvector" and fields["controlvector.model_hint"] == "llama"
    assert fields["controlvector.layer_count"] == 3 and sorted(raw) == ["direction.1", "direction.29", "direction.5"]
    assert all(a.dtype == np.float32 and a.shape == (576,) for a in raw.values())
    assert {k.removeprefix("steerserve.") for k in fields if k.startswith("steerserve.")} >= SELF_DESCRIBING
    assert fields["steerserve.model_fingerprint"] == info.fingerprint and fields["steerserve.method"] == "mean_diff"

    meta = store.put_vector_file("back", data)
    assert meta.layers == (1, 5, 29) and meta.provenance["imported_from"]["format"] == "gguf control vector"
    back = store.load_vector("back").tensors
    assert all(torch.equal(back[k], vecs[k]) for k in vecs)  # bit-equal, same layers
    assert set(back) == set(vecs)


def test_float16_vector_round_trips_with_its_dtype(store: ArtifactStore, info: ModelInfo) -> None:
    half = {k: v.half() for k, v in random_vectors([2, 3], seed=2).items()}
    store.put_vector_file("half", safetensors.torch.save({f"layer.{k}": v for k, v in half.items()}))
    data = export_bytes(info, *stored_file(store, "half"), "gguf")
    store.put_vector_file("half-back", data)
    _, header, tensors = stored_file(store, "half-back")
    assert header["dtype"] == "float16"
    assert all(t.dtype == torch.float16 and torch.equal(t, half[k]) for k, t in tensors.items())


def test_repeng_file_maps_direction_l_to_layer_l(store: ArtifactStore, tmp_path: Path) -> None:
    # repeng trains direction L on hidden_states[L + 1] and llama.cpp adds it after block L: our layer L.
    dirs = random_vectors([0, 7, 12, 28], seed=3, norm=1.0)
    meta = store.put_vector_file("repeng", repeng_gguf(tmp_path / "r.gguf", dirs))
    assert meta.kind == "vector" and meta.layers == (0, 7, 12, 28)
    got = store.load_vector("repeng")
    assert all(torch.equal(got.tensors[k], dirs[k]) for k in dirs)
    assert got.header["layer_convention"] == LAYER_CONVENTION and got.header["hook_site"] == HOOK_SITE
    assert got.header["method"] == "gguf" and got.header["scale_semantics"] == SCALE_SEMANTICS["vector"]
    imported = meta.provenance["imported_from"]
    assert imported["model_hint"] == "llama" and imported["layer_count"] == 4


def _bad(tmp_path: Path, info: ModelInfo, case: str) -> bytes:
    good = random_vectors([4, 9], seed=4)
    path = tmp_path / f"{case}.gguf"
    if case == "truncated":
        return repeng_gguf(path, good)[:-100]
    if case == "header-only":
        return repeng_gguf(path, good)[:60]
    if case == "arch":
        return repeng_gguf(path, good, arch="llama")
    if case == "hidden":
        return repeng_gguf(path, random_vectors([4, 9], seed=4, hidden=768))
    if case == "layer":
        return repeng_gguf(path, random_vectors([30], seed=4))
    if case == "name":
        writer = gguf.GGUFWriter(path, "controlvector")
        writer.add_tensor("direction.x", good[4].numpy())
    elif case == "shape":
        writer = gguf.GGUFWriter(path, "controlvector")
        writer.add_tensor("direction.4", np.zeros((2, 288), np.float32) + 1)
    else:
        extra = {"fingerprint": {"steerserve.model_fingerprint": "0123456789abcdef"},
                 "hook": {"steerserve.hook_site": "attention output"},
                 "unknown": {"steerserve.colour": "blue"}}[case]
        return repeng_gguf(path, good, extra=extra)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


BAD = [("truncated", "file", "not a valid GGUF"), ("header-only", "file", "not a valid GGUF"),
       ("arch", "metadata.general.architecture", "'llama'"), ("hidden", "hidden_size", "768"),
       ("layer", "tensors.direction.30", "outside"), ("name", "tensors.direction.x", "direction.<L>"),
       ("shape", "tensors.direction.4", "1-D"), ("fingerprint", "model_fingerprint", "0123456789abcdef"),
       ("hook", "metadata.hook_site", "attention output"), ("unknown", "metadata.colour", "unknown metadata key")]


@pytest.mark.parametrize(("case", "field", "needle"), BAD)
def test_bad_gguf_is_refused_naming_the_field(store: ArtifactStore, info: ModelInfo, tmp_path: Path, case: str,
                                              field: str, needle: str) -> None:
    with pytest.raises(SteerError) as caught:
        store.put_vector_file("bad", _bad(tmp_path, info, case))
    assert caught.value.status == 400 and caught.value.field == field and needle in caught.value.message
    assert store.list() == []


def test_export_writes_both_formats_with_metadata(store: ArtifactStore, info: ModelInfo) -> None:
    vecs = random_vectors([0, 3], seed=5)
    store.put_vector("both", vecs)
    kind, header, tensors = stored_file(store, "both")
    st = export_bytes(info, kind, header, tensors, "safetensors")
    assert set(header_metadata(st)) >= SELF_DESCRIBING and header_metadata(st)["dtype"] == "float32"
    assert store.put_vector_file("both-st", st).layers == (0, 3)  # what we export, we import
    with pytest.raises(SteerError) as caught:  # llama.cpp refuses a control vector holding direction.0
        export_bytes(info, kind, header, tensors, "gguf")
    assert caught.value.field == "layers"
    dropped = export_bytes(info, kind, header, tensors, "gguf", drop_layer_0=True)
    assert store.put_vector_file("both-gguf", dropped).layers == (3,)


def _cli(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    result: int = args.func(args)
    return result


def test_cli_import_and_export(service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Offline, on a store of its own (the live server's norm record copied: no second model load)."""
    root = tmp_path / "store"
    (root / service.info.fingerprint).mkdir(parents=True)
    shutil.copy(service.store.root / "activation_norms.json", root / service.info.fingerprint)
    model = str(prepare_default_model(models_dir()))
    common = ("--store", str(root), "--model", model)
    dirs = random_vectors([6, 11], seed=6)
    src = tmp_path / "happy.gguf"
    repeng_gguf(src, dirs)
    assert _cli("vectors", "import", str(src), *common) == 0
    assert "imported happy@1" in capsys.readouterr().out
    out_g, out_s = tmp_path / "out.gguf", tmp_path / "out.safetensors"
    assert _cli("vectors", "export", "happy", "--out", str(out_g), *common) == 0
    assert _cli("vectors", "export", "happy@1", "--out", str(out_s), *common) == 0
    fields, raw = gguf_fields(out_g)
    assert sorted(raw) == ["direction.11", "direction.6"] and all(np.array_equal(raw[f"direction.{k}"], v.numpy())
                                                                     for k, v in dirs.items())
    assert fields["steerserve.model_fingerprint"] == service.info.fingerprint
    meta = header_metadata(out_s.read_bytes())
    assert set(meta) >= SELF_DESCRIBING and meta["method"] == "gguf"
    loaded = safetensors.torch.load(out_s.read_bytes())
    assert all(torch.equal(loaded[f"layer.{k}"], v) for k, v in dirs.items())
    assert _cli("vectors", "import", str(out_g), "--name", "happy", *common) == 0  # the export imports again
    assert "imported happy@2" in capsys.readouterr().out
    too_big = tmp_path / "loud.gguf"  # the norm policy applies offline too
    repeng_gguf(too_big, random_vectors([6], seed=7, norm=1e5))
    assert _cli("vectors", "import", str(too_big), *common) == 2
    assert "tensors.direction.6" in capsys.readouterr().err
    assert _cli("vectors", "export", "happy", "--out", str(tmp_path / "x.txt"), *common) == 2


def _generate(client: httpx.Client, vector: str | None, coeff: float = 4.0) -> str:
    steering = {"interventions": [{"method": "add", "vector": vector, "coeff": coeff}]} if vector else None
    r = client.post("/generate", json={"messages": STORY, "temperature": 0, "max_tokens": 12, "steering": steering})
    assert r.status_code == 200, r.text
    text: str = r.json()["text"]
    return text


def test_gguf_upload_steers_like_the_safetensors_upload(client: httpx.Client, admin_headers: dict[str, str],
                                                        service: Service, tmp_path: Path) -> None:
    norms = service.store.policy.typical_norms
    assert norms is not None
    # Strong enough to fail the KL vetting (~6 nats at coeff 1 against the budget of 4): refused like a file.
    loud = {k: v * norms[k] for k, v in random_vectors([8, 9, 10], seed=8, norm=0.5).items()}
    loud_file = repeng_gguf(tmp_path / "loud.gguf", loud)
    r = client.post("/admin/vectors", headers=admin_headers, data={"name": "fmt-loud-kl"},
                    files={"file": ("loud.gguf", loud_file, "application/octet-stream")})
    assert r.status_code == 422 and r.json()["error"]["code"] == "vetting_failed", r.text
    dirs = {k: v / 5 for k, v in loud.items()}
    data = repeng_gguf(tmp_path / "steer.gguf", dirs)
    r = client.post("/admin/vectors", headers=admin_headers, data={"name": "fmt-gguf"},
                    files={"file": ("steer.gguf", data, "application/octet-stream")})
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["layers"] == [8, 9, 10] and meta["provenance"]["imported_from"]["format"] == "gguf control vector"
    assert meta["provenance"]["vetting"]["kl"] > 0  # the KL vetting ran on it
    st = safetensors.torch.save({f"layer.{k}": v for k, v in dirs.items()})
    r = client.post("/admin/vectors", headers=admin_headers, data={"name": "fmt-st"},
                    files={"file": ("steer.safetensors", st, "application/octet-stream")})
    assert r.status_code == 201, r.text
    plain = _generate(client, None)
    steered = _generate(client, "fmt-gguf")
    assert steered != plain and steered == _generate(client, "fmt-st")
    raw = client.post("/admin/vectors", params={"name": "fmt-raw"}, content=data,
                      headers={**admin_headers, "Content-Type": "application/octet-stream"})
    assert raw.status_code == 201 and _generate(client, "fmt-raw") == steered


@pytest.mark.parametrize(("case", "field", "needle"), [BAD[0], BAD[3], BAD[7]])
def test_bad_gguf_upload_is_a_400(client: httpx.Client, admin_headers: dict[str, str], info: ModelInfo,
                                  tmp_path: Path, case: str, field: str, needle: str) -> None:
    r = client.post("/admin/vectors", headers=admin_headers, data={"name": f"fmt-bad-{case}"},
                    files={"file": ("bad.gguf", _bad(tmp_path, info, case), "application/octet-stream")})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and needle in err["message"]
    assert client.get(f"/admin/vectors/fmt-bad-{case}", headers=admin_headers).status_code == 404


def test_gguf_upload_gets_the_norm_policy(client: httpx.Client, admin_headers: dict[str, str],
                                          tmp_path: Path) -> None:
    data = repeng_gguf(tmp_path / "loud.gguf", random_vectors([5], seed=9, norm=1e5))
    r = client.post("/admin/vectors", headers=admin_headers, data={"name": "fmt-loud"},
                    files={"file": ("loud.gguf", data, "application/octet-stream")})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "tensors.direction.5" and "exceeds" in err["message"]


def test_direction_round_trips_through_gguf_with_its_scale(store: ArtifactStore, info: ModelInfo) -> None:
    from steerserve.store.directions import direction_header

    unit = random_vectors([12], seed=10, norm=1.0)
    header = direction_header(info, 12, 87.5, "prompt", [{"layer": 12, "score": 0.5}])
    store.put_vector_file("dir", safetensors.torch.save({"layer.12": unit[12]}, metadata=header))
    data = export_bytes(info, *stored_file(store, "dir"), "gguf")
    meta = store.put_vector_file("dir-back", data)
    back = store.load_vector("dir-back", kinds=("direction",))
    assert meta.kind == "direction" and back.scale() == 87.5 and torch.equal(back.tensors[12], unit[12])
    assert back.header["scale_semantics"] == SCALE_SEMANTICS["direction"]
