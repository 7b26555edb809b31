"""A lock per key (a tag, a digest), kept only while someone holds or waits for it.

Many clients asking for the same thing at once take turns: the first goes upstream (or
moves a blob into the store), the others find its result when their turn comes. A wait for
the turn may have a deadline, so that a slow holder keeps nobody past it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable


class TurnTimeout(TimeoutError):
    """Another request for the same manifest held it past the deadline."""


class KeyedLocks:
    """A lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable, deadline: float | None = None) -> AsyncIterator[None]:
        """Holds key's lock; waits for it until `deadline` (loop clock), TurnTimeout after."""
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await lock.acquire()
            except TimeoutError as e:
                raise TurnTimeout("another request for it is still waiting on upstream") from e
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
