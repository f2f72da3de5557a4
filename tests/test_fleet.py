"""Limits shared by replicas through a real Redis (the machine's, 127.0.0.1:6379; ``$STEERSERVE_TEST_REDIS_URL``).

Two ``Admission`` objects stand for two replicas of one deployment (one namespace); each test uses a fresh
namespace, so runs do not see each other's buckets. The HTTP test with two server processes is in
``test_replicas``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import pytest
import redis.exceptions

from steerserve.admission import Admission, Overloaded
from steerserve.fleet import SharedLimits, namespace

REDIS_URL = os.environ.get("STEERSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def shared() -> AsyncIterator[SharedLimits]:
    limits = SharedLimits(REDIS_URL, namespace(f"test-{uuid.uuid4().hex}"))
    try:
        await limits.ping()
    except Exception as exc:
        await limits.close()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    yield limits
    await limits._redis.delete(f"{limits.prefix}:inflight")
    await limits.close()


async def _one() -> AsyncGenerator[int, None]:
    yield 1


async def test_a_rate_is_one_bucket_for_the_fleet(shared: SharedLimits) -> None:
    """6 a minute for key k, requests alternating between two replicas: 6 pass in all, not 6 each, and the
    refusal says when the shared bucket has a token again (10 s at 6 a minute)."""
    a, b = Admission(100, shared=shared), Admission(100, shared=shared)
    passed = 0
    for i in range(12):
        try:
            await (a if i % 2 else b).check_rate("k", 6)
            passed += 1
        except Overloaded as exc:
            assert exc.code == "rate_limited" and 1 <= exc.retry_after <= 10
    assert passed == 6
    await a.check_rate("other", 6)  # another key: its own bucket
    alone = Admission(100)  # without Redis a replica counts alone: the same key passes there again
    await alone.check_rate("k", 6)


async def test_the_in_flight_bound_holds_across_replicas(shared: SharedLimits) -> None:
    a, b = Admission(3, shared=shared), Admission(3, shared=shared)
    held = [a.holding(_one(), 60, await a.enter(60)), b.holding(_one(), 60, await b.enter(60)),
            a.holding(_one(), 60, await a.enter(60))]
    assert await shared.in_flight() == 3
    with pytest.raises(Overloaded) as info:
        await b.enter(60)  # b holds one, but the fleet holds three
    assert info.value.code == "server_overloaded" and b.pending == 1
    await held[0].aclose()
    await asyncio.sleep(0.2)  # the release travels to Redis in the background
    held.append(b.holding(_one(), 60, await b.enter(60)))
    for h in held[1:]:
        await h.aclose()
    await asyncio.sleep(0.2)
    assert await shared.in_flight() == 0 and a.pending == 0 and b.pending == 0


async def test_a_dead_replicas_requests_stop_counting_at_their_deadline(shared: SharedLimits) -> None:
    gone = Admission(1, shared=shared)
    await gone.enter(0.5)  # admitted, never released: its replica died
    other = Admission(1, shared=shared)
    with pytest.raises(Overloaded):
        await other.enter(0.5)
    await asyncio.sleep(0.7)
    await other.enter(0.5)


async def test_an_unreachable_redis_falls_back_to_the_replicas_own_counts() -> None:
    down = SharedLimits("redis://127.0.0.1:1/0", "steerserve:nowhere")  # nothing listens on port 1
    adm = Admission(1, shared=down)
    with pytest.raises(redis.exceptions.ConnectionError):
        await down.ping()  # what makes a server with this URL refuse to start
    held = adm.holding(_one(), 5, await adm.enter(5))
    with pytest.raises(Overloaded):
        await adm.enter(5)  # its own bound still holds
    await adm.check_rate("k", 1)
    with pytest.raises(Overloaded):
        await adm.check_rate("k", 1)
    await held.aclose()
    await down.close()
