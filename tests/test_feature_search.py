"""``GET /features/search`` (issue 24, the playground's feature picker): a dictionary's features found by
label on the live server, ranked whole word > word start > anywhere; the labels read from the file's header
once per artifact version, never its weights; the errors named; the client keys enforced as on ``/generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from steerserve.errors import SteerError
from steerserve.service import Service
from steerserve.store.sae_labels import LabelIndex
from tests.test_sae import D_SAE, LAYER, saelens_dir

LABELS = {0: "always on", 3: "the third", 5: "dog", 6: "hot dog", 7: "doghouse", 8: "underdog", 9: "Dog",
          10: "dogs and  cats", 11: "cat", 20: "DOG-friendly parks"}
# "dog": the whole label, then a whole word (shorter labels first), then a word's start, then anywhere.
DOG_ORDER = [5, 9, 6, 20, 7, 10, 8]


def _upload(client: httpx.Client, admin_headers: dict[str, str], service: Service, root: Path, name: str,
            labels: dict[int, str] | None) -> None:
    from steerserve.tools.sae.cli import sae_bytes

    data = sae_bytes(saelens_dir(root), None, service.info, labels=labels)
    r = client.post("/admin/vectors", headers=admin_headers, files=[("name", (None, name)),
                                                                    ("file", ("sae.safetensors", data))])
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def saes(client: httpx.Client, admin_headers: dict[str, str], service: Service,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    _upload(client, admin_headers, service, tmp_path_factory.mktemp("sae-l"), "search-sae", LABELS)
    _upload(client, admin_headers, service, tmp_path_factory.mktemp("sae-b"), "search-sae-bare", None)
    yield


def search(client: httpx.Client, headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
    return client.get("/features/search", params=params, headers=headers or {})


def error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["param"] == param, err
    return err


def test_search_ranks_the_labelled_features(client: httpx.Client, saes: None) -> None:
    r = search(client, sae="search-sae", q="dog")
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["sae"], out["layer"], out["d_sae"], out["q"]) == ("search-sae@1", LAYER, D_SAE, "dog")
    assert (out["labelled"], out["total"]) == (len(LABELS), len(DOG_ORDER)) and "note" not in out
    assert [m["feature"] for m in out["matches"]] == DOG_ORDER
    assert all(m["label"] == LABELS[m["feature"]] for m in out["matches"])
    # limit keeps the best; case and runs of spaces do not matter; a pinned version is the same dictionary
    r = search(client, sae="search-sae@1", q="  DOG ", limit=2)
    assert [m["feature"] for m in r.json()["matches"]] == DOG_ORDER[:2] and r.json()["total"] == len(DOG_ORDER)
    r = search(client, sae="search-sae", q="and cats")
    assert [m["feature"] for m in r.json()["matches"]] == [10]
    r = search(client, sae="search-sae", q="zebra")
    assert r.status_code == 200 and (r.json()["matches"], r.json()["total"]) == ([], 0)


def test_a_dictionary_without_labels_answers_a_note(client: httpx.Client, saes: None) -> None:
    r = search(client, sae="search-sae-bare", q="dog")
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["matches"], out["labelled"], out["total"]) == ([], 0, 0)
    assert "no feature labels" in out["note"]


def test_errors_name_the_field(client: httpx.Client, admin_headers: dict[str, str], saes: None,
                               fresh_vector: Any) -> None:
    err = error(search(client, sae="no-such-sae", q="dog"), 404, "sae")
    assert "no-such-sae" in err["message"]
    error(search(client, sae="search-sae@9", q="dog"), 404, "sae")
    fresh_vector("search-not-a-sae")
    error(search(client, sae="search-not-a-sae", q="dog"), 404, "sae")  # a vector: no sae of that name
    for limit in (0, 101, "x", 2.5):
        error(search(client, sae="search-sae", q="dog", limit=limit), 400, "limit")
    for q in ("", "   ", "x" * 201):
        error(search(client, sae="search-sae", q=q), 400, "q")
    error(client.get("/features/search", params={"q": "dog"}), 400, "sae")
    error(client.get("/features/search", params={"sae": "search-sae"}), 400, "q")
    error(search(client, sae="bad name!", q="dog"), 400, "sae")
    r = client.post("/features/search", params={"sae": "search-sae", "q": "dog"})
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) - {"HEAD"} == {"GET"}, r.text
    # a disabled dictionary is refused, as it is for steering and POST /features
    assert client.patch("/admin/vectors/search-sae-bare", headers=admin_headers,
                        json={"enabled": False}).status_code == 200
    try:
        error(search(client, sae="search-sae-bare", q="dog"), 400, "sae")
    finally:
        client.patch("/admin/vectors/search-sae-bare", headers=admin_headers, json={"enabled": True})


def test_keys_are_enforced_as_on_generate(client: httpx.Client, make_key: Callable[..., str], saes: None) -> None:
    bound = make_key("search-any")  # once a key is bound, unknown keys are refused (unknown_keys="auto")
    ok = search(client, {"Authorization": f"Bearer {bound}"}, sae="search-sae", q="dog")
    assert ok.status_code == 200, ok.text
    for authorization in ("Bearer not-a-bound-key-123456", "Basic dGVzdC1rZXk="):
        r = search(client, {"Authorization": authorization}, sae="search-sae", q="dog")
        assert error(r, 401, None)["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    slow = make_key("search-slow", requests_per_minute=1)
    codes = [search(client, {"Authorization": f"Bearer {slow}"}, sae="search-sae", q="dog").status_code
             for _ in range(3)]
    assert codes[0] == 200 and 429 in codes, codes


def test_labels_come_from_the_header_once(client: httpx.Client, service: Service, saes: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No tensor is read: the store's whole-file readers are off and the search still answers; once read,
    a version's labels are not read again."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the search read the dictionary's file")

    for key in [k for k in service.ctx.cache if k.startswith("sae-labels:search-sae@1:")]:
        del service.ctx.cache[key]  # a first read, whatever the tests before did
    for name in ("load_sae", "_read", "file_bytes"):
        monkeypatch.setattr(service.store, name, refuse)
    r = search(client, sae="search-sae", q="third")
    assert r.status_code == 200 and r.json()["matches"] == [{"feature": 3, "label": "the third"}], r.text
    monkeypatch.setattr(service.store, "open_sae", refuse)
    r = search(client, sae="search-sae", q="cat")
    assert r.status_code == 200 and [m["feature"] for m in r.json()["matches"]] == [11, 10], r.text


def test_label_index_checks_its_arguments() -> None:
    index = LabelIndex.of({1: "a b", 2: "ab"})
    assert index.search("a", 5) == ([(1, "a b"), (2, "ab")], 2)
    assert index.search("b", 5) == ([(1, "a b"), (2, "ab")], 2)  # word in 1, inside a word in 2
    cases: list[tuple[str, Any, str]] = [("", 5, "q"), (" \t", 5, "q"), ("a" * 201, 5, "q"), ("a", 0, "limit"),
                                         ("a", 101, "limit"), ("a", True, "limit")]
    for q, limit, field in cases:
        with pytest.raises(SteerError) as info:
            index.search(q, limit)
        assert info.value.field == field


def test_labels_that_name_the_query_more_often_rank_first() -> None:
    """Within a tier, more whole-word hits first: a topic prefix over the feature's own matching tokens beats
    the same prefix over junk tokens, however short."""
    from steerserve.store.sae_labels import LabelIndex

    index = LabelIndex.of({1: "food: '   ', _", 2: "food: food, diet, feast", 3: "seafood", 4: "food"})
    assert index.search("food", 10) == ([(2, "food: food, diet, feast"), (4, "food"), (1, "food: '   ', _"),
                                        (3, "seafood")], 4)
