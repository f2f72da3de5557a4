"""Overload rules of the front end: a bounded number of requests in the server, per-key request rates, and
per-request deadlines. What they refuse is a 429 with ``Retry-After`` (a 504 for a passed deadline), before
anything is queued; what they admit keeps its latency because the engine never holds more than the bound.

Counting is per process: replicas behind a load balancer each enforce their own bound (a key's rate limit
is then per replica, as with vLLM's own per-server limits).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from steerserve.errors import SteerError

T = TypeVar("T")


class Overloaded(SteerError):
    """A 429 that tells the client when to try again (the edge sends ``Retry-After``)."""

    def __init__(self, message: str, retry_after: float, code: str) -> None:
        super().__init__(message, status=429, code=code)
        self.retry_after = max(1, math.ceil(retry_after))


class DeadlineExceeded(SteerError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request's deadline of {seconds:g} s passed before it finished; it was cancelled",
                         field="timeout", status=504, code="deadline_exceeded")


class Admission:
    """At most ``max_pending`` requests queued or generating; a token bucket per client for policies with a
    rate (``burst`` = ten seconds' worth, at least 1). ``clock`` is injectable for tests."""

    def __init__(self, max_pending: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_pending, self.clock = max_pending, clock
        self.pending = 0
        self._seconds = 1.0  # moving mean of a request's time in the server: the basis of Retry-After
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)

    def check_rate(self, client: str, per_minute: float | None) -> None:
        """Take one request from ``client``'s bucket, or refuse (429 ``rate_limited``)."""
        if per_minute is None:
            return
        now, rate = self.clock(), per_minute / 60.0
        burst = max(1.0, rate * 10.0)
        tokens, then = self._buckets.get(client, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            raise Overloaded(f"rate limit of {per_minute:g} requests per minute reached for this API key",
                             (1.0 - tokens) / rate if rate > 0 else 60.0, "rate_limited")
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > 100_000:  # forget the idle ones: a bucket refills in ten seconds anyway
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}

    def check(self) -> None:
        """Refuse (429 ``server_overloaded``) while the server holds ``max_pending`` requests."""
        if self.pending >= self.max_pending:
            raise Overloaded(f"the server is at its limit of {self.max_pending} requests in flight; retry later",
                             self._seconds, "server_overloaded")

    def enter(self) -> None:
        """Count one more request in the server, or refuse."""
        self.check()
        self.pending += 1

    def holding(self, outputs: AsyncGenerator[T, None], timeout: float | None) -> AsyncGenerator[T, None]:
        """``outputs``, counted until closed (started or not), cancelled once ``timeout`` seconds have passed."""
        return _Held(self, outputs, timeout)

    def _leave(self, started: float) -> None:
        self.pending -= 1
        self._seconds = 0.9 * self._seconds + 0.1 * (self.clock() - started)


class _Held(AsyncGenerator[T, None]):
    """A hand-made async generator: closing one that never started must still release its count."""

    def __init__(self, admission: Admission, outputs: AsyncGenerator[T, None], timeout: float | None) -> None:
        self._admission, self._outputs, self._timeout = admission, outputs, timeout
        self._started = admission.clock()
        self._open = True

    async def asend(self, value: None) -> T:
        return await self.__anext__()

    async def athrow(self, *args: Any) -> T:
        await self.aclose()
        raise args[1] if len(args) > 1 and isinstance(args[1], BaseException) else args[0]

    async def __anext__(self) -> T:
        if not self._open:
            raise StopAsyncIteration
        left = None if self._timeout is None else self._timeout - (self._admission.clock() - self._started)
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
            self._admission._leave(self._started)
            await self._outputs.aclose()  # aborts an unfinished request in the engine

    def __del__(self) -> None:  # dropped without being closed (e.g. a stream whose client left before it began)
        if self._open:
            self._open = False
            self._admission._leave(self._started)
