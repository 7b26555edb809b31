"""Proxy users: scrypt verification never holds the event loop, which serves every
transfer; a header that verified once is not verified again."""

from __future__ import annotations

import asyncio
import time

from support.client import basic

from proxy_app.config import ProxyUser
from proxy_app.proxy_auth import ProxyAuthenticator, hash_password


def test_wrong_passwords_do_not_hold_the_event_loop() -> None:
    """Eight wrong passwords at once cost about 8 x 40 ms of scrypt. Run on the loop, they
    stopped it for all that time: a ticker that asks to wake every millisecond did not
    run once. In threads, it keeps ticking meanwhile."""
    users = (ProxyUser("alice", hash_password("right"), ()),)
    auth = ProxyAuthenticator(users)

    async def run() -> tuple[list[object], list[float]]:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        results = await asyncio.gather(
            *(auth.authenticate(basic("alice", f"wrong{i}")) for i in range(8)),
            auth.authenticate(basic("alice", "right")),
        )
        done.set()
        await tick
        return list(results), gaps

    results, gaps = asyncio.run(run())
    assert results[:8] == [None] * 8
    assert results[8] is not None and results[8].name == "alice"
    # About 300 ms of scrypt: the loop ran through it (180-270 ticks here; none when held).
    assert len(gaps) >= 50, f"the loop ticked {len(gaps)} times, longest stop {max(gaps):.3f} s"


def test_a_verified_header_is_remembered() -> None:
    auth = ProxyAuthenticator((ProxyUser("bob", hash_password("pw"), ()),))

    async def twice() -> float:
        assert await auth.authenticate(basic("bob", "pw")) is not None
        t0 = time.monotonic()
        assert await auth.authenticate(basic("bob", "pw")) is not None
        return time.monotonic() - t0

    assert asyncio.run(twice()) < 0.01  # no second scrypt (one takes about 40 ms)
    assert asyncio.run(auth.authenticate(basic("bob", "nope"))) is None
