"""What the front end asks vLLM's workers between steps: every RPC bound to the engine core's life
(``rpc``), and the two questions many requests ask at once, answered by one shared round trip each: which
requests a worker refused to steer (``FailurePoll``), and where each closed loop stands (``FigurePoll``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

DEATH_POLL_S = 0.2  # how often an RPC in flight looks whether the engine core is still alive


async def rpc(llm: Any, method: str, *args: Any) -> list[Any]:
    """``llm.collective_rpc(method, args)``, ended with ``EngineDeadError`` if the engine core dies first.

    vLLM keeps the future of a utility call until the core answers it; a core that dies never does, and
    nothing fails the future (vllm 0.32), so an awaited RPC would hang its request, and with it whatever it
    holds (an admission slot, the failure poll's lock), forever. Checked every ``DEATH_POLL_S``."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if llm.errored:
        raise EngineDeadError()
    call = asyncio.ensure_future(llm.collective_rpc(method, args=args))
    try:
        while not (await asyncio.wait({call}, timeout=DEATH_POLL_S))[0]:
            if llm.errored:
                raise EngineDeadError()
        result: list[Any] = call.result()
        return result
    finally:
        call.cancel()


class FailurePoll:
    """Which requests the workers refused to steer (``steerserve_take_failed``), asked for at most once at a
    time: concurrent callers share one round trip to the engine core."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.failed: dict[str, str] = {}
        self._last = 0.0
        self._lock = asyncio.Lock()

    async def since(self, t: float) -> dict[str, str]:
        """The failures reported by a poll that started after ``t`` (``time.monotonic()``)."""
        async with self._lock:
            if self._last <= t:
                self._last = time.monotonic()
                for worker in await rpc(self.llm, "steerserve_take_failed"):
                    for req_id, why in worker.items():
                        # vLLM runs a request as "<our id>-<8 random chars>" (unless told not to): both keys
                        self.failed[req_id] = self.failed[req_id.rsplit("-", 1)[0]] = why
        return self.failed

    def forget(self, request_id: str) -> None:
        for key in [k for k in self.failed if k == request_id or k.startswith(f"{request_id}-")]:
            del self.failed[key]


FIGURE_PERIOD_S = 0.25  # how stale a closed loop's streamed figures may be: one worker round trip per period


class FigurePoll:
    """The latest figures of every closed loop in flight (entropy measured, gain set: what the hf engine puts
    on each streamed token), fetched for all of them in one round trip at most every ``FIGURE_PERIOD_S``."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.latest: dict[str, dict[str, float]] = {}
        self._wanted: set[str] = set()
        self._last = 0.0
        self._lock = asyncio.Lock()

    async def of(self, request_id: str) -> dict[str, float] | None:
        """``request_id``'s figures as of a step at most one period ago (None before its loop has run)."""
        self._wanted.add(request_id)
        async with self._lock:
            if time.monotonic() - self._last >= FIGURE_PERIOD_S:
                self._last = time.monotonic()
                self.latest = (await rpc(self.llm, "steerserve_loop_figures", sorted(self._wanted)))[0] or {}
        return self.latest.get(request_id)

    def forget(self, request_id: str) -> None:
        self._wanted.discard(request_id)
        self.latest.pop(request_id, None)
