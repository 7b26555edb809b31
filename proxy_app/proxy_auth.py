"""Proxy users: `Proxy-Authorization: Basic` checked against salted scrypt hashes,
and each user's `allow` list of host/repository globs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import hmac
import os
from collections import OrderedDict

from multidict import MultiMapping

from .config import ProxyUser

SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
VERIFIED_CACHE_SIZE = 1024
# scrypt runs (about 40 ms each) at once, in threads: wrong passwords then cost their
# senders waiting time, not the event loop's (which serves every transfer).
CONCURRENT_VERIFICATIONS = 2


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, expected = encoded.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=256 << 20,
        )
        return hmac.compare_digest(digest, base64.b64decode(expected))
    except (ValueError, binascii.Error):
        return False


class ProxyAuthenticator:
    """Checks Proxy-Authorization. scrypt is slow on purpose, so a header that verified
    once is remembered (by its hash, in memory) and not verified on every CONNECT."""

    def __init__(self, users: tuple[ProxyUser, ...]) -> None:
        self._users = {u.name: u for u in users}
        self._verified: OrderedDict[bytes, ProxyUser] = OrderedDict()
        self._verifying = asyncio.Semaphore(CONCURRENT_VERIFICATIONS)

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    async def authenticate(self, header: str | None) -> ProxyUser | None:
        if not header:
            return None
        key = hashlib.sha256(header.encode()).digest()
        user = self._verified.get(key)
        if user is not None:
            self._verified.move_to_end(key)
            return user
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            name, _, password = (
                base64.b64decode(value.strip(), validate=True).decode().partition(":")
            )
        except (ValueError, binascii.Error):
            return None
        candidate = self._users.get(name)
        if candidate is None:
            return None
        async with self._verifying:
            ok = await asyncio.get_running_loop().run_in_executor(
                None, verify_password, password, candidate.password_hash
            )
        if not ok:
            return None
        self._verified[key] = candidate
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return candidate


def may_access(user: ProxyUser | None, host: str, repository: str) -> bool:
    """Whether `user` may read `host/repository`; users without `allow` may read all."""
    if user is None or not user.allow:
        return True
    target = f"{host}/{repository}".lower()
    return any(fnmatch.fnmatchcase(target, glob.lower()) for glob in user.allow)


def token_scopes_allowed(user: ProxyUser | None, method: str, query: MultiMapping[str]) -> bool:
    """Whether the cache may add its own credentials (auth_registries) to a token request
    of `user`: always for users without `allow`; otherwise only for a GET whose every
    `scope=repository:NAME:...` names a repository the user may read on some registry
    (the token host is not the registry's, so only the repository part is compared)."""
    if user is None or not user.allow:
        return True
    if method not in ("GET", "HEAD"):
        return False
    names = []
    for value in query.getall("scope", []):
        for scope in value.split():
            parts = scope.split(":")
            if len(parts) >= 3 and parts[0].startswith("repository"):
                names.append(":".join(parts[1:-1]).lower())
    repo_globs = [g.split("/", 1)[1].lower() for g in user.allow if "/" in g]
    return bool(names) and all(
        any(fnmatch.fnmatchcase(name, glob) for glob in repo_globs) for name in names
    )
