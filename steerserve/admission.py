"""Overload rules of the front end: a bounded number of requests in the server, per-key request rates, and
per-request deadlines. What they refuse is a 429 with ``Retry-After`` (a 504 for a passed deadline), before
anything is queued; what they admit keeps its latency because the engine never holds more than the bound.

Alone, a process counts for itself. With a Redis server (``--redis-url``, ``fleet.SharedLimits``) a key's
rate and the in-flight bound hold for the whole fleet of replicas naming it: a key limited to N requests a
minute gets N in all, whichever replicas serve them. The process's own counts are kept either way (they
are what ``Retry-After`` is measured from, and what holds if Redis stops answering).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from steerserve.errors import SteerError
from steerserve.fleet import SharedLimits
from steerserve.store.policies import MIN_RATE_PER_MINUTE

T = TypeVar("T")
log = logging.getLogger(__name__)


class Overloaded(SteerError):
    """A 429 that tells the client when to try again (the edge sends ``Retry-After``)."""

    def __init__(self, message: str, retry_after: float, code: str) -> None:
        super().__init__(message, status=429, code=code)
        self.retry_after = max(1, math.ceil(retry_after))


class DeadlineExceeded(SteerError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request's deadline of {seconds:g} s passed before it finished; it was cancelled",
                         field="timeout", status=504, code="deadline_exceeded")


def refill(tokens: float, elapsed: float, rate: float, burst: float) -> float:
    """A token bucket's tokens ``elapsed`` seconds later (``rate`` tokens/s, at most ``burst``). The Redis
    script in ``fleet`` computes the same on the server's clock."""
    return min(burst, tokens + max(0.0, elapsed) * rate)


def burst_of(per_minute: float) -> float:
    """A key limited to N requests a minute may send them at once: N tokens (at least one)."""
    return max(1.0, per_minute)


class Admission:
    """At most ``max_pending`` requests queued or generating (in this process, and in the fleet with
    ``shared``); a token bucket per client for policies with a rate. ``clock`` is injectable for tests."""

    def __init__(self, max_pending: int, clock: Callable[[], float] = time.monotonic,
                 shared: SharedLimits | None = None) -> None:
        self.max_pending, self.clock, self.shared = max_pending, clock, shared
        self.pending = 0
        self._service: float | None = None  # moving mean of a finished request's time in the server, s
        self._started: dict[int, float] = {}  # id of each held request -> when it was admitted
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)
        self._releases: set[asyncio.Task[None]] = set()  # fleet releases on their way to Redis

    async def check_rate(self, client: str, per_minute: float | None) -> None:
        """Take one request from ``client``'s bucket, or refuse (429 ``rate_limited``)."""
        if per_minute is None:
            return
        rate, burst = per_minute / 60.0, burst_of(per_minute)
        left = self._take_local(client, rate, burst)
        if left is None and self.shared is not None:
            try:
                left = await self.shared.take(client, rate, burst)
            except Exception:  # Redis is down: this replica's own bucket has decided
                log.warning("Redis did not answer; rate limits count per replica meanwhile", exc_info=True)
        if left is not None:
            raise Overloaded(f"rate limit of {per_minute:g} requests per minute reached for this API key",
                             (1.0 - left) / rate, "rate_limited")

    def _take_local(self, client: str, rate: float, burst: float) -> float | None:
        now = self.clock()
        tokens, then = self._buckets.get(client, (burst, now))
        tokens = refill(tokens, now - then, rate, burst)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return tokens
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > 100_000:  # forget idle ones: at the slowest rate allowed, full within the hour
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60 / MIN_RATE_PER_MINUTE}
        return None

    def retry_after(self) -> float:
        """When a place is likely to free: the mean time a request spends in the server, and at least the
        time the oldest request still in it has spent there (on a cold server no request has finished yet,
        and the ones admitted may take minutes: the oldest one's age is the honest lower bound)."""
        oldest = self.clock() - min(self._started.values()) if self._started else 0.0
        return max(1.0, self._service or 0.0, oldest)

    def _full(self) -> Overloaded:
        return Overloaded(f"the server is at its limit of {self.max_pending} requests in flight; retry later",
                          self.retry_after(), "server_overloaded")

    def check(self) -> None:
        """Refuse (429 ``server_overloaded``) while this process holds ``max_pending`` requests."""
        if self.pending >= self.max_pending:
            raise self._full()

    async def enter(self, timeout: float | None) -> str:
        """Count one more request (here, and in the fleet), or refuse; returns its fleet member name."""
        self.check()
        self.pending += 1  # before the await below: concurrent entries cannot all pass the local bound
        member = uuid.uuid4().hex
        if self.shared is not None:
            try:
                counted = await self.shared.enter(member, self.max_pending, timeout)
            except Exception:
                log.warning("Redis did not answer; the in-flight bound counts per replica meanwhile", exc_info=True)
                counted = True
            if not counted:
                self.pending -= 1
                raise self._full()
        return member

    def cancel(self, member: str) -> None:
        """Uncount a request ``enter`` admitted that never became a held one (refused after all)."""
        self.pending -= 1
        if self.shared is not None:
            self._release(member)

    def holding(self, outputs: AsyncGenerator[T, None], timeout: float | None,
                member: str = "") -> AsyncGenerator[T, None]:
        """``outputs``, counted until closed (started or not), cancelled once ``timeout`` seconds have passed."""
        held = _Held(self, outputs, timeout, member)
        self._started[id(held)] = held.started
        return held

    def _leave(self, held: _Held[Any]) -> None:
        self.pending -= 1
        self._started.pop(id(held), None)
        took = self.clock() - held.started
        self._service = took if self._service is None else 0.9 * self._service + 0.1 * took
        if self.shared is not None and held.member:
            self._release(held.member)

    def _release(self, member: str) -> None:
        """Drop ``member`` from the fleet's count in the background (a deadline removes it if this fails)."""
        shared = self.shared
        assert shared is not None
        try:
            task = asyncio.get_running_loop().create_task(shared.leave(member))
        except RuntimeError:  # no loop (a generator collected at shutdown): its deadline expires it
            return
        self._releases.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("releasing a request in Redis failed; it stops counting at its deadline")


class _Held(AsyncGenerator[T, None]):
    """A hand-made async generator: closing one that never started must still release its count."""

    def __init__(self, admission: Admission, outputs: AsyncGenerator[T, None], timeout: float | None,
                 member: str) -> None:
        self._admission, self._outputs, self._timeout, self.member = admission, outputs, timeout, member
        self.started = admission.clock()
        self._open = True

    async def asend(self, value: None) -> T:
        return await self.__anext__()

    async def athrow(self, *args: Any) -> T:
        await self.aclose()
        raise args[1] if len(args) > 1 and isinstance(args[1], BaseException) else args[0]

    async def __anext__(self) -> T:
        if not self._open:
            raise StopAsyncIteration
        left = None if self._timeout is None else self._timeout - (self._admission.clock() - self.started)
        try:
            if left is None:
                return await self._outputs.__anext__()
            if left <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self._outputs.__anext__(), left)
        except asyncio.TimeoutError:
            await self.aclose()
            assert self._timeout is not None
            raise DeadlineExceeded(self._timeout) from None
        except StopAsyncIteration:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._admission._leave(self)
            await self._outputs.aclose()  # aborts an unfinished request in the engine

    def __del__(self) -> None:  # dropped without being closed (e.g. a stream whose client left before it began)
        if self._open:
            self._open = False
            self._admission._leave(self)
