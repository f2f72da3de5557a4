"""The artifact store: versions, validation against the model, enable/delete, crash safety, concurrency."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from steerserve.errors import NotFound, SteerError
from steerserve.model_info import LAYER_CONVENTION, ModelInfo
from steerserve.store import ArtifactStore, StoredPair, StoredVector
from steerserve.store import db as store_db

MODEL = ModelInfo(name="tiny", architecture="LlamaForCausalLM", num_layers=4, hidden_size=8, vocab_size=100,
                  max_model_len=128, dtype="float32", fingerprint="fp-1")
OTHER = ModelInfo(name="tiny", architecture="LlamaForCausalLM", num_layers=4, hidden_size=8, vocab_size=100,
                  max_model_len=128, dtype="float32", fingerprint="fp-2")


def vecs(seed: int = 0, layers: tuple[int, ...] = (0, 1, 2, 3)) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(8, generator=g) for layer in layers}


def files(root: Path) -> list[str]:
    """Every file under the artifacts folder, hidden ones included, relative to it."""
    base = root / "artifacts"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArtifactStore]:
    s = ArtifactStore(tmp_path, MODEL)
    yield s
    s.close()


def check(exc: pytest.ExceptionInfo[SteerError], field: str | None, code: str = "invalid",
          status: int = 400) -> None:
    """The error names the expected field, with the expected code and HTTP status."""
    assert (exc.value.field, exc.value.code, exc.value.status) == (field, code, status), str(exc.value)


# ---- versions and round trips --------------------------------------------------------------------------


def test_versions_latest_and_exact_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    v1, v2 = vecs(1), vecs(2, layers=(1, 3))
    m1 = store.put_vector("happy", v1, method="mean_diff", provenance={"prompts": 10}, description="first")
    m2 = store.put_vector("happy", v2)
    assert (m1.ref(), m2.ref()) == ("happy@1", "happy@2")
    assert store.get("happy").version == 2
    assert store.get("happy@1") == m1
    loaded1, loaded2 = store.load_vector("happy@1"), store.load_vector("happy")
    assert isinstance(loaded1, StoredVector)
    assert sorted(loaded1.tensors) == [0, 1, 2, 3] and sorted(loaded2.tensors) == [1, 3]
    assert all(torch.equal(loaded1.tensors[i], v1[i]) for i in v1)
    assert all(torch.equal(loaded2.tensors[i], v2[i]) for i in v2)
    assert all(t.dtype == torch.float32 for t in loaded1.tensors.values())
    # The manifest row describes the artifact faithfully.
    assert m1.layers == (0, 1, 2, 3) and m2.layers == (1, 3)
    assert m1.norms == pytest.approx({i: float(v1[i].norm()) for i in v1})
    assert (m1.method, m1.provenance, m1.description) == ("mean_diff", {"prompts": 10}, "first")
    assert (m1.model_fingerprint, m1.hidden_size, m1.num_layers) == ("fp-1", 8, 4)
    assert m1.layer_convention == LAYER_CONVENTION and m1.enabled and m1.created.endswith("+00:00")
    data = (tmp_path / "artifacts" / "happy" / "1.safetensors").read_bytes()
    assert m1.sha256 == hashlib.sha256(data).hexdigest()
    d = json.loads(json.dumps(m1.to_dict()))
    assert d["ref"] == "happy@1" and d["layers"] == [0, 1, 2, 3] and set(d["norms"]) == {"0", "1", "2", "3"}


def test_other_dtypes_are_stored_as_float32(store: ArtifactStore) -> None:
    v = {0: torch.arange(1, 9, dtype=torch.float64)}
    loaded = store.load_vector(store.put_vector("f64", v).ref()).tensors[0]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, v[0].float())


def test_list_is_sorted_and_filtered_by_kind(store: ArtifactStore) -> None:
    store.put_vector("b", vecs(1))
    store.put_pair("a", "love", "hate")
    store.put_vector("b", vecs(2))
    store.put_vector("a.2", vecs(3))
    assert [m.ref() for m in store.list()] == ["a@1", "a.2@1", "b@1", "b@2"]
    assert [m.ref() for m in store.list("vector")] == ["a.2@1", "b@1", "b@2"]
    assert [m.ref() for m in store.list("pair")] == ["a@1"]
    with pytest.raises(SteerError) as e:
        store.list("blob")
    check(e, "kind")


def test_pair_round_trip_and_validation(store: ArtifactStore) -> None:
    meta = store.put_pair("love", "Love ünïcode", "Hate", layer=2, coeff=0.1 + 0.2)
    pair = store.load_pair("love", field="steering.interventions.0.pair")
    assert isinstance(pair, StoredPair)
    assert (pair.positive, pair.negative, pair.layer, pair.coeff) == ("Love ünïcode", "Hate", 2, 0.1 + 0.2)
    assert meta.kind == "pair" and meta.layers == () and meta.norms == {}
    bare = store.load_pair(store.put_pair("love", "a", "b").ref())
    assert (bare.layer, bare.coeff) == (None, None)
    bad: list[tuple[dict[str, float], str]] = [({"layer": 4}, "layer"), ({"layer": -1}, "layer"),
                                               ({"coeff": float("nan")}, "coeff")]
    for kwargs, field in bad:
        with pytest.raises(SteerError) as e:
            store.put_pair("love", "a", "b", **kwargs)  # type: ignore[arg-type]
        check(e, field)
    with pytest.raises(SteerError) as e:
        store.put_pair("love", "  ", "b")
    check(e, "positive")


# ---- references and lookups ----------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["x@0", "x@abc", "x@", "@1", "", "x@-1", "x@01", "bad name", "x\n"])
def test_bad_refs_name_the_callers_field(store: ArtifactStore, ref: str) -> None:
    with pytest.raises(SteerError) as e:
        store.load_vector(ref, field="steering.interventions.0.vector")
    check(e, "steering.interventions.0.vector")


def test_unknown_and_wrong_kind_are_400s_naming_the_field(store: ArtifactStore) -> None:
    store.put_vector("v", vecs())
    store.put_pair("p", "a", "b")
    with pytest.raises(SteerError) as e:
        store.load_vector("nope", field="f")
    check(e, "f", "unknown_artifact")
    assert "unknown vector 'nope'" in str(e.value)
    with pytest.raises(SteerError) as e:
        store.load_vector("v@2", field="f")
    check(e, "f", "unknown_artifact")
    assert "latest is v@1" in str(e.value)
    with pytest.raises(SteerError) as e:
        store.load_vector("p", field="f")
    check(e, "f", "wrong_kind")
    with pytest.raises(SteerError) as e:
        store.load_pair("v", field="g")
    check(e, "g", "wrong_kind")


@pytest.mark.parametrize("name", ["", "-x", ".x", "a/b", "a b", "x" * 65, "ü"])
def test_bad_names(store: ArtifactStore, name: str) -> None:
    with pytest.raises(SteerError) as e:
        store.put_vector(name, vecs())
    check(e, "name")
    assert store.list() == []


# ---- validation against the model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "kwargs", "field", "needle"),
    [
        ({0: torch.ones(8), 1: torch.ones(768)}, {}, "tensors.layer.1", "hidden size 768 does not match"),
        ({4: torch.ones(8)}, {}, "tensors.layer.4", "outside"),
        ({-1: torch.ones(8)}, {}, "tensors.layer.-1", "outside"),
        ({0: torch.tensor([1.0] * 7 + [float("nan")])}, {}, "tensors.layer.0", "NaN"),
        ({0: torch.tensor([1.0] * 7 + [float("inf")])}, {}, "tensors.layer.0", "NaN or infinite"),
        ({0: torch.full((8,), 1e300, dtype=torch.float64)}, {}, "tensors.layer.0", "infinite"),
        ({0: torch.ones(2, 4)}, {}, "tensors.layer.0", "1-D"),
        ({0: torch.ones(8, dtype=torch.int64)}, {}, "tensors.layer.0", "floating"),
        ({0: torch.zeros(8), 1: torch.zeros(8)}, {}, "tensors.layer.0", "all zeros"),
        ({0: torch.ones(8), 1: torch.zeros(8)}, {}, "tensors.layer.1", "all zeros"),  # one zero layer is enough
        ({}, {}, "tensors", "at least one"),
        ({0: torch.ones(8)}, {"hidden_size": 768}, "hidden_size",
         "hidden size 768 does not match the loaded model's 8"),
        ({0: torch.ones(8)}, {"num_layers": 30}, "num_layers", "layer count 30 does not match"),
    ],
)
def test_put_vector_rejects(store: ArtifactStore, tensors: dict[int, torch.Tensor], kwargs: dict[str, int],
                            field: str, needle: str) -> None:
    with pytest.raises(SteerError) as e:
        store.put_vector("v", tensors, **kwargs)  # type: ignore[arg-type]
    check(e, field)
    assert needle in str(e.value)
    assert store.list() == []


def test_norm_policy_refuses_with_the_figures(store: ArtifactStore) -> None:
    store.set_norm_policy([1.0, 2.0, 3.0, 4.0], 10.0)
    ok = torch.full((8,), 7.0 / 8**0.5)  # norm 7: under 10 x 1
    assert store.put_vector("v", {0: ok, 1: ok * 2}).layers == (0, 1)
    with pytest.raises(SteerError) as e:
        store.put_vector("v", {0: ok, 2: torch.full((8,), 11.0)})  # norm 31.1 > 10 x 3
    check(e, "tensors.layer.2")
    assert "norm 31.11 exceeds 10 x the model's typical activation norm at layer 2 (3), i.e. 30" in str(e.value)
    with pytest.raises(SteerError) as e:
        store.put_vector_file("f", safetensors.torch.save({"layer.3": torch.full((8,), 3e38)}))
    check(e, "tensors.layer.3")
    assert store.list() and len(store.list()) == 1


def test_long_descriptions_are_refused(store: ArtifactStore) -> None:
    with pytest.raises(SteerError) as e:
        store.put_vector("v", vecs(), description="x" * 1025)
    check(e, "description")
    assert store.put_vector("v", vecs(), description="x" * 1024).version == 1


def test_put_vector_file_round_trip(store: ArtifactStore) -> None:
    v = vecs(5, layers=(0, 2))
    declared = {"hidden_size": "8", "num_layers": "4", "model_fingerprint": "fp-1"}
    data = safetensors.torch.save({f"layer.{i}": t for i, t in v.items()}, metadata=declared)
    meta = store.put_vector_file("up", data, description="from disk", provenance={"by": "me"})
    assert (meta.ref(), meta.method, meta.layers, meta.description) == ("up@1", "upload", (0, 2), "from disk")
    assert meta.provenance["by"] == "me" and meta.provenance["file_metadata"]["hidden_size"] == "8"
    loaded = store.load_vector("up")
    assert all(torch.equal(loaded.tensors[i], v[i]) for i in v)
    # A file exported from the store can be uploaded again, as the next version.
    assert meta.sha256 == hashlib.sha256(data).hexdigest()  # stored verbatim: a re-import is recognisable
    again = store.put_vector_file("up", (store.root / "artifacts" / "up" / "1.safetensors").read_bytes())
    assert again.version == 2 and torch.equal(store.load_vector("up@2").tensors[2], v[2])
    # Half precision is accepted and comes back as float32.
    half = store.put_vector_file("half", safetensors.torch.save({"layer.1": torch.ones(8, dtype=torch.float16)}))
    assert store.load_vector(half.ref()).tensors[1].dtype == torch.float32
    # No metadata at all is fine too.
    assert store.put_vector_file("plain", safetensors.torch.save({"layer.3": torch.ones(8)})).layers == (3,)


@pytest.mark.parametrize(
    ("tensors", "metadata", "field"),
    [
        ({"layers.0": torch.ones(8)}, None, "tensors.layers.0"),
        ({"layer.01": torch.ones(8)}, None, "tensors.layer.01"),
        ({"layer.0": torch.ones(8), "bias": torch.ones(8)}, None, "tensors.bias"),
        ({"layer.0": torch.ones(768)}, None, "tensors.layer.0"),
        ({"layer.0": torch.ones(8)}, {"hidden_size": "768"}, "hidden_size"),
        ({"layer.0": torch.ones(8)}, {"hidden_size": "eight"}, "hidden_size"),
        ({"layer.0": torch.ones(8)}, {"num_layers": "30"}, "num_layers"),
        ({"layer.7": torch.ones(8)}, None, "tensors.layer.7"),
        ({"layer.1": torch.tensor([0.0] * 7 + [float("nan")])}, None, "tensors.layer.1"),
        ({"layer.0": torch.ones(8)}, {"model_fingerprint": "fp-other"}, "model_fingerprint"),
        ({"layer.0": torch.ones(8)}, {"layer_convention": "input of block l"}, "metadata.layer_convention"),
        ({"layer.0": torch.ones(8)}, {"kind": "pair"}, "metadata.kind"),
        ({"layer.0": torch.ones(8)}, {"secret": "x"}, "metadata.secret"),
    ],
)
def test_put_vector_file_rejects(store: ArtifactStore, tensors: dict[str, torch.Tensor],
                                 metadata: dict[str, str] | None, field: str) -> None:
    with pytest.raises(SteerError) as e:
        store.put_vector_file("up", safetensors.torch.save(tensors, metadata=metadata))
    check(e, field)
    assert store.list() == []


@pytest.mark.parametrize("data", [b"", b"not safetensors at all", b"\xff" * 8 + b"{}"])
def test_put_vector_file_rejects_garbage(store: ArtifactStore, data: bytes) -> None:
    with pytest.raises(SteerError) as e:
        store.put_vector_file("up", data)
    check(e, "file")


def test_provenance_must_be_json(store: ArtifactStore) -> None:
    with pytest.raises(SteerError) as e:
        store.put_vector("v", vecs(), provenance={"x": object()})
    check(e, "provenance")
    assert store.list() == [] and files(store.root) == []


# ---- enable / disable / delete -------------------------------------------------------------------------


def test_disable_refuses_load_until_enabled(store: ArtifactStore) -> None:
    store.put_vector("v", vecs(1))
    store.put_vector("v", vecs(2))
    changed = store.set_enabled("v", False, version=2)
    assert [(m.ref(), m.enabled) for m in changed] == [("v@2", False)]
    with pytest.raises(SteerError) as e:
        store.load_vector("v", field="steering.interventions.0.vector")
    check(e, "steering.interventions.0.vector", "disabled_artifact")
    assert "vector 'v@2' is disabled" in str(e.value)
    assert store.load_vector("v@1").meta.version == 1  # other versions are untouched
    assert store.load_vector("v", require_enabled=False).meta.version == 2
    assert store.get("v").enabled is False  # get does not require enabled by default
    store.set_enabled("v", False)
    assert [m.enabled for m in store.list()] == [False, False]
    store.set_enabled("v", True)
    assert torch.equal(store.load_vector("v").tensors[0], vecs(2)[0])


def test_delete_one_version_then_all(store: ArtifactStore, tmp_path: Path) -> None:
    for seed in (1, 2, 3):
        store.put_vector("v", vecs(seed))
    deleted = store.delete("v", version=3)
    assert [m.ref() for m in deleted] == ["v@3"]
    assert store.get("v").version == 2
    assert torch.equal(store.load_vector("v").tensors[1], vecs(2)[1])
    assert files(tmp_path) == ["v/1.safetensors", "v/2.safetensors"]
    # Numbers are never reused: "v@3" keeps meaning the deleted bytes, so a new upload is v@4.
    assert store.put_vector("v", vecs(4)).version == 4
    assert [m.ref() for m in store.delete("v")] == ["v@1", "v@2", "v@4"]
    assert store.list() == [] and files(tmp_path) == []
    assert not (tmp_path / "artifacts" / "v").exists()  # no empty folder left behind
    with pytest.raises(SteerError) as e:
        store.load_vector("v", field="f")
    check(e, "f", "unknown_artifact")


def test_admin_operations_on_unknown_artifacts_are_404(store: ArtifactStore) -> None:
    store.put_vector("v", vecs())
    for call in (lambda: store.delete("nope"), lambda: store.set_enabled("nope", False)):
        with pytest.raises(NotFound) as e:
            call()
        check(e, "name", "not_found", 404)
    for call in (lambda: store.delete("v", version=2), lambda: store.set_enabled("v", True, version=2)):
        with pytest.raises(NotFound) as e:
            call()
        check(e, "version", "not_found", 404)
    assert [m.ref() for m in store.list()] == ["v@1"]


# ---- model binding -------------------------------------------------------------------------------------


def test_other_model_lists_but_refuses_to_load(store: ArtifactStore, tmp_path: Path) -> None:
    store.put_vector("v", vecs())
    store.put_pair("p", "a", "b")
    other = ArtifactStore(tmp_path, OTHER)
    try:
        assert [m.ref() for m in other.list()] == ["p@1", "v@1"]
        for load, ref in ((other.load_vector, "v"), (other.load_pair, "p")):
            with pytest.raises(SteerError) as e:
                load(ref, field="steering.interventions.0.x")
            check(e, "steering.interventions.0.x", "model_mismatch")
            assert "fp-1" in str(e.value) and "fp-2" in str(e.value)
        assert other.put_vector("v", vecs()).model_fingerprint == "fp-2"  # new versions are for this model
        assert other.load_vector("v").meta.version == 2
    finally:
        other.close()


def test_corrupt_file_is_detected(store: ArtifactStore, tmp_path: Path) -> None:
    store.put_vector("v", vecs())
    path = tmp_path / "artifacts" / "v" / "1.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SteerError) as e:
        store.load_vector("v", field="f")
    check(e, "f", "corrupt_artifact", 500)


# ---- crash safety --------------------------------------------------------------------------------------


def test_crash_at_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path, MODEL)

    def boom(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        store.put_vector("v", vecs())
    monkeypatch.undo()
    assert store.list() == [] and files(tmp_path) == []
    store.close()
    store = ArtifactStore(tmp_path, MODEL)
    assert store.list() == [] and files(tmp_path) == []
    assert store.put_vector("v", vecs()).version == 1  # the failed write did not use up a version
    store.close()


def test_crash_at_row_insert_removes_the_renamed_file(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path, MODEL)
    seen: list[list[str]] = []

    def boom(conn: object, meta: object) -> None:
        seen.append(files(tmp_path))  # the file is in place at this point: the failure comes after the rename
        raise RuntimeError("killed")

    monkeypatch.setattr(store_db, "insert_row", boom)
    with pytest.raises(RuntimeError, match="killed"):
        store.put_vector("v", vecs())
    monkeypatch.undo()
    assert seen == [["v/1.safetensors"]]
    assert store.list() == [] and files(tmp_path) == []
    store.close()
    store = ArtifactStore(tmp_path, MODEL)
    assert store.list() == [] and files(tmp_path) == []
    assert store.put_vector("v", vecs()).version == 1
    store.close()


def test_leftovers_of_a_crash_are_removed_at_open(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, MODEL)
    store.put_vector("v", vecs())
    store.close()
    folder = tmp_path / "artifacts" / "v"
    (folder / ".tmp-0123abcd").write_bytes(b"half a file")  # killed before the rename
    # Renamed into place, but killed before its row committed:
    (folder / "2.safetensors").write_bytes(safetensors.torch.save({"layer.0": torch.ones(8)}))
    (tmp_path / "artifacts" / "w").mkdir()
    (tmp_path / "artifacts" / "w" / "1.safetensors").write_bytes(b"orphan of a name with no rows")
    store = ArtifactStore(tmp_path, MODEL)
    assert files(tmp_path) == ["v/1.safetensors"]
    assert not (tmp_path / "artifacts" / "w").exists()
    assert [m.ref() for m in store.list()] == ["v@1"]
    assert store.put_vector("v", vecs(2)).version == 2
    assert store.put_vector("w", vecs(3)).version == 1
    assert torch.equal(store.load_vector("v@2").tensors[0], vecs(2)[0])
    store.close()


# ---- concurrency ---------------------------------------------------------------------------------------


def _put_concurrently(stores: list[ArtifactStore], n: int) -> dict[int, int]:
    """n threads (spread over ``stores``) upload "same" at once; returns version -> seed."""
    barrier, out, errors = threading.Barrier(n), {}, []
    lock = threading.Lock()

    def work(seed: int) -> None:
        try:
            barrier.wait()
            meta = stores[seed % len(stores)].put_vector("same", vecs(seed))
            with lock:
                out[meta.version] = seed
        except BaseException as e:  # surfaced below: an exception in a thread would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    return out


def test_concurrent_puts_get_distinct_versions(store: ArtifactStore) -> None:
    got = _put_concurrently([store], 8)
    assert sorted(got) == list(range(1, 9))
    assert [m.version for m in store.list()] == list(range(1, 9))
    for version, seed in got.items():  # each version holds the bytes of the upload that got it
        assert torch.equal(store.load_vector(f"same@{version}").tensors[2], vecs(seed)[2])


def test_concurrent_puts_through_two_store_instances(tmp_path: Path) -> None:
    # Separate instances share no Python lock: only SQLite's write lock (BEGIN IMMEDIATE) orders them,
    # as it would for two server processes.
    stores = [ArtifactStore(tmp_path, MODEL), ArtifactStore(tmp_path, MODEL)]
    try:
        got = _put_concurrently(stores, 8)
        assert sorted(got) == list(range(1, 9))
        assert len(files(tmp_path)) == 8
    finally:
        for s in stores:
            s.close()
