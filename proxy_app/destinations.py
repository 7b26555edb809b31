"""Where the proxy may connect: not into the cache host itself, loopback, link-local or
cloud metadata addresses, unless a host is named explicitly in `intercept`/`passthrough`.

The check runs on resolved addresses, in the resolver the upstream client uses and
before a tunnel is opened, so a name that resolves to 127.0.0.1 or 169.254.169.254 is
refused like the address itself (and a DNS answer that changes between a check and the
connection cannot slip past: the connection uses only addresses that passed). Behind a
parent proxy (upstream_proxy) the parent connects, and resolves names the cache cannot.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
import re
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from .config import Config

log = logging.getLogger(__name__)

METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
# getaddrinfo's "this name does not exist", as opposed to "the DNS did not answer".
NO_SUCH_NAME = frozenset({socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)})


def valid_host_name(host: str) -> bool:
    """A DNS name the resolver can take: labels of 1-63 characters, 253 in all (an empty
    or overlong label makes getaddrinfo raise UnicodeError, not OSError)."""
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(0 < len(label) <= 63 for label in name.split("."))


def _literal(glob: str) -> bool:
    """Whether an intercept/passthrough entry names one host (and maybe a port) exactly."""
    host = re.sub(r":[0-9]+$", "", glob) if not glob.endswith("]") else glob
    if re.fullmatch(r"\[[0-9a-fA-F:.]+\]", host):
        return True  # an IPv6 address in brackets
    return not any(c in host for c in "*?[]")


class DestinationRefused(OSError):
    pass


def host_matches(globs: tuple[str, ...], host: str, port: int) -> bool:
    """Whether host (or host:port, for globs that name a port) matches one of `globs`.
    An IPv6 address is written in brackets, as in a glob (`[fd00::5]`, `[fd00::5]:5000`)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    for glob in globs:
        names_port = re.search(r":[0-9*?]+$", glob) is not None and not glob.endswith("]")
        if glob.startswith("["):  # a literal bracket for fnmatch, not a character class
            glob = "[[]" + glob[1:]
        if fnmatch.fnmatchcase(f"{host}:{port}" if names_port else host, glob):
            return True
    return False


def forbidden_reason(address: str) -> str | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if ip.is_unspecified or ip.is_multicast:
        return f"{ip} is not a destination"
    if is_local_address(ip):
        return f"{ip} is an address of the cache host itself"
    return None


def is_local_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ip belongs to this host. The kernel routes a packet for one of its own
    addresses through the local table with that same address as the source; asking for
    the route (a UDP connect sends nothing) tells, whatever net.ipv4.ip_nonlocal_bind
    says (with it set, a bind test would call every address local)."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((str(ip), 9))
            source = s.getsockname()[0]
    except OSError:
        return False  # no route to it: not ours either
    return ipaddress.ip_address(source.split("%", 1)[0]) == ip


class DestinationPolicy:
    def __init__(self, config: Config) -> None:
        self.config = config
        # Only a literal name or address opens loopback, link-local or the cache host
        # itself: a glob (`*.example.com`) would open it for every name under it, which
        # anyone who controls that domain's DNS could point at the cache host.
        self._explicit = tuple(g for g in (*config.intercept, *config.passthrough) if _literal(g))
        # The parent proxy is the admin's own choice (often on the cache host itself).
        parent = URL(config.upstream_proxy) if config.upstream_proxy else None
        self._parent = (parent.host.lower(), parent.port) if parent and parent.host else None

    def explicitly_allowed(self, host: str, port: int) -> bool:
        if self._parent is not None and (host.lower(), port) == self._parent:
            return True
        return host_matches(self._explicit, host.lower(), port)

    async def _parent_refusal(self) -> str | None:
        """Why the parent proxy may not resolve names for the cache (it runs on the cache
        host, or on a loopback or link-local address), or None."""
        assert self._parent is not None
        host, port = self._parent
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port)
        except OSError:
            return f"the parent's name {host} does not resolve either"
        for info in infos:
            reason = forbidden_reason(str(info[4][0]))
            if reason:
                return f"the parent {host}: {reason}"
        return None

    def check_redirect(self, url: URL) -> None:
        """A redirect's target: http(s), on a default or allowed port, and, for an IP
        address (which aiohttp connects to without asking the resolver), not one the
        policy refuses. Raises DestinationRefused."""
        host, port = (url.host or "").lower(), url.port or 0
        if url.scheme not in ("http", "https") or not host:
            raise DestinationRefused(f"redirect to {url.scheme}:// refused (http or https only)")
        if port not in (80, 443) and port not in self.config.allowed_ports:
            raise DestinationRefused(f"redirect to port {port} refused (allowed_ports)")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return  # a name: the resolver checks its addresses
        reason = self.refusal(host, port, [host])
        if reason:
            raise DestinationRefused(f"redirect refused: {reason}")

    def refusal(self, host: str, port: int, addresses: list[str]) -> str | None:
        """Why connecting to these addresses of host:port is refused, or None."""
        if self.explicitly_allowed(host, port):
            return None
        for address in addresses:
            reason = forbidden_reason(address)
            if reason:
                return (
                    f"{host}:{port} is refused: {reason}; name the host in intercept or "
                    "passthrough to allow it"
                )
        return None

    async def resolve(self, host: str, port: int) -> list[str]:
        """Resolved addresses of host that may be used; raises DestinationRefused.

        Behind a parent proxy on another host, a name that does not exist here is left to
        the parent (the usual network where only the proxy has outside DNS), and the list
        is empty: the cache never connects to it itself. A name that resolves here is
        checked. A parent on the cache host itself gets no such names (unless named in
        intercept/passthrough): it could resolve them to the cache host's own services."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            # Only "no such name": a DNS failure (EAI_AGAIN) is not an answer to pass on.
            if self._parent is None or e.errno not in NO_SUCH_NAME:
                raise
            # A host named in intercept/passthrough is the admin's own choice, as always.
            reason = None if self.explicitly_allowed(host, port) else await self._parent_refusal()
            if reason:
                raise DestinationRefused(
                    f"{host} does not resolve here, and names are left to the parent proxy "
                    f"only when it runs elsewhere ({reason}): on the cache host it could "
                    "reach the cache host's own services"
                ) from e
            log.debug("%s does not resolve here (%s): the parent proxy resolves it", host, e)
            return []
        addresses = [str(info[4][0]) for info in infos]
        reason = self.refusal(host, port, addresses)
        if reason:
            raise DestinationRefused(reason)
        return addresses


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing what the destination policy refuses."""

    def __init__(self, policy: DestinationPolicy) -> None:
        self._policy = policy
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        reason = self._policy.refusal(host, port, [r["host"] for r in results])
        if reason:
            raise DestinationRefused(reason)
        return results

    async def close(self) -> None:
        await self._inner.close()
