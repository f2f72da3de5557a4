"""Limits every replica of one deployment shares, kept in Redis (``--redis-url``).

Two structures per deployment, under a namespace derived from its artifact store (replicas of one
deployment share the store, so they share the namespace without configuring one):

- ``<ns>:rate:<key hash>``: a key's token bucket (``tokens``, ``when``), refilled and taken in one Lua script
  on Redis's own clock, so replicas with skewed clocks still count one bucket;
- ``<ns>:inflight``: a sorted set of the requests in the fleet, scored by when each must be gone (its
  deadline); a replica that dies without releasing its requests stops counting once their deadlines pass.

Each call is one round trip. A Redis that stops answering is logged and the replica falls back on its own
counts (``admission.Admission``), so that a Redis outage degrades the limits to per-replica instead of
refusing every request.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

# KEYS[1] bucket; ARGV rate (tokens/s), burst. Returns {1 taken | 0 refused, tokens left as a string}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'when')
local tokens = tonumber(v[1]) or burst
local when = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - when) * rate)
local ok = 0
if tokens >= 1 then
  tokens = tokens - 1
  ok = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'when', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {ok, tostring(tokens)}
"""

# KEYS[1] in-flight set; ARGV bound, seconds the entry may live, member. Returns the count before, or -1
# (refused: the fleet is at its bound).
_ENTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then
  return -1
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
return n
"""

NO_DEADLINE_S = 3600.0  # how long a request without a deadline counts at most if its replica never releases it


def namespace(store_identity: str) -> str:
    """The key prefix of the deployment whose artifact store is ``store_identity`` (its URL or folder)."""
    return "steerserve:" + hashlib.sha256(store_identity.encode()).hexdigest()[:16]


class SharedLimits:
    """The fleet-wide rate buckets and in-flight bound on one Redis server."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as aioredis  # the client is only needed by deployments that name a Redis

        self.url, self.prefix = url, prefix
        self._redis: Any = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._take = self._redis.register_script(_TAKE)
        self._enter = self._redis.register_script(_ENTER)

    async def ping(self) -> None:
        """Raise if the server cannot be reached (checked once at start: a named Redis must be there)."""
        await self._redis.ping()

    async def take(self, client: str, rate: float, burst: float) -> float | None:
        """Take one token from ``client``'s bucket: None if taken, else the tokens left (< 1)."""
        ok, left = await self._take(keys=[f"{self.prefix}:rate:{client}"], args=[rate, burst])
        return None if int(ok) == 1 else float(left)

    async def enter(self, member: str, bound: int, ttl: float | None) -> bool:
        """Count ``member`` in the fleet's requests unless ``bound`` are already in; whether it was counted."""
        n = await self._enter(keys=[f"{self.prefix}:inflight"], args=[bound, ttl or NO_DEADLINE_S, member])
        return int(n) >= 0

    async def leave(self, member: str) -> None:
        await self._redis.zrem(f"{self.prefix}:inflight", member)

    async def in_flight(self) -> int:
        """Requests in the fleet now (those past their deadline excluded, by this replica's clock)."""
        n: int = await self._redis.zcount(f"{self.prefix}:inflight", time.time(), "+inf")
        return n

    async def close(self) -> None:
        await self._redis.aclose()
