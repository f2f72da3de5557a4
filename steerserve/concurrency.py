"""One asyncio pattern the front end and the evaluation share: run awaitables together, all or none."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def gather_all(aws: Iterable[Awaitable[T]]) -> list[T]:
    """The results of ``aws`` run as tasks, in order. If one fails or the caller is cancelled, the others are
    cancelled and awaited before this returns or raises (asyncio.gather leaves them running)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
