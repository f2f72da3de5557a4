"""An engine that owns one thread: the async API on one side, a command inbox on the other.

The engine thread takes commands between two model steps (``_commands``): ``add`` a request, ``abort``
one, run a ``call`` (any function that must see the model between steps: hidden states, stats, the
evaluation scorer), ``stop``. The async side (any event loop) only puts commands and awaits outputs, so
the model is never touched by two threads. ``hf.HFEngine`` implements the three hooks below.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from typing import Any

from steerserve.engines.base import ENGINE_FAILED, GenerationOutput, GenerationRequest, failure
from steerserve.errors import EngineUnavailable

Emit = Callable[[GenerationOutput], None]


class EngineThread:
    def __init__(self) -> None:
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None

    # ---- what the engine implements (called on the engine thread) ----
    def _add(self, request: GenerationRequest, emit: Emit) -> None:
        raise NotImplementedError

    def _abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _stop_all(self) -> None:
        """End every request in flight (the thread is stopping)."""
        raise NotImplementedError

    # ---- async API (any thread's event loop) ----
    async def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():  # a dead thread would leave "stop" queued
            self._inbox.put(("stop", None))                          # for the next one
            await asyncio.to_thread(self._thread.join)

    async def health(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationOutput, None]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[GenerationOutput] = asyncio.Queue()

        def emit(out: GenerationOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        if not await self.health():
            raise EngineUnavailable()
        self._inbox.put(("add", (request, emit)))
        finished = False
        try:
            while not finished:
                try:
                    out = await asyncio.wait_for(outputs.get(), timeout=5.0)
                except asyncio.TimeoutError:
                    if await self.health():
                        continue  # still queued or decoding slowly
                    yield failure(request.request_id, len(request.prompt_token_ids), 0, ENGINE_FAILED, 503,
                                  "engine_failed")
                    return
                finished = out.finish_reason is not None
                yield out
        finally:
            if not finished:  # client went away: free the slot and the bank rows
                self._inbox.put(("abort", request.request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the engine thread between two steps (the model is never shared across threads)."""
        fut: Future[Any] = Future()
        self._inbox.put(("call", (fn, fut)))
        return fut

    # ---- engine thread ----
    def _commands(self, block: bool) -> bool:
        """Take every queued command (waiting for one if ``block``); False once told to stop."""
        while True:
            try:
                kind, arg = self._inbox.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                self._stop_all()
                return False
            if kind == "add":
                self._add(*arg)
            elif kind == "abort":
                self._abort(arg)
            elif kind == "call":
                fn, fut = arg
                try:
                    fut.set_result(fn())
                except Exception as exc:
                    fut.set_exception(exc)
