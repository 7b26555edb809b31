"""One request and its answer, as the access log and the metrics see it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from aiohttp import web

from .upstream_share import RequestShare

access_log = logging.getLogger("registry_cache.access")


@dataclass
class Exchange:
    client: str
    method: str
    host: str
    path: str
    user: str | None = None
    kind: str = "other"
    result: str = "PASS"
    status: int = 0
    sent: int = 0
    note: str = ""
    started: float = field(default_factory=time.monotonic)
    # Set once the response headers went out: an error after that can only cut the line.
    response: web.StreamResponse | None = None
    # The client's shares of upstream connections this request holds (released at its end).
    share: RequestShare | None = None
    door: str = "connect"  # how the client came: CONNECT (or absolute-form) or the mirror
    repository: str = ""  # the repository the request names, once its route is parsed

    @property
    def what(self) -> str:
        """The request's subject for the status page: repository, else the path."""
        return self.repository or self.path.split("?", 1)[0]

    def prepared(self, response: web.StreamResponse) -> None:
        self.response = response

    def log(self, log_format: str) -> None:
        elapsed = time.monotonic() - self.started
        # The query string can carry tokens or signatures: only the path is logged.
        path = self.path.split("?", 1)[0]
        if log_format == "json":
            access_log.info(
                json.dumps(
                    {
                        "client": self.client,
                        "user": self.user,
                        "method": self.method,
                        "host": self.host,
                        "path": path,
                        "status": self.status,
                        "result": self.result,
                        "kind": self.kind,
                        "bytes": self.sent,
                        "seconds": round(elapsed, 4),
                        "door": self.door,
                        **({"note": self.note} if self.note else {}),
                    }
                )
            )
        else:
            access_log.info(
                "%s %s %s %s%s %d %s %d %.3fs %s%s",
                self.client,
                self.user or "-",
                self.method,
                self.host,
                path,
                self.status,
                self.result,
                self.sent,
                elapsed,
                self.door,
                f" ({self.note})" if self.note else "",
            )
