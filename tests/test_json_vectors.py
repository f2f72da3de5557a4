"""The streamed JSON vector reader (``api.json_vectors``), which the upload route uses for bodies over 1 MiB:
shapes refused at the value where they go wrong, odd documents refused as ``Unexpected``. The 60 MB uploads
over HTTP are in ``test_edge_hardening``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steerserve.api.json_vectors import Unexpected, read_upload
from steerserve.errors import SteerError

H, LAYERS = 6, 4


def _body(vectors: dict[str, object], **extra: object) -> bytes:
    return json.dumps({"name": "v", **extra, "vectors": vectors}).encode()


def test_a_well_formed_upload_reads_into_arrays() -> None:
    got = read_upload(_body({"1": [0.5] * H, "3": list(range(H))}, description="d"), H, LAYERS)
    assert (got.name, got.description, sorted(got.vectors)) == ("v", "d", [1, 3])
    assert np.array_equal(got.vectors[3], np.arange(H, dtype=np.float64))


@pytest.mark.parametrize(("vectors", "field", "message"), [
    ({"2": [1.0] * (H + 5)}, "vectors.2", f"more than {H} values"),
    ({"2": [1.0] * (H - 1)}, "vectors.2", f"has {H - 1} values"),
    ({"4": [1.0] * H}, "vectors.4", "out of range"),
])
def test_a_wrong_shape_is_refused_naming_the_layer(vectors: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(SteerError) as info:
        read_upload(_body(vectors), H, LAYERS)
    assert info.value.field == field and message in str(info.value)


def test_a_repeated_layer_is_refused() -> None:
    raw = b'{"name": "v", "vectors": {"1": [1,1,1,1,1,1], "1": [2,2,2,2,2,2]}}'
    with pytest.raises(SteerError) as info:
        read_upload(raw, H, LAYERS)
    assert info.value.field == "vectors.1"


@pytest.mark.parametrize("raw", [b'{"name": "v", "vectors": {"1": [1, "x"]}}', b'{"name": "v", "extra": 1}',
                                 b'{"name": "v", "vectors": {"01": []}}', b'{"name": "v", "vectors": {"1": [',
                                 b'{"vectors": {"1": [1,1,1,1,1,1]}}', b'{"name": "\\ud800", "vectors": {}}',
                                 b'[1, 2]'])
def test_anything_else_is_unexpected(raw: bytes) -> None:
    with pytest.raises(Unexpected):
        read_upload(raw, H, LAYERS)
