"""The SQLite index: what the store holds (size, media type, last access), tag answers,
links, pulls and pinned images.

WAL mode with one transaction per change keeps it consistent through a crash. Access
times and pull counts are updated in memory and flushed in batches, so a cache HIT costs
no disk write.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    media_type  TEXT,
    stored_at   REAL NOT NULL,
    last_access REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS blobs_by_access ON blobs(last_access);
CREATE TABLE IF NOT EXISTS tags (
    host       TEXT NOT NULL,
    name       TEXT NOT NULL,
    tag        TEXT NOT NULL,
    variant    TEXT NOT NULL,
    digest     TEXT NOT NULL,
    media_type TEXT NOT NULL,
    checked_at REAL NOT NULL,
    PRIMARY KEY (host, name, tag, variant)
);
-- Where each digest was seen: registry (Origin.key), repository, and, for a manifest,
-- the media type that registry gave it (another registry's label never replaces it), and
-- how often and when a client last pulled (GET) the manifest there.
CREATE TABLE IF NOT EXISTS links (
    host        TEXT NOT NULL,
    name        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    media_type  TEXT,
    linked_at   REAL NOT NULL,
    pulls       INTEGER NOT NULL DEFAULT 0,
    last_pulled REAL,
    PRIMARY KEY (host, name, digest)
);
CREATE INDEX IF NOT EXISTS links_by_digest ON links(digest);
CREATE TABLE IF NOT EXISTS stats (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- Images kept whatever max_size and inactive say: registry (netloc, as tags name it),
-- repository, tag or digest; source `admin` (registry-cache pin) or `config` (pinned:).
CREATE TABLE IF NOT EXISTS pins (
    host      TEXT NOT NULL,
    name      TEXT NOT NULL,
    reference TEXT NOT NULL,
    source    TEXT NOT NULL,
    pinned_at REAL NOT NULL,
    PRIMARY KEY (host, name, reference, source)
);
"""


@dataclass(frozen=True)
class TagEntry:
    digest: str
    media_type: str
    checked_at: float


@dataclass(frozen=True)
class Link:
    media_type: str | None


@dataclass(frozen=True)
class TagRow:
    host: str
    name: str
    tag: str
    digest: str
    media_type: str
    checked_at: float


@dataclass(frozen=True)
class ManifestLink:
    host: str  # Origin.key: netloc, or http://netloc for a plain-HTTP registry
    name: str
    digest: str
    media_type: str
    pulls: int
    last_pulled: float | None


@dataclass(frozen=True)
class Pin:
    host: str
    name: str
    reference: str  # a tag or a digest
    source: str  # "admin" or "config"


# PRAGMA user_version: 0 before links existed, 1 once an older cache's links are rebuilt,
# 2 once links count pulls (columns added in place: nothing to rebuild).
LINKS_VERSION = 1
SCHEMA_VERSION = 2


@dataclass(frozen=True)
class BlobEntry:
    digest: str
    size: int
    media_type: str | None
    last_access: float


