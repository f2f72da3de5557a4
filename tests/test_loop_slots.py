"""Closed-loop requests hold a register slot for exactly their lifetime: over HTTP on the live server, a burst
with random client disconnects leaves no slot behind (``/metrics``), and a full slot table answers 429."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx
import pytest

from steerserve.engines.slots import LoopSlots
from steerserve.errors import SteerError
from steerserve.service import Service
from tests.test_api import engine_stats

LAYER = 15


@pytest.fixture(scope="module")
def loop_vector(client: httpx.Client, service: Service, admin_headers: dict[str, str],
                unit_vectors: Callable[[str, int, int], dict[str, list[float]]]) -> str:
    """A one-layer vector at ``LAYER`` (norm 60, well inside the vetting bound) for ``entropic``."""
    v = [60.0 * x for x in unit_vectors("loop-slots", service.info.num_layers, service.info.hidden_size)[str(LAYER)]]
    r = client.post("/admin/vectors", headers=admin_headers, json={"name": "loopvec", "vectors": {str(LAYER): v}})
    assert r.status_code == 201, r.text
    return "loopvec"


def _body(vector: str, target: float, stream: bool, max_tokens: int = 40) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}], "temperature": 0,
            "max_tokens": max_tokens, "stream": stream,
            "steering": {"interventions": [{"method": "entropic", "vector": vector, "target_entropy": target}]}}


def test_burst_with_disconnects_leaks_no_slot(client: httpx.Client, base_url: str, loop_vector: str) -> None:
    rng = random.Random(7)
    finished: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        hang_up = rng.random() < 0.5
        try:
            with httpx.Client(base_url=base_url, timeout=120) as own, own.stream(
                    "POST", "/generate", json=_body(loop_vector, 0.5 + 0.25 * i, True)) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if hang_up:
                        return  # the client goes away mid-stream
                    if event.get("finish_reason"):
                        finished.append(event)
        except BaseException as exc:  # noqa: BLE001  (reported below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert finished, "every client hung up: the seed should let some finish"
    for event in finished:  # a finished closed-loop request reports what its loop measured
        report = event["steering"]["report"]
        assert report["loop_steps"] >= 1 and -1.0 <= report["final_gain"] <= 1.0
    deadline = time.monotonic() + 20
    while True:
        stats = engine_stats(client)
        if stats.get("loop_slots") == 0 and stats.get("loop_requests") == 0 and stats["running"] == 0:
            break
        assert time.monotonic() < deadline, f"slots not freed: {stats}"
        time.sleep(0.1)
    # and the server keeps serving closed-loop requests
    r = client.post("/generate", json=_body(loop_vector, 1.0, False, max_tokens=4))
    assert r.status_code == 200 and r.json()["steering"]["report"]["loop_steps"] >= 1


async def test_full_slot_table_is_a_429_and_slots_follow_the_iterator() -> None:
    slots = LoopSlots(1)

    async def outputs() -> AsyncGenerator[int, None]:
        for i in range(3):
            yield i

    never_started = slots.holding("a", outputs())
    assert slots.in_use == 0  # nothing held (and nothing queued) until the iterator starts
    held = slots.holding("b", outputs())
    assert await anext(held) == 0 and slots.in_use == 1
    with pytest.raises(SteerError) as err:
        slots.check()
    assert err.value.status == 429 and err.value.field == "steering" and err.value.code == "loop_slots_full"
    with pytest.raises(SteerError):
        await anext(slots.holding("c", outputs()))  # raced past check(): refused on its first step
    await held.aclose()  # the client went away
    assert slots.in_use == 0
    assert [x async for x in never_started] == [0, 1, 2] and slots.in_use == 0
