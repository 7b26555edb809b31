"""Each client's fair share of a registry's upstream connections.

The upstream session keeps at most `LIMIT_PER_HOST` connections to one registry, shared
by every client of the cache. Without a cap, one client that keeps requests hanging (a
path the registry answers slowly, the same tag with many `Accept` variants) could hold all
of them, and every other client's request to that registry would wait for a connection.
So one client address (an IPv6 client: its /64, which it holds whole) may have at most
`CLIENT_SHARE` requests to one registry in flight upstream; its further requests wait for
one of its own to end, never for another client's.

A request takes its share the first time it goes upstream to a registry and gives it back
when it ends (its answer relayed), so answers from the store cost none. A share is keyed
by the client and the registry and forgotten once nobody holds or waits for it.
"""

from __future__ import annotations

import asyncio
import ipaddress

LIMIT_PER_HOST = 64  # the upstream session's connections per registry
CLIENT_SHARE = LIMIT_PER_HOST // 4


def client_key(address: str) -> str:
    """What counts as one client: its IPv4 address, or its IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class UpstreamShares:
    def __init__(self, per_client: int = CLIENT_SHARE) -> None:
        self.per_client = per_client
        # (client, registry) -> its semaphore and how many hold or wait for it
        self._shares: dict[tuple[str, str], tuple[asyncio.Semaphore, int]] = {}

    def for_request(self, client: str) -> RequestShare:
        return RequestShare(self, client_key(client))

    async def _take(self, key: tuple[str, str]) -> None:
        semaphore, users = self._shares.get(key, (None, 0))
        if semaphore is None:
            semaphore = asyncio.Semaphore(self.per_client)
        self._shares[key] = (semaphore, users + 1)
        try:
            await semaphore.acquire()
        except BaseException:
            self._forget(key)
            raise

    def _give_back(self, key: tuple[str, str]) -> None:
        semaphore, _ = self._shares[key]
        semaphore.release()
        self._forget(key)

    def _forget(self, key: tuple[str, str]) -> None:
        semaphore, users = self._shares[key]
        if users <= 1:
            del self._shares[key]
        else:
            self._shares[key] = (semaphore, users - 1)

    def in_use(self, client: str, registry: str) -> int:
        """Requests of this client to this registry holding or awaiting a share."""
        return self._shares.get((client_key(client), registry), (None, 0))[1]


class RequestShare:
    """The shares one client request holds: at most one per registry it asks."""

    def __init__(self, shares: UpstreamShares, client: str) -> None:
        self._shares = shares
        self._client = client
        self._held: set[str] = set()

    async def take(self, registry: str) -> None:
        if registry not in self._held:
            await self._shares._take((self._client, registry))
            self._held.add(registry)

    def release(self) -> None:
        for registry in self._held:
            self._shares._give_back((self._client, registry))
        self._held.clear()