class Index:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._pending_access: dict[str, float] = {}
        # (links.host, name, digest) -> (pulls, last pulled) not yet written
        self._pending_pulls: dict[tuple[str, str, str], tuple[int, float]] = {}
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        self._add_pull_columns()
        # A cache made before links existed: its links are to be rebuilt (needs the store,
        # so the app does it: store_maintenance.link_tagged_content). A new one has none.
        self.needs_links = version < LINKS_VERSION and self.count() > 0
        if not self.needs_links and version < SCHEMA_VERSION:
            self.set_schema_version()

    def _add_pull_columns(self) -> None:
        """Version 2: a links table made before pulls were counted gets their columns."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(links)")}
        with self._db:
            self._db.execute("BEGIN")
            if "pulls" not in columns:
                self._db.execute("ALTER TABLE links ADD COLUMN pulls INTEGER NOT NULL DEFAULT 0")
            if "last_pulled" not in columns:
                self._db.execute("ALTER TABLE links ADD COLUMN last_pulled REAL")

    @classmethod
    def open_or_rebuild(cls, path: Path) -> tuple[Index, bool]:
        """Opens the index; a corrupt file is moved aside and a new one made (True)."""
        try:
            index = cls(path)
            index._db.execute("SELECT count(*) FROM blobs").fetchone()
            return index, False
        except sqlite3.DatabaseError as e:
            log.error("index %s is unreadable (%s); rebuilding it from the store", path, e)
            for suffix in ("", "-wal", "-shm"):
                p = path.with_name(path.name + suffix)
                if p.exists():
                    p.replace(p.with_name(p.name + ".corrupt"))
            return cls(path), True

    def set_schema_version(self) -> None:
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self.needs_links = False

    def close(self) -> None:
        self.flush_access()
        self._db.close()

    # --- blobs --------------------------------------------------------------------------

    def add_blob(self, digest: str, size: int, media_type: str | None = None) -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO blobs(digest, size, media_type, stored_at, last_access) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(digest) DO UPDATE SET "
            "size=excluded.size, last_access=excluded.last_access, "
            # Whether it is a manifest; what type each registry gives it is in its link.
            "media_type=coalesce(blobs.media_type, excluded.media_type)",
            (digest, size, media_type, now, now),
        )

    def add_blobs(self, blobs: list[tuple[str, int, str | None]]) -> None:
        """Many blobs in one transaction (start-up adoption of unindexed files)."""
        if not blobs:
            return
        now = time.time()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO blobs(digest, size, media_type, stored_at, last_access) "
                "VALUES (?, ?, ?, ?, ?)",
                [(d, size, media, now, now) for d, size, media in blobs],
            )

    def remove_blobs(self, digests: set[str]) -> None:
        if not digests:
            return
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM blobs WHERE digest=?", [(d,) for d in digests])
            self._db.executemany("DELETE FROM links WHERE digest=?", [(d,) for d in digests])

    def blob(self, digest: str) -> BlobEntry | None:
        row = self._db.execute(
            "SELECT digest, size, media_type, last_access FROM blobs WHERE digest=?", (digest,)
        ).fetchone()
        return BlobEntry(*row) if row else None

    def touch(self, digest: str) -> None:
        self._pending_access[digest] = time.time()

    def flush_access(self) -> None:
        self._flush_pulls()
        if not self._pending_access:
            return
        pending, self._pending_access = self._pending_access, {}
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "UPDATE blobs SET last_access=max(last_access, ?) WHERE digest=?",
                    [(t, d) for d, t in pending.items()],
                )
        except sqlite3.Error:
            # Kept for the next flush: a disk full for a while must not make the least
            # recently used order forget what was read meanwhile.
            for digest, at in pending.items():
                self._pending_access[digest] = max(at, self._pending_access.get(digest, at))
            raise

    def remove_blob(self, digest: str) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM blobs WHERE digest=?", (digest,))
            self._db.execute("DELETE FROM links WHERE digest=?", (digest,))

    def restore_blob(self, entry: BlobEntry) -> None:
        """Puts back an entry just removed, as it was (its file could not be deleted)."""
        self._db.execute(
            "INSERT OR IGNORE INTO blobs(digest, size, media_type, stored_at, last_access) "
            "VALUES (?, ?, ?, ?, ?)",
            (entry.digest, entry.size, entry.media_type, entry.last_access, entry.last_access),
        )

    def total_size(self) -> int:
        return int(self._db.execute("SELECT coalesce(sum(size), 0) FROM blobs").fetchone()[0])

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM blobs").fetchone()[0])

    def least_recently_used(self, limit: int = 100, offset: int = 0) -> list[BlobEntry]:
        """The `limit` least recently used blobs after the first `offset` (those skipped)."""
        rows = self._db.execute(
            "SELECT digest, size, media_type, last_access FROM blobs "
            "ORDER BY last_access, digest LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        return [BlobEntry(*r) for r in rows]

    def all_digests(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT digest FROM blobs")}

    def last_accesses(self) -> dict[str, float]:
        """Every stored blob's last access (flush_access first for the latest)."""
        return {r[0]: r[1] for r in self._db.execute("SELECT digest, last_access FROM blobs")}

    # --- counters that outlive the process (for `registry-cache status`) -------------------

    def add_stats(self, deltas: dict[str, int]) -> None:
        if not deltas:
            return
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO stats(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                list(deltas.items()),
            )

    def stats(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT key, value FROM stats").fetchall())

    def oldest_access(self) -> float | None:
        row = self._db.execute("SELECT min(last_access) FROM blobs").fetchone()
        return row[0] if row else None

    # --- tags ---------------------------------------------------------------------------

    def tag(self, host: str, name: str, tag: str, variant: str) -> TagEntry | None:
        row = self._db.execute(
            "SELECT digest, media_type, checked_at FROM tags "
            "WHERE host=? AND name=? AND tag=? AND variant=?",
            (host, name, tag, variant),
        ).fetchone()
        return TagEntry(*row) if row else None

    def tag_variants(self, host: str, name: str, tag: str) -> dict[str, TagEntry]:
        rows = self._db.execute(
            "SELECT variant, digest, media_type, checked_at FROM tags "
            "WHERE host=? AND name=? AND tag=?",
            (host, name, tag),
        ).fetchall()
        return {row[0]: TagEntry(*row[1:]) for row in rows}

    def set_tag(
        self,
        host: str,
        name: str,
        tag: str,
        variant: str,
        digest: str,
        media_type: str,
        checked_at: float | None = None,
    ) -> None:
        """A tag's answer, checked now (or at checked_at: another node's check)."""
        self._db.execute(
            "INSERT OR REPLACE INTO tags(host, name, tag, variant, digest, media_type, checked_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                host,
                name,
                tag,
                variant,
                digest,
                media_type,
                time.time() if checked_at is None else checked_at,
            ),
        )

    def knows_host(self, host: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM tags WHERE host=? LIMIT 1", (host,)).fetchone()
            is not None
        )

    def drop_tag(self, host: str, name: str, tag: str, variant: str) -> None:
        self._db.execute(
            "DELETE FROM tags WHERE host=? AND name=? AND tag=? AND variant=?",
            (host, name, tag, variant),
        )

    # --- links: which registry and repository each digest was seen in ------------------

    def link(self, host: str, name: str, digest: str) -> Link | None:
        row = self._db.execute(
            "SELECT media_type FROM links WHERE host=? AND name=? AND digest=?",
            (host, name, digest),
        ).fetchone()
        return Link(row[0]) if row else None

    def add_link(self, host: str, name: str, digest: str, media_type: str | None = None) -> None:
        """Records that host has digest in repository name (as media_type, a manifest)."""
        self._db.execute(
            "INSERT INTO links(host, name, digest, media_type, linked_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(host, name, digest) DO UPDATE SET "
            "media_type=coalesce(excluded.media_type, links.media_type)",
            (host, name, digest, media_type, time.time()),
        )

    def add_links(self, links: list[tuple[str, str, str, str | None]]) -> None:
        """Many links in one transaction (rebuilding an older cache's)."""
        if not links:
            return
        now = time.time()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO links(host, name, digest, media_type, linked_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(*link, now) for link in links],
            )

    def all_tags(self) -> list[tuple[str, str, str, str]]:
        """(host, name, digest, media_type) of every tag answer."""
        return list(self._db.execute("SELECT DISTINCT host, name, digest, media_type FROM tags"))

    def tag_rows(self) -> list[TagRow]:
        """Every tag answer (one per Accept variant)."""
        return [
            TagRow(*row)
            for row in self._db.execute(
                "SELECT host, name, tag, digest, media_type, checked_at FROM tags"
            )
        ]

    def tags_of(self, host: str, name: str, tag: str) -> list[TagRow]:
        return [
            TagRow(*row)
            for row in self._db.execute(
                "SELECT host, name, tag, digest, media_type, checked_at FROM tags "
                "WHERE host=? AND name=? AND tag=?",
                (host, name, tag),
            )
        ]

    def drop_tags(self, host: str, name: str, tag: str | None, digest: str | None = None) -> int:
        """Removes the answers of a tag (every variant), or those naming digest in a
        repository (tag None); how many went."""
        if tag is not None:
            cursor = self._db.execute(
                "DELETE FROM tags WHERE host=? AND name=? AND tag=?", (host, name, tag)
            )
        else:
            cursor = self._db.execute(
                "DELETE FROM tags WHERE host=? AND name=? AND digest=?", (host, name, digest)
            )
        return cursor.rowcount

    def expire_tag(self, host: str, name: str, tag: str, checked_at: float) -> int:
        """Makes a tag's answers look checked at `checked_at` at the latest (refresh)."""
        cursor = self._db.execute(
            "UPDATE tags SET checked_at=min(checked_at, ?) WHERE host=? AND name=? AND tag=?",
            (checked_at, host, name, tag),
        )
        return cursor.rowcount

    # --- pulls of manifests (counted in memory, written with the access times) ------------

    def count_pull(self, host: str, name: str, digest: str) -> None:
        key = (host, name, digest)
        count, _ = self._pending_pulls.get(key, (0, 0.0))
        self._pending_pulls[key] = (count + 1, time.time())

    def _flush_pulls(self) -> None:
        if not self._pending_pulls:
            return
        pending, self._pending_pulls = self._pending_pulls, {}
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "UPDATE links SET pulls=pulls+?, last_pulled=max(coalesce(last_pulled, 0), ?)"
                    " WHERE host=? AND name=? AND digest=?",
                    [(n, at, *key) for key, (n, at) in pending.items()],
                )
        except sqlite3.Error:
            for key, (n, at) in pending.items():  # kept for the next flush
                count, last = self._pending_pulls.get(key, (0, 0.0))
                self._pending_pulls[key] = (count + n, max(at, last))
            raise

    def manifest_links(self) -> list[ManifestLink]:
        """Every link of a manifest (a digest with the media type its registry gave it)."""
        return [
            ManifestLink(*row)
            for row in self._db.execute(
                "SELECT host, name, digest, media_type, pulls, last_pulled FROM links "
                "WHERE media_type IS NOT NULL"
            )
        ]

    def remove_links(self, hosts: tuple[str, ...], name: str, digests: set[str]) -> None:
        if not digests:
            return
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "DELETE FROM links WHERE host=? AND name=? AND digest=?",
                [(host, name, d) for host in hosts for d in digests],
            )

    # --- pinned images ------------------------------------------------------------------

    def pins(self) -> list[Pin]:
        return [
            Pin(*row)
            for row in self._db.execute(
                "SELECT host, name, reference, source FROM pins ORDER BY host, name, reference"
            )
        ]

    def add_pin(self, pin: Pin) -> bool:
        """True when it was not pinned so already."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO pins(host, name, reference, source, pinned_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (pin.host, pin.name, pin.reference, pin.source, time.time()),
        )
        return cursor.rowcount > 0

    def remove_pin(self, pin: Pin) -> bool:
        """True when it was pinned so."""
        cursor = self._db.execute(
            "DELETE FROM pins WHERE host=? AND name=? AND reference=? AND source=?",
            (pin.host, pin.name, pin.reference, pin.source),
        )
        return cursor.rowcount > 0

    def set_config_pins(self, pins: list[Pin]) -> tuple[int, int]:
        """Makes the pins of source `config` exactly `pins`: (added, removed)."""
        wanted = {(p.host, p.name, p.reference) for p in pins}
        now = time.time()
        with self._db:
            self._db.execute("BEGIN")
            held = {
                tuple(row)
                for row in self._db.execute(
                    "SELECT host, name, reference FROM pins WHERE source='config'"
                )
            }
            self._db.executemany(
                "DELETE FROM pins WHERE host=? AND name=? AND reference=? AND source='config'",
                sorted(held - wanted),
            )
            self._db.executemany(
                "INSERT INTO pins(host, name, reference, source, pinned_at) "
                "VALUES (?, ?, ?, 'config', ?)",
                [(*key, now) for key in sorted(wanted - held)],
            )
        return len(wanted - held), len(held - wanted)
