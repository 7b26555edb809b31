"""The command-line side of the admin API: `registry-cache ls | purge | pin | unpin |
refresh` ask the running service over its admin socket (admin.py) and print its answer,
as a table or, with --json, as it came."""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from .config import Config, human_size
from .image_ref import ImageRefInvalid, parse_image_ref

TIMEOUT = 120.0  # a purge of a large image removes many files
PERMISSION_HINT = "permission denied: run as root or the registry-cache user"


class AdminUnavailable(Exception):
    """The service cannot be asked: the message says what to fix."""


class AdminRefused(Exception):
    """The service said no (status, and its message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def call(
    socket_path: Path, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One admin call; its JSON answer. Raises AdminUnavailable or AdminRefused."""
    connection = _UnixConnection(socket_path, TIMEOUT)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except PermissionError:
        raise AdminUnavailable(f"{PERMISSION_HINT} (socket {socket_path})") from None
    except FileNotFoundError:
        raise AdminUnavailable(
            f"is registry-cache running? socket {socket_path} not found "
            "(admin_socket in the config names another?)"
        ) from None
    except ConnectionRefusedError:
        raise AdminUnavailable(
            f"is registry-cache running? nothing answers on socket {socket_path}"
        ) from None
    except (OSError, http.client.HTTPException) as e:
        raise AdminUnavailable(f"cannot ask registry-cache on {socket_path}: {e}") from None
    finally:
        connection.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        raise AdminUnavailable(f"{socket_path} answered {response.status} with no JSON") from None
    if response.status != 200:
        message = answer.get("error") if isinstance(answer, dict) else None
        raise AdminRefused(response.status, str(message or f"status {response.status}"))
    if not isinstance(answer, dict):
        raise AdminUnavailable(f"{socket_path} answered with something else than an object")
    return answer


def check_config_readable(path: Path) -> bool:
    """Whether the config file is there; one only root and the service user may read (or
    reach) is said so, as for the socket."""
    try:
        with path.open("rb"):
            return True
    except PermissionError:
        raise AdminUnavailable(f"{PERMISSION_HINT} (cannot read {path})") from None
    except OSError:
        return False


# --- output ---------------------------------------------------------------------------


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at)) if at else "-"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def images_table(images: list[dict[str, Any]]) -> str:
    header = ["REGISTRY", "REPOSITORY", "TAGS", "DIGEST", "SIZE", "LAST PULLED", "PULLS"]
    rows = [[*header, "RULE", "PINNED"]]
    for image in images:
        size = human_size(image["size"])
        if image["missing_blobs"]:
            size += f" (+{image['missing_blobs']} not cached)"
        rows.append(
            [
                image["registry"],
                image["repository"],
                ",".join(image["tags"]) or "-",
                image["digest"][:19],
                size,
                _when(image["last_pulled"]),
                str(image["pulls"]),
                image["rule"],
                "yes" if image["pinned"] else "-",
            ]
        )
    return table(rows)


def run(args: argparse.Namespace, config: Config) -> int:
    """One admin command (args.command) against the service that config describes."""
    socket_path = config.admin_socket_path
    command = args.command
    if getattr(args, "ref", None) is not None:
        try:  # the service checks it too; this spares a call that cannot succeed
            parse_image_ref(args.ref)
        except ImageRefInvalid as e:
            print(f"registry-cache {command}: not an image reference: {e}", file=sys.stderr)
            return 2
    try:
        if command == "ls":
            query = f"?{urlencode({'glob': args.glob})}" if args.glob else ""
            answer = call(socket_path, "GET", f"/admin/images{query}")
        elif command == "pin" and args.ref is None:
            answer = call(socket_path, "GET", "/admin/pins")
        else:
            answer = call(socket_path, "POST", f"/admin/{command}", {"ref": args.ref})
    except AdminUnavailable as e:
        print(f"registry-cache {command}: {e}", file=sys.stderr)
        return 1
    except AdminRefused as e:
        print(f"registry-cache {command}: {e}", file=sys.stderr)
        return 2 if e.status == 400 else 1
    if args.json:
        print(json.dumps(answer, indent=2))
    elif command == "ls":
        images = answer["images"]
        print(images_table(images) if images else "no cached images" + _matching(args.glob))
    elif "pins" in answer:
        pins = answer["pins"]
        rows = [["PINNED", "BY", "CACHED"]]
        rows += [[p["ref"], p["source"], "yes" if p["cached"] else "no"] for p in pins]
        print(table(rows) if pins else "nothing is pinned")
    elif command == "purge":
        kept = answer["kept_shared"]
        print(
            f"purged {answer['ref']}: {answer['tags_removed']} tag answers, "
            f"{len(answer['blobs_removed'])} blobs ({human_size(answer['bytes_freed'])}) removed"
            + (f"; {len(kept)} blobs kept, other cached images use them" if kept else "")
            + (
                f"; {answer['shared_tags_removed']} tag answers removed from the shared store"
                if "shared_tags_removed" in answer
                else ""
            )
        )
        if "shared_store_error" in answer:
            print(f"registry-cache purge: {answer['shared_store_error']}", file=sys.stderr)
    else:
        print(answer["message"])
    # A purge half done (the shared store unreachable): a script must not take it for whole.
    return 1 if "shared_store_error" in answer else 0


def _matching(glob: str | None) -> str:
    return f" match {glob}" if glob else ""
