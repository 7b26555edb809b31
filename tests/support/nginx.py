"""nginx in front of a test registry, compressing its answers the way front ends do.

Two servers in one nginx process, both TLS on 127.0.0.1, both proxying to the registry:

- `polite` (gzip.rc.test): `gzip on; gzip_proxied any; gzip_types *`: every answer, JSON
  and blobs alike, is gzipped for a client that sends `Accept-Encoding: gzip`, as a CDN
  or a registry's own front end configured that way does. Identity when asked for.
- `forced` (gzforce.rc.test): the same behind a second hop that always asks for gzip, so
  the client gets gzip whatever it asked for (a misconfigured CDN, a front end behind
  another proxy that rewrote `Accept-Encoding`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .net import free_port, stop_process, wait_for_port
from .pki import Issued

POLITE_HOST = "gzip.rc.test"
FORCED_HOST = "gzforce.rc.test"


class GzipFronts:
    def __init__(self, workdir: Path, backend: str, cert: Issued) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.polite_port = free_port()
        self.forced_port = free_port()
        temp = self.dir / "temp"
        temp.mkdir(exist_ok=True)
        self.access_log = self.dir / "access.log"
        tls = f"""
        ssl_certificate {cert.cert_path};
        ssl_certificate_key {cert.key_path};
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_buffering off;
        proxy_set_header Connection "";"""
        self.config_path = self.dir / "nginx.conf"
        self.config_path.write_text(
            f"""
user root;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format front '$server_port "$request" $status "$http_accept_encoding" '
                     '"$sent_http_content_encoding"';
    access_log {self.access_log} front;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    gzip on;
    gzip_proxied any;
    gzip_types *;
    gzip_min_length 1;
    server {{
        listen 127.0.0.1:{self.polite_port} ssl;
        server_name {POLITE_HOST};{tls}
        location / {{
            proxy_set_header Host {backend};
            proxy_pass https://{backend};
        }}
    }}
    server {{
        listen 127.0.0.1:{self.forced_port} ssl;
        server_name {FORCED_HOST};{tls}
        gzip off;
        location / {{
            proxy_set_header Host {POLITE_HOST}:{self.polite_port};
            proxy_set_header Accept-Encoding gzip;
            proxy_pass https://127.0.0.1:{self.polite_port};
        }}
    }}
}}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def polite(self) -> str:
        return f"{POLITE_HOST}:{self.polite_port}"

    @property
    def forced(self) -> str:
        return f"{FORCED_HOST}:{self.forced_port}"

    def start(self) -> GzipFronts:
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(self.config_path), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "stderr.log").open("ab"),
            stdin=subprocess.DEVNULL,
        )
        try:
            for port in (self.polite_port, self.forced_port):
                wait_for_port(port, timeout=10)
        except TimeoutError as e:
            self.stop()
            raise RuntimeError("nginx did not start: " + self.errors()) from e
        return self

    def errors(self) -> str:
        return "".join(
            (self.dir / n).read_text(errors="replace")
            for n in ("stderr.log", "error.log")
            if (self.dir / n).exists()
        )

    def log(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    def stop(self) -> None:
        stop_process(self.proc, grace=5)
        self.proc = None
