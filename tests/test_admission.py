"""Overload behaviour: the bound on requests in flight, per-key rate limits and deadlines; unit-level with a
fake clock, then over HTTP on the live server (429 with Retry-After, 504, nothing leaked)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import pytest

from steerserve.admission import Admission, DeadlineExceeded, Overloaded
from steerserve.service import Service


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _slow(n: int, delay: float = 0.0) -> AsyncGenerator[int, None]:
    for i in range(n):
        await asyncio.sleep(delay)
        yield i


async def test_bucket_refills_at_the_rate_and_says_when() -> None:
    clock = Clock()
    adm = Admission(10, clock)
    for _ in range(60):  # a burst of a minute's worth: 60 a minute may all come at once
        await adm.check_rate("k", 60)
    with pytest.raises(Overloaded) as info:
        await adm.check_rate("k", 60)
    assert info.value.status == 429 and info.value.code == "rate_limited" and info.value.retry_after == 1
    await adm.check_rate("other", 60)  # buckets are per client
    await adm.check_rate("k", None)  # no limit: never refused
    clock.now += 1.0
    await adm.check_rate("k", 60)
    with pytest.raises(Overloaded):
        await adm.check_rate("k", 60)
    slow = Admission(10, clock)
    await slow.check_rate("s", 1)  # one a minute: a burst of one
    with pytest.raises(Overloaded) as info:
        await slow.check_rate("s", 1)
    assert info.value.retry_after == 60


async def test_pending_bound_counts_until_closed_started_or_not() -> None:
    adm = Admission(2)
    a = adm.holding(_slow(3), None, await adm.enter(None))
    b = adm.holding(_slow(3), None, await adm.enter(None))
    with pytest.raises(Overloaded) as info:
        await adm.enter(None)
    assert info.value.code == "server_overloaded" and info.value.retry_after >= 1
    assert [x async for x in a] == [0, 1, 2]  # finished: its count is released
    assert adm.pending == 1
    await b.aclose()  # never started, closed: released too
    assert adm.pending == 0
    c = adm.holding(_slow(3), None, await adm.enter(None))
    del c  # dropped without a close (a client gone before its stream began)
    assert adm.pending == 0


async def test_retry_after_is_the_time_requests_really_take() -> None:
    """On a cold server nothing has finished yet: Retry-After is at least the age of the oldest request in
    flight (not 1 s while the admitted ones take minutes); later the mean time a request took."""
    clock = Clock()
    adm = Admission(2, clock)
    held = [adm.holding(_slow(1), None, await adm.enter(None)) for _ in range(2)]
    clock.now += 95.0
    with pytest.raises(Overloaded) as info:
        await adm.enter(None)
    assert info.value.retry_after == 95
    for h in held:
        await h.aclose()  # each took 95 s
    again = [adm.holding(_slow(1), None, await adm.enter(None)) for _ in range(2)]  # both just admitted
    with pytest.raises(Overloaded) as info:
        await adm.enter(None)
    assert info.value.retry_after == 95
    for h in again:
        await h.aclose()


async def test_deadline_cancels_and_releases() -> None:
    adm = Admission(4)
    closed = []

    async def endless() -> AsyncGenerator[int, None]:
        try:
            while True:
                await asyncio.sleep(0.05)
                yield 1
        finally:
            closed.append(True)

    held = adm.holding(endless(), 0.3, await adm.enter(0.3))
    got = []
    with pytest.raises(DeadlineExceeded) as info:
        async for x in held:
            got.append(x)
    assert info.value.status == 504 and info.value.field == "timeout"
    assert 2 <= len(got) <= 7 and closed == [True] and adm.pending == 0


def _gen(timeout: float | None = None, **kw: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0, "max_tokens": 8, **kw}
    if timeout is not None:
        body["timeout"] = timeout
    return body


def test_full_server_answers_429_with_retry_after(client: httpx.Client, service: Service) -> None:
    bound = service.admission.max_pending
    service.admission.max_pending = 0
    try:
        r = client.post("/generate", json=_gen())
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "server_overloaded" and int(r.headers["retry-after"]) >= 1
    finally:
        service.admission.max_pending = bound
    assert client.post("/generate", json=_gen()).status_code == 200
    assert service.admission.pending == 0


def test_deadline_over_http_is_504_and_the_server_keeps_serving(client: httpx.Client, service: Service) -> None:
    r = client.post("/generate", json=_gen(timeout=0.3, max_tokens=256, ignore_eos=True))
    assert r.status_code == 504, r.text
    assert r.json()["error"]["param"] == "timeout" and r.json()["error"]["code"] == "deadline_exceeded"
    with client.stream("POST", "/v1/chat/completions", json={**_gen(timeout=0.3, max_tokens=256, ignore_eos=True),
                                                            "stream": True}) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and "deadline_exceeded" in events[-2]
    assert client.post("/v1/chat/completions", json=_gen(timeout=600)).status_code == 200
    bad = client.post("/generate", json=_gen(timeout=-1))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "timeout"
    assert service.admission.pending == 0


def test_policy_rate_limit_per_key(client: httpx.Client, admin_headers: dict[str, str]) -> None:
    r = client.post("/admin/policies", headers=admin_headers, json={"name": "slow-lane", "requests_per_minute": 2})
    assert r.status_code == 201, r.text
    assert r.json()["requests_per_minute"] == 2
    keys = []
    for label in ("a", "b"):
        k = client.post("/admin/keys", headers=admin_headers, json={"policy": "slow-lane", "label": label})
        assert k.status_code == 201, k.text
        keys.append({"Authorization": f"Bearer {k.json()['key']}"})
    for _ in range(2):  # a minute's worth at once
        assert client.post("/generate", headers=keys[0], json=_gen(max_tokens=2)).status_code == 200
    r = client.post("/generate", headers=keys[0], json=_gen(max_tokens=2))
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert int(r.headers["retry-after"]) >= 1
    assert client.post("/generate", headers=keys[1], json=_gen(max_tokens=2)).status_code == 200  # its own bucket
    for rate in (0, 5e-324, 0.01):  # below one an hour: the bucket would (all but) never refill
        bad = client.put("/admin/policies/slow-lane", headers=admin_headers, json={"requests_per_minute": rate})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "requests_per_minute", bad.text
    assert client.get("/admin/policies/slow-lane", headers=admin_headers).json()["requests_per_minute"] == 2


def test_a_store_from_before_rate_limits_opens_and_reads_none(tmp_path: Any) -> None:
    """The policies table of an older release lacks ``requests_per_minute``: opening adds it (NULL: no limit)."""
    import sqlite3

    from steerserve.store import db
    from steerserve.store.policies import PolicyStore

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE policies (name VARCHAR(64) PRIMARY KEY, mandatory JSON NOT NULL, allowed_methods "
                     "JSON, max_coeff FLOAT, method_caps JSON NOT NULL, description TEXT NOT NULL, created VARCHAR "
                     "NOT NULL, updated VARCHAR NOT NULL)")
        conn.execute("INSERT INTO policies VALUES ('old', '[]', NULL, 2.0, '{}', 'before', 'x', 'x')")
    store = PolicyStore(db.make_engine(path))
    old = store.get("old")
    assert old.max_coeff == 2.0 and old.requests_per_minute is None
