"""Keeps the engine alive: a dead engine is restarted in place; one that keeps dying ends the process.

What a client sees while the engine is down (see the README, "Failures"):
- requests in flight when it died end with a 503 (``engine_failed``), or an error event if streaming;
- new requests get a 503 ``engine_unavailable`` with ``Retry-After`` until the restart completes;
- ``/health`` and ``/ready`` answer 503 meanwhile.
If more than ``max_restarts`` restarts are needed within ``window`` seconds (or a restart itself keeps
failing), the process exits with status ``EXIT_CODE`` so that a supervisor (Docker's restart policy,
systemd) starts a fresh one: a server that answers 500 forever is the one outcome not allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable

from steerserve.engines.base import Engine

log = logging.getLogger(__name__)
EXIT_CODE = 3


class EngineSupervisor:
    """Polls ``engine.health()``; restarts the engine when it turns false while we believe it is up."""

    def __init__(self, engine: Engine, max_restarts: int, *, window: float = 600.0, interval: float = 1.0,
                 exit_fn: Callable[[int], None] = os._exit) -> None:
        self.engine, self.max_restarts, self.window, self.interval = engine, max_restarts, window, interval
        self.exit_fn = exit_fn
        self.restarting = False
        self.restarts = 0  # completed restarts since start (reported in /metrics)
        self._recent: deque[float] = deque()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="steerserve-engine-supervisor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                healthy = await self.engine.health()
            except Exception:
                log.exception("engine health check failed")
                healthy = False
            if not healthy:
                await self.restart()

    async def restart(self) -> None:
        """Stop what is left of the engine and start it again; exit the process if that keeps failing."""
        now = time.monotonic()
        while self._recent and now - self._recent[0] > self.window:
            self._recent.popleft()
        if len(self._recent) >= self.max_restarts:
            log.critical("the engine died %d times within %.0f s; exiting with status %d so that a supervisor "
                         "restarts the server", len(self._recent) + 1, self.window, EXIT_CODE)
            self.exit_fn(EXIT_CODE)
            return
        self._recent.append(now)
        self.restarting = True
        log.error("the engine is not running; restarting it (restart %d of at most %d per %.0f s)",
                  len(self._recent), self.max_restarts, self.window)
        try:
            try:
                await self.engine.stop()
            except Exception:  # what is left of a dead engine may fail to stop cleanly
                log.exception("stopping the dead engine failed; starting a new one anyway")
            await self.engine.start()
            self.restarts += 1
            log.warning("the engine was restarted and is serving again")
        except Exception:
            log.exception("restarting the engine failed; will try again")
        finally:
            self.restarting = False
