"""The admin API: what the running service holds, and changes to it (`registry-cache ls |
purge | pin | unpin | refresh`), made by the service itself, never by editing its files
behind its back.

It is a small JSON HTTP API on a UNIX socket (`admin_socket`, default
`<cache_dir>/admin.sock`), mode 0660 and owned by the service user, so that root and the
service user (and its group) may use it and nobody else; and, for loopback clients that
authenticate as a proxy user with `admin: true`, under `/admin/` on the main listener
(server.py). Every call runs on the event loop between two requests' steps, so a purge
sees and changes the index in one piece.

    GET  /admin/images[?glob=REGISTRY/REPO-GLOB]   cached images (ls)
    GET  /admin/pins                               pinned references
    GET  /admin/cluster                            the shared store and peers as seen here
    POST /admin/purge|pin|unpin|refresh  {"ref": "registry/repo:tag" or "...@sha256:..."}

Answers are JSON; an error is `{"error": "what to fix"}` with 400 (not a reference),
404 (not cached, not pinned), 409 (pinned: unpin first) or 500.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .config import Config
from .image_graph import CachedImage, link_hosts
from .image_ref import ImageRef, ImageRefInvalid, names_registry, parse_image_ref
from .index import Index, Pin
from .inflight import InflightFetches
from .registry_names import display_name
from .shared_store import BucketUnavailable, SharedStore
from .store_maintenance import STORE_ERRORS, StoreMaintenance
from .tag_policy import TagPolicy

log = logging.getLogger(__name__)

MAX_BODY = 4096
MAX_GLOB = 512
SOCKET_MODE = 0o660


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _ref(body: dict[str, Any]) -> ImageRef:
    text = body.get("ref")
    if not isinstance(text, str):
        raise AdminError(400, 'send {"ref": "registry/repository:tag"}')
    try:
        return parse_image_ref(text)
    except ImageRefInvalid as e:
        raise AdminError(400, f"not an image reference: {e}") from None


def glob_matcher(glob: str | None) -> Callable[[str, str], bool]:
    """Whether a registry (netloc) and repository match a `REGISTRY/REPO-GLOB` (fnmatch:
    `*` spans `/` too). Docker Hub matches as docker.io; a glob whose first component
    names no registry is also tried under docker.io (and docker.io/library)."""
    if not glob:
        return lambda registry, repository: True
    if len(glob) > MAX_GLOB or not glob.isascii() or not glob.isprintable():
        raise AdminError(400, f"{glob[:80]!r} is not a REGISTRY/REPO-GLOB (printable ASCII)")
    globs = [glob]
    first = glob.split("/", 1)[0]
    if not names_registry(first) and not any(c in first for c in "*?["):
        globs.append(f"docker.io/{glob}")
        if "/" not in glob:
            globs.append(f"docker.io/library/{glob}")

    def matches(registry: str, repository: str) -> bool:
        names = {f"{registry}/{repository}", f"{display_name(registry)}/{repository}"}
        return any(fnmatch.fnmatchcase(n, g) for n in names for g in globs)

    return matches


class Admin:
    def __init__(
        self,
        config: Config,
        index: Index,
        maintenance: StoreMaintenance,
        inflight: InflightFetches | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.maintenance = maintenance
        self.graph = maintenance.graph
        self.inflight = inflight
        self.tag_policy = TagPolicy(config.tag_rules, config.tag_ttl)
        # The app's view of the shared store and the peers (app.py), when it has one.
        self.cluster_status: Callable[[], Awaitable[dict[str, Any]]] | None = None
        # The cluster's bucket (store: {type: s3}): a purge removes its tag answers too.
        self.shared: SharedStore | None = None

    # --- start-up -----------------------------------------------------------------------

    def apply_config_pins(self) -> None:
        """Makes the index's `config` pins exactly the config's `pinned` list."""
        pins = []
        for text in self.config.pinned:
            ref = parse_image_ref(text)  # validated by the config already
            pins.append(Pin(ref.registry, ref.repository, ref.reference, "config"))
        added, removed = self.index.set_config_pins(pins)
        if added or removed:
            log.info("pinned (config): %d added, %d removed", added, removed)

    # --- ls -----------------------------------------------------------------------------

    def images(self, glob: str | None = None) -> list[dict[str, Any]]:
        matches = glob_matcher(glob)
        self.index.flush_access()  # pull counts and access times kept in memory
        pinned = self.graph.pinned()
        out = []
        for image in self.graph.images():
            if matches(image.registry, image.repository):
                out.append(self._describe(image, pinned))
        return out

    def _describe(self, image: CachedImage, pinned: set[str]) -> dict[str, Any]:
        size = held = missing = 0
        for digest in sorted(self.graph.closure([image.digest])):
            entry = self.index.blob(digest)
            if entry is None:
                missing += 1
            else:
                size += entry.size
                held += 1
        rules = {
            tag: self.tag_policy.describe(image.registry, image.repository, tag)
            for tag in sorted(image.tags)
        }
        return {
            "registry": display_name(image.registry),
            "repository": image.repository,
            "tags": sorted(image.tags),
            "digest": image.digest,
            "media_type": image.media_type,
            "size": size,
            "blobs": held,
            "missing_blobs": missing,
            "last_pulled": image.last_pulled,
            "pulls": image.pulls,
            "rule": ", ".join(dict.fromkeys(rules.values())) or "-",
            "rules": rules,
            "pinned": image.digest in pinned,
        }

    # --- purge --------------------------------------------------------------------------

    def purge(self, ref: ImageRef) -> dict[str, Any]:
        """Removes the tag answers of ref (for a digest: those naming it in its repository)
        and the blobs of its image that no other cached or pinned image uses."""
        registry, name = ref.registry, ref.repository
        if ref.tag is not None:
            roots = {row.digest for row in self.index.tags_of(registry, name, ref.tag)}
            if not roots:
                raise AdminError(404, f"{ref} is not cached (no tag answer); see registry-cache ls")
        else:
            assert ref.digest is not None
            here = {(i.registry, i.repository, i.digest) for i in self.graph.images()}
            if (registry, name, ref.digest) not in here:
                raise AdminError(404, f"{ref} is not a cached image; see registry-cache ls")
            roots = {ref.digest}
        pinned_by = [
            pin
            for pin in self.index.pins()
            if pin.host == registry and pin.name == name and roots & self.graph.roots_of(pin)
        ]
        if pinned_by:
            how = ", ".join(sorted({f"{p.reference} by {p.source}" for p in pinned_by}))
            raise AdminError(409, f"{ref} is pinned ({how}); unpin it first")
        target = self.graph.closure(roots)
        tags_removed = self.index.drop_tags(registry, name, ref.tag, ref.digest)
        # What stays: every other image (the same manifest under another tag of this
        # repository too), and what pinned images use.
        left = [
            i
            for i in self.graph.images()
            if not (i.registry == registry and i.repository == name and i.digest in roots) or i.tags
        ]
        kept = self.graph.closure(i.digest for i in left) | self.graph.pinned()
        kept_here = self.graph.closure(
            i.digest for i in left if i.registry == registry and i.repository == name
        )
        self.index.remove_links(link_hosts(registry), name, target - kept_here)
        removed: list[str] = []
        freed = 0
        for digest in sorted(target - kept):
            try:
                size = self.maintenance.remove(digest)
            except STORE_ERRORS as e:
                raise AdminError(
                    500,
                    f"purge of {ref} stopped at {digest}: {e}; removed so far: "
                    f"{len(removed)} blobs ({freed} bytes); run it again once the store works",
                ) from e
            if size:
                removed.append(digest)
                freed += size
        kept_shared = sorted(d for d in target & kept if self.index.blob(d) is not None)
        return _purged(ref, tags_removed, removed, freed, kept_shared)

    async def purge_with_bucket(self, ref: ImageRef) -> dict[str, Any]:
        """purge, and in a cluster the bucket's answers of the same tags (every node's):
        otherwise any node, this one too, would answer the purged tag from the bucket
        while upstream is down. The bucket's blobs stay: they are content-addressed,
        verified on every read, and trimmed by shared_max_size. A ref this node does not
        have is still purged from the bucket (run the purge on any node)."""
        try:
            result = self.purge(ref)
        except AdminError as e:
            if e.status != 404 or self.shared is None:
                raise
            missing: AdminError | None = e
            result = _purged(ref)  # nothing here: the bucket may still have its answers
        else:
            missing = None
        if self.shared is None:
            return result
        try:
            gone = await self.shared.drop_tags(ref.registry, ref.repository, ref.tag, ref.digest)
        except BucketUnavailable as e:
            if missing is not None:
                raise AdminError(
                    503, f"{missing.message}; the shared store could not be asked: {e}"
                ) from None
            result["shared_store_error"] = (
                f"its tag answers in the shared store were not removed ({e}); run the same"
                " purge again once the store is reachable"
            )
            return result
        if missing is not None and not gone:
            raise missing
        result["shared_tags_removed"] = gone
        return result

    # --- pins ---------------------------------------------------------------------------

    def pins(self) -> list[dict[str, Any]]:
        return [
            {"ref": str(_pin_ref(pin)), "source": pin.source, "cached": bool(self._held(pin))}
            for pin in self.index.pins()
        ]

    def _held(self, pin: Pin) -> set[str]:
        return {d for d in self.graph.roots_of(pin) if self.graph.is_manifest(d)}

    def pin(self, ref: ImageRef) -> dict[str, Any]:
        pin = Pin(ref.registry, ref.repository, ref.reference, "admin")
        added = self.index.add_pin(pin)
        cached = bool(self._held(pin))
        message = f"{ref} is pinned" + ("" if added else " (it was already)")
        if not cached:
            message += "; it is not cached yet: it is kept once pulled"
        return {
            "ref": str(ref),
            "pinned": True,
            "added": added,
            "cached": cached,
            "message": message,
        }

    def unpin(self, ref: ImageRef) -> dict[str, Any]:
        pin = Pin(ref.registry, ref.repository, ref.reference, "admin")
        removed = self.index.remove_pin(pin)
        by_config = Pin(ref.registry, ref.repository, ref.reference, "config")
        in_config = any(p == by_config for p in self.index.pins())
        if not removed and in_config:
            raise AdminError(
                409,
                f"{ref} is pinned by the config's `pinned` list (registry_cache_pinned); "
                "remove it there and restart the service",
            )
        if not removed:
            raise AdminError(404, f"{ref} is not pinned; see registry-cache pin (no REF)")
        if not in_config:
            # Evictable at once: what was kept over max_size for it goes now.
            self.maintenance.make_room(0, self.inflight)
        message = f"{ref} is no longer pinned by registry-cache pin"
        if in_config:
            message += " (the config's `pinned` list still keeps it)"
        return {"ref": str(ref), "pinned": in_config, "message": message}

    # --- refresh ------------------------------------------------------------------------

    def refresh(self, ref: ImageRef) -> dict[str, Any]:
        """Expires the tag's answers: the next pull revalidates them upstream (a HEAD, with
        that client's credentials), as when tag_ttl has run out; served stale as ever
        while upstream fails."""
        if ref.tag is None:
            raise AdminError(400, f"{ref} names a digest, which never changes: refresh takes a tag")
        rows = self.index.tags_of(ref.registry, ref.repository, ref.tag)
        if not rows:
            raise AdminError(
                404, f"{ref} is not cached (no tag answer): its next pull asks upstream anyway"
            )
        ttl = self.tag_policy.ttl_for(ref.registry, ref.repository, ref.tag)
        self.index.expire_tag(ref.registry, ref.repository, ref.tag, time.time() - ttl)
        return {
            "ref": str(ref),
            "digests": sorted({row.digest for row in rows}),
            "message": f"{ref}: the next pull revalidates the tag upstream",
        }

    # --- HTTP ---------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest, who: str) -> web.Response:
        """One admin request (already admitted: socket permissions, or an admin user)."""
        try:
            result = await self._dispatch(request, who)
        except AdminError as e:
            log.warning("admin: %s %s by %s refused: %s", request.method, request.path, who, e)
            return web.json_response({"error": e.message}, status=e.status)
        return web.json_response(result)

    async def _dispatch(self, request: web.BaseRequest, who: str) -> Any:
        path, method = request.path, request.method
        if path == "/admin/images" and method == "GET":
            return {"images": self.images(request.query.get("glob"))}
        if path == "/admin/pins" and method == "GET":
            return {"pins": self.pins()}
        if path == "/admin/cluster" and method == "GET":
            if self.cluster_status is None:
                return {"node": None, "shared_store": None, "peers": []}
            return await self.cluster_status()
        # purge is the one action that waits (on the bucket); the others are index steps.
        purge = "/admin/purge"
        actions: dict[str, Callable[[ImageRef], dict[str, Any]]] = {
            "/admin/pin": self.pin,
            "/admin/unpin": self.unpin,
            "/admin/refresh": self.refresh,
        }
        if path != purge and path not in actions:
            raise AdminError(
                404,
                "not an admin call: GET /admin/images, /admin/pins, /admin/cluster; "
                "POST /admin/<action>",
            )
        if method != "POST":
            raise AdminError(405, f"{path} takes POST with {{'ref': ...}}")
        ref = _ref(await _json_body(request))
        result = await self.purge_with_bucket(ref) if path == purge else actions[path](ref)
        log.info("admin: %s %s by %s", path.rsplit("/", 1)[1], ref, who)
        return result


def _purged(
    ref: ImageRef,
    tags_removed: int = 0,
    blobs_removed: list[str] | None = None,
    bytes_freed: int = 0,
    kept_shared: list[str] | None = None,
) -> dict[str, Any]:
    """purge's answer (`registry-cache purge --json`)."""
    return {
        "ref": str(ref),
        "tags_removed": tags_removed,
        "blobs_removed": blobs_removed or [],
        "bytes_freed": bytes_freed,
        "kept_shared": kept_shared or [],
    }


