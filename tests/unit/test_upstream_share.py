"""Each client's share of a registry's upstream connections: capped per client address
(an IPv6 client per /64), never waiting on another client, forgotten when unused."""

from __future__ import annotations

import asyncio

import pytest

from proxy_app.upstream_share import UpstreamShares, client_key


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("10.0.0.7", "10.0.0.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),
        ("::ffff:10.0.0.7", "10.0.0.7"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_what_counts_as_one_client(address: str, key: str) -> None:
    assert client_key(address) == key


def test_a_client_waits_for_its_own_share_only() -> None:
    async def run() -> None:
        shares = UpstreamShares(per_client=2)
        greedy = [shares.for_request("10.0.0.1") for _ in range(3)]
        await greedy[0].take("reg.example")
        await greedy[1].take("reg.example")
        await greedy[1].take("reg.example")  # the same request again: no second share
        third = asyncio.ensure_future(greedy[2].take("reg.example"))
        await asyncio.sleep(0.05)
        assert not third.done()
        # Another client, and the same client at another registry, go at once.
        other = shares.for_request("10.0.0.2")
        await asyncio.wait_for(other.take("reg.example"), 1)
        await asyncio.wait_for(greedy[0].take("other.example"), 1)
        greedy[0].release()
        await asyncio.wait_for(third, 1)
        for request in (*greedy, other):
            request.release()
        assert shares.in_use("10.0.0.1", "reg.example") == 0
        assert shares._shares == {}

    asyncio.run(run())


def test_a_waiter_that_gives_up_leaves_nothing_behind() -> None:
    async def run() -> None:
        shares = UpstreamShares(per_client=1)
        holder = shares.for_request("10.0.0.1")
        await holder.take("reg.example")
        waiter = shares.for_request("10.0.0.1")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(waiter.take("reg.example"), 0.05)
        waiter.release()
        assert shares.in_use("10.0.0.1", "reg.example") == 1
        holder.release()
        assert shares._shares == {}

    asyncio.run(run())