def _pin_ref(pin: Pin) -> ImageRef:
    if pin.reference.startswith("sha256:"):
        return ImageRef(pin.host, pin.name, None, pin.reference)
    return ImageRef(pin.host, pin.name, pin.reference, None)


async def _json_body(request: web.BaseRequest) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise AdminError(413, f"the request body is larger than {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise AdminError(413, f"the request body is larger than {MAX_BODY} bytes")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise AdminError(400, 'the body must be JSON: {"ref": "registry/repository:tag"}') from None
    if not isinstance(body, dict):
        raise AdminError(400, 'the body must be a JSON object: {"ref": "..."}')
    return body


def peer(request: web.BaseRequest) -> str:
    """Who is on the other end of the admin socket (uid), for the log."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return "the admin socket"
    with contextlib.suppress(OSError, AttributeError, TypeError, struct.error):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        return f"uid {uid} (pid {pid})"
    return "the admin socket"


class AdminSocket:
    """The admin API on a UNIX socket, mode 0660: root and the service user's group."""

    def __init__(
        self, path: Path, handle: Callable[[web.BaseRequest, str], Awaitable[web.Response]]
    ):
        self.path = path
        self._handle = handle
        self._runner: web.ServerRunner | None = None

    async def _serve(self, request: web.BaseRequest) -> web.Response:
        return await self._handle(request, peer(request))

    async def start(self) -> None:
        self._clear_stale()
        self._runner = web.ServerRunner(web.Server(self._serve, access_log=None))
        await self._runner.setup()
        site = web.UnixSite(self._runner, str(self.path))
        # Made with no access for others from the start (then set to exactly 0660).
        previous = os.umask(0o117)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise OSError(
                e.errno, f"cannot make the admin socket {self.path}: {e.strerror or e}"
            ) from e
        finally:
            os.umask(previous)
        os.chmod(self.path, SOCKET_MODE)
        log.info("admin API on %s", self.path)

    def _clear_stale(self) -> None:
        """A socket left by a process that is gone is removed; a live one is not taken."""
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket (admin_socket)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1)
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink(missing_ok=True)  # nobody answers: left by a crash
            return
        finally:
            probe.close()
        raise OSError(
            errno.EADDRINUSE, f"another registry-cache answers on {self.path} (admin_socket)"
        )

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self.path.unlink(missing_ok=True)
