#!/usr/bin/env python3
"""`make config`: asks for the inventory variables and writes inventory/.

Each question is named after its variable (REGISTRY_CACHE_HOST, REGISTRY_CACHE_PORT, ...).
A variable set in the environment is taken without asking; the others are asked on the
terminal (or read a line each from standard input when it is not a terminal), showing the
default in brackets: an empty answer keeps it. Defaults are the earlier answers when the
files exist, else the roles' defaults. A bad answer is rejected with the reason and asked
again.

REGISTRY_CACHE_HOST may name several cache hosts (space-separated): they become the
registry_cache group, a cluster sharing one CA and, with REGISTRY_CACHE_S3_ENDPOINT, one
S3 bucket (REGISTRY_CACHE_S3_BUCKET, _REGION, _PREFIX, _ACCESS_KEY_ID and
_SECRET_ACCESS_KEY, the last one a secret; REGISTRY_CACHE_SHARED_MAX_SIZE its size
bound), written as registry_cache_store (and registry_cache_store_secret_access_key in
the secrets file). REGISTRY_CACHE_ADDRESS then gives each host's address, in order.

Besides the cache's settings it asks for the client hosts, each list written as an
inventory group (a host may be in several; the cache host may be one of them):
  REGISTRY_CACHE_CLIENTS             docker_clients      Docker hosts (default: the cache hosts)
  REGISTRY_CACHE_CONTAINERD_CLIENTS  containerd_clients  containerd / Kubernetes nodes that
                                                         pull through the cache as a registry
                                                         mirror (default: none)
  REGISTRY_CACHE_PODMAN_CLIENTS      podman_clients      podman, buildah, skopeo, CRI-O hosts
                                                         (default: none)
and how the Docker hosts use the cache, REGISTRY_CACHE_DOCKER_MODE: proxy (the default: an
HTTP(S) proxy for every registry) or mirror (a registry mirror), written as the variable
docker_client_mode.

Writes:
  inventory/hosts.yml                      the groups registry_cache, docker_clients,
                                           containerd_clients and podman_clients (written
                                           also when empty)
  inventory/group_vars/all/vars.yml        the settings (not secret)
  inventory/group_vars/all/secrets.yml     registry credentials, the S3 store's secret
                                           access key, and the parent proxy URL
                                           when it holds user:password@: mode 0600,
                                           git-ignored, vault-encrypted when a vault
                                           password file is given
                                           (REGISTRY_CACHE_VAULT_PASSWORD_FILE or
                                           --vault-password-file)
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy_app.config import (  # noqa: E402  (needs the repository on sys.path)
    ConfigError,
    parse_auth_registries,
    parse_duration,
    parse_proxy_url,
    parse_size,
)

VAULT_HEADER = "$ANSIBLE_VAULT;"
NONE_WORDS = {"none", "-"}
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
DEFAULT_ALLOWED_CLIENTS = (
    "127.0.0.0/8 ::1/128 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 100.64.0.0/10 fc00::/7"
)
HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# The client host lists: the question, and the inventory group its hosts are written to.
CLIENT_GROUPS = {
    "REGISTRY_CACHE_CLIENTS": "docker_clients",
    "REGISTRY_CACHE_CONTAINERD_CLIENTS": "containerd_clients",
    "REGISTRY_CACHE_PODMAN_CLIENTS": "podman_clients",
}
# Answers written as a variable of another name than the question's, lower-cased.
VARIABLE_NAMES = {
    "REGISTRY_CACHE_DOCKER_MODE": "docker_client_mode",
    "REGISTRY_CACHE_S3_SECRET_ACCESS_KEY": "registry_cache_store_secret_access_key",
}
# The S3 store's settings in registry_cache_store, each asked as REGISTRY_CACHE_S3_<KEY>
# (the secret access key apart, in the secrets file).
S3_KEYS = ("endpoint", "bucket", "region", "prefix", "access_key_id")
QUESTION_NAMES = {var: env for env, var in VARIABLE_NAMES.items()}
# A URL's scheme, its user information (before the first @ of the authority), the rest.
USERINFO_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/@\s]*)@(.*)", re.S)


class Invalid(ValueError):
    """An answer that cannot be used; the message says why."""


# --- validators: take the answer as typed, return the value to store ----------------------


def v_host(text: str) -> str:
    if not HOST_RE.fullmatch(text):
        raise Invalid(f"{text!r} is not a host name or IPv4 address")
    return text


def v_hosts(text: str) -> list[str]:
    if text.strip().lower() in NONE_WORDS:
        return []
    return [v_host(h) for h in text.replace(",", " ").split()]


def v_cache_hosts(text: str) -> list[str]:
    hosts = v_hosts(text)
    if not hosts:
        raise Invalid("give at least one cache host")
    if len(set(hosts)) != len(hosts):
        raise Invalid(f"{text!r} names a host twice")
    return hosts


S3_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
S3_ENDPOINT_RE = re.compile(r"https?://[A-Za-z0-9_.:\[\]-]+/?")


def v_s3_endpoint(text: str) -> str:
    t = text.strip()
    if t.lower() in NONE_WORDS:
        return ""
    if not S3_ENDPOINT_RE.fullmatch(t):
        raise Invalid(f"{t!r} is not an S3 endpoint URL such as http://seaweed.example:8333")
    return t.rstrip("/")


def v_s3_bucket(text: str) -> str:
    t = text.strip()
    if not S3_BUCKET_RE.fullmatch(t):
        raise Invalid(f"{t!r} is not a bucket name (3-63 of a-z, 0-9, '.' and '-')")
    return t


def v_word_or_none(text: str) -> str:
    t = text.strip()
    if t.lower() in NONE_WORDS:
        return ""
    if any(c.isspace() for c in t):
        raise Invalid(f"{t!r} has spaces")
    return t


def v_size_or_none(text: str) -> str:
    if text.strip().lower() in NONE_WORDS:
        return ""
    return v_size(text)


def v_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise Invalid(f"{text!r} is not a port number 1-65535")
    return int(text)


def v_abs_path(text: str) -> str:
    if not text.startswith("/") or any(c.isspace() for c in text):
        raise Invalid(f"{text!r} is not an absolute path (without spaces)")
    return text.rstrip("/") or "/"


def v_size(text: str) -> str:
    try:
        if parse_size(text) <= 0:
            raise Invalid("the cache size must be larger than 0")
    except ConfigError as e:
        raise Invalid(str(e)) from None
    return text.strip().lower()


def v_duration(text: str) -> str:
    try:
        parse_duration(text)
    except ConfigError as e:
        raise Invalid(str(e)) from None
    return text.strip().lower()


def v_networks(text: str) -> list[str]:
    items = text.replace(",", " ").split()
    if not items:
        raise Invalid("give at least one network, e.g. 10.0.0.0/8")
    result = []
    for item in items:
        try:
            result.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise Invalid(f"{item!r} is not a network in CIDR form (e.g. 10.0.0.0/8)") from None
    return result


def v_auth(text: str) -> str:
    if text.strip().lower() in NONE_WORDS:
        return ""
    try:
        parse_auth_registries(text)
    except ConfigError as e:
        raise Invalid(f"{e}; e.g. auth.docker.io:myuser:mytoken ghcr.io:me:ghp_token") from None
    return " ".join(text.split())


def v_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in {"y", "yes", "true", "1", "on"}:
        return True
    if t in {"n", "no", "false", "0", "off"}:
        return False
    raise Invalid(f"{text!r} is not yes or no")


def v_proxy_url(text: str) -> str:
    if text.strip().lower() in NONE_WORDS:
        return ""
    try:
        return parse_proxy_url(text.strip()) or ""
    except ConfigError:
        # Not the parser's message: it would repeat the password.
        raise Invalid(
            f"{mask_url(text.strip())!r} is not a proxy URL such as http://proxy.example:3128"
            " (or http://user:password@proxy.example:3128)"
        ) from None


def has_userinfo(url: str) -> bool:
    """Whether a URL carries credentials (user:password@ or a token@)."""
    return bool(USERINFO_RE.match(url))


def v_serial(text: str) -> int | str:
    t = text.strip()
    if re.fullmatch(r"[1-9]\d*", t):
        return int(t)
    if re.fullmatch(r"([1-9]\d?|100)%", t):
        return t
    raise Invalid(f"{text!r} is not a number of hosts (2) or a percentage (25%)")


def v_ca_source(text: str) -> str:
    t = text.strip().lower()
    if t not in {"inventory", "url"}:
        raise Invalid(f"{text!r} is neither inventory nor url")
    return t


def v_docker_mode(text: str) -> str:
    t = text.strip().lower()
    if t not in {"proxy", "mirror"}:
        raise Invalid(f"{text!r} is neither proxy nor mirror")
    return t


def variable_name(env: str) -> str:
    """The inventory variable an answer is written to."""
    return VARIABLE_NAMES.get(env, env.lower())


def question_name(variable: str) -> str:
    """The question an inventory variable answers."""
    return QUESTION_NAMES.get(variable.lower(), variable.upper())


# --- the questions ---------------------------------------------------------------------------


@dataclass
class Question:
    env: str
    prompt: str
    validate: Callable[[str], Any]
    default: str  # as the user would type it
    secret: bool = False  # read without echo, shown only through `mask`
    mask: Callable[[str], str] | None = None  # default: mask_auth


def render(value: Any) -> str:
    """A stored value as the user would type it (the form defaults are shown in)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " ".join(str(v) for v in value) or "none"
    if value in (None, ""):
        return "none"
    return str(value)


def mask_auth(text: str) -> str:
    return " ".join(
        f"{parts[0]}:{parts[1]}:****" if len(parts) == 3 else "****"
        for parts in (item.split(":", 2) for item in text.split())
    )


def mask_url(text: str) -> str:
    """A URL with its password (or a user-less token) replaced by ****."""
    m = USERINFO_RE.match(text)
    if not m:
        return text
    user, colon, _ = m.group(2).partition(":")
    return f"{m.group(1)}{user + ':****' if colon else '****'}@{m.group(3)}"


class Prompter:
    def __init__(self, environ: dict[str, str], stdin: Any, stdout: Any) -> None:
        self.environ = environ
        self.stdin = stdin
        self.stdout = stdout
        self.tty = bool(getattr(stdin, "isatty", lambda: False)())

    def _read(self, prompt: str, secret: bool) -> str | None:
        if self.tty:
            try:
                return getpass.getpass(prompt) if secret else input(prompt)
            except EOFError:
                return None
        self.stdout.write(prompt)
        self.stdout.flush()
        line = self.stdin.readline()
        self.stdout.write("\n")
        return None if line == "" else line.rstrip("\n")

    @staticmethod
    def _mask(q: Question, text: str) -> str:
        if not q.secret:
            return text
        if q.mask is not None:
            return q.mask(text)
        return mask_auth(text) if ":" in text else text

    def ask(self, q: Question) -> Any:
        if q.env in self.environ:
            try:
                value = q.validate(self.environ[q.env].strip())
            except Invalid as e:
                raise SystemExit(f"make config: {q.env} from the environment: {e}") from None
            shown = self._mask(q, render(value)) if value else render(value)
            self.stdout.write(f"{q.env} = {shown} (from the environment)\n")
            return value
        shown_default = self._mask(q, q.default)
        prompt = f"{q.prompt}\n{q.env} [{shown_default}]: "
        while True:
            answer = self._read(prompt, q.secret)
            if answer is None:  # end of input: the default
                self.stdout.write(f"  (end of input: {q.env} = {shown_default})\n")
                return q.validate(q.default)
            answer = answer.strip() or q.default
            try:
                return q.validate(answer)
            except Invalid as e:
                self.stdout.write(f"  not accepted: {e}\n  please answer again.\n")


# --- reading what an earlier run wrote ---------------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    """An earlier file's mapping; {} when there is none. A file that cannot be read stops
    make config: it would be overwritten, and whatever was added to it by hand lost."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise SystemExit(f"make config: cannot read {path}: {e.strerror}") from None
    return _mapping(path, text)


def _mapping(path: Path, text: str | bytes) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SystemExit(
            f"make config: {path} is not valid YAML ({e}); fix it, or move it away to start anew"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SystemExit(
            f"make config: {path} must be a mapping of variables; fix it, or move it away"
        )
    return data


def vault_secret(password_file: str | None) -> Any:
    if not password_file:
        return None
    from ansible.parsing.dataloader import DataLoader
    from ansible.parsing.vault import get_file_vault_secret

    if not Path(password_file).is_file():
        raise SystemExit(f"make config: vault password file {password_file} does not exist")
    secret = get_file_vault_secret(filename=password_file, loader=DataLoader())
    secret.load()
    return secret


def vault_lib(secret: Any) -> Any:
    from ansible.constants import DEFAULT_VAULT_ID_MATCH
    from ansible.parsing.vault import VaultLib

    return VaultLib([(DEFAULT_VAULT_ID_MATCH, secret)])


def read_secrets(path: Path, secret: Any) -> tuple[dict[str, Any], bool]:
    """Returns (values, readable)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return {}, True
    if raw.startswith(VAULT_HEADER.encode()):
        if secret is None:
            return {}, False
        try:
            raw = vault_lib(secret).decrypt(raw)
        except Exception:  # wrong password: keep the file, ask anew
            return {}, False
    return _mapping(path, raw), True


@dataclass
class Earlier:
    """What an earlier run (or a hand) left in the inventory."""

    answers: dict[str, Any]  # by question name, in stored form
    host_vars: dict[str, Any]  # per host
    hosts: dict[str, Any]  # hosts.yml as it was
    variables: dict[str, Any]  # vars.yml as it was
    secrets: dict[str, Any]  # secrets.yml as it was ({} when it could not be read)
    secrets_readable: bool


def earlier_answers(inv: Path, secret: Any) -> Earlier:
    hosts = load_yaml(inv / "hosts.yml")
    children = (hosts.get("all") or {}).get("children") or {}
    cache_hosts = (children.get("registry_cache") or {}).get("hosts") or {}
    client_hosts = {
        env: (children.get(group) or {}).get("hosts") or {} for env, group in CLIENT_GROUPS.items()
    }
    # A host in several groups: its variables from each, the later group's winning (as in
    # Ansible, which reads the groups in this order).
    host_vars: dict[str, Any] = {}
    for group in (cache_hosts, *client_hosts.values()):
        for name, hvars in group.items():
            host_vars.setdefault(str(name), {}).update(hvars or {})
    found: dict[str, Any] = {}
    if cache_hosts:
        found["REGISTRY_CACHE_HOST"] = [str(h) for h in cache_hosts]
        found["REGISTRY_CACHE_ADDRESS"] = [
            str((hvars or {}).get("registry_cache_address", h)) for h, hvars in cache_hosts.items()
        ]
    if hosts:
        for env, members in client_hosts.items():
            found[env] = [str(h) for h in members]
    variables = load_yaml(inv / "group_vars" / "all" / "vars.yml")
    for key, value in variables.items():
        found[question_name(key)] = value
    store = variables.get("registry_cache_store")
    if isinstance(store, dict) and store.get("type") == "s3":
        for key in S3_KEYS:
            found[f"REGISTRY_CACHE_S3_{key.upper()}"] = store.get(key) or ""
    secrets, readable = read_secrets(inv / "group_vars" / "all" / "secrets.yml", secret)
    for key, value in secrets.items():
        found[question_name(key)] = value
    return Earlier(found, host_vars, hosts, variables, secrets, readable)


# --- writing ---------------------------------------------------------------------------------


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically, created with `mode` (never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.chmod(path, mode)


class _Dumper(yaml.SafeDumper):
    """yamllint-clean output: sequences indented under their key, empty values blank."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


_Dumper.add_representer(type(None), lambda d, _: d.represent_scalar("tag:yaml.org,2002:null", ""))


def dump(header: str, data: dict[str, Any]) -> bytes:
    body = yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    return f"---\n# {header}\n{body}".encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--inventory-dir",
        type=Path,
        default=REPO / "inventory",
        help="where to write hosts.yml and group_vars/ (default: the repository's inventory/)",
    )
    parser.add_argument(
        "--vault-password-file",
        default=os.environ.get("REGISTRY_CACHE_VAULT_PASSWORD_FILE") or None,
        help="encrypt the secrets file with ansible-vault using this password file "
        "(default: $REGISTRY_CACHE_VAULT_PASSWORD_FILE)",
    )
    args = parser.parse_args(argv)
    inv: Path = args.inventory_dir
    secret = vault_secret(args.vault_password_file)
    before = earlier_answers(inv, secret)
    earlier, host_vars, secrets_readable = before.answers, before.host_vars, before.secrets_readable
    secrets_path = inv / "group_vars" / "all" / "secrets.yml"
    keep_secrets_file = False

    def default(env: str, fallback: str) -> str:
        return render(earlier[env]) if env in earlier else fallback

    out = sys.stdout
    p = Prompter(dict(os.environ), sys.stdin, out)

    # A parent proxy URL with credentials in it is a secret: it goes to secrets.yml (never to
    # the world-readable vars.yml), is read without echo and shown masked.
    def ask_upstream_proxy() -> str:
        prompt = (
            "A parent proxy for upstream traffic (http://host:port, or"
            " http://user:password@host:port; 'none' for none)."
        )
        if not secrets_readable:
            prompt += (
                f"\n{secrets_path} is vault-encrypted and no (right) vault password file was given:"
                " a URL with credentials cannot be written to it, and one kept in it wins over"
                " this answer."
            )

        def validate(text: str) -> str:
            url = v_proxy_url(text)
            if has_userinfo(url) and not secrets_readable:
                raise Invalid(
                    f"a proxy URL with credentials goes to {secrets_path}, which is encrypted and"
                    " cannot be read without its vault password: run make config again with"
                    " --vault-password-file (or REGISTRY_CACHE_VAULT_PASSWORD_FILE), or give the"
                    " URL without credentials"
                )
            return url

        env = "REGISTRY_CACHE_UPSTREAM_PROXY"
        return p.ask(Question(env, prompt, validate, default(env, "none"), True, mask_url))

    out.write(
        f"Registry Cache inventory, written to {inv}.\n"
        "Empty answer: the default in brackets; 'none' clears a list.\n\n"
    )
    cache_hosts = p.ask(
        Question(
            "REGISTRY_CACHE_HOST",
            "The cache host (inventory name, reachable by ssh; localhost for this machine);"
            " several, space-separated, for a cluster of cache nodes sharing one CA (and an S3"
            " bucket, asked below).",
            v_cache_hosts,
            default("REGISTRY_CACHE_HOST", "localhost"),
        )
    )
    earlier_addresses = earlier.get("REGISTRY_CACHE_ADDRESS")
    if earlier.get("REGISTRY_CACHE_HOST") != cache_hosts:
        earlier_addresses = None

    def v_addresses(text: str) -> list[str]:
        addresses = [v_host(a) for a in text.replace(",", " ").split()]
        if len(addresses) != len(cache_hosts):
            raise Invalid(
                f"give one address for each of the {len(cache_hosts)} cache hosts"
                f" ({' '.join(cache_hosts)}), in the same order"
            )
        return addresses

    addresses = p.ask(
        Question(
            "REGISTRY_CACHE_ADDRESS",
            "The address Docker hosts use to reach the cache"
            + (" (one per cache host, in order)." if len(cache_hosts) > 1 else "."),
            v_addresses,
            render(earlier_addresses or cache_hosts),
        )
    )
    address_of = dict(zip(cache_hosts, addresses, strict=True))
    clients = {
        "REGISTRY_CACHE_CLIENTS": p.ask(
            Question(
                "REGISTRY_CACHE_CLIENTS",
                "The Docker hosts that pull through the cache (space-separated; 'none' for none).",
                v_hosts,
                default("REGISTRY_CACHE_CLIENTS", " ".join(cache_hosts)),
            )
        ),
        "REGISTRY_CACHE_CONTAINERD_CLIENTS": p.ask(
            Question(
                "REGISTRY_CACHE_CONTAINERD_CLIENTS",
                "The containerd / Kubernetes nodes that pull through the cache as a registry"
                " mirror (space-separated; 'none' for none).",
                v_hosts,
                default("REGISTRY_CACHE_CONTAINERD_CLIENTS", "none"),
            )
        ),
        "REGISTRY_CACHE_PODMAN_CLIENTS": p.ask(
            Question(
                "REGISTRY_CACHE_PODMAN_CLIENTS",
                "The podman / buildah / skopeo / CRI-O hosts that pull through the cache"
                " (space-separated; 'none' for none).",
                v_hosts,
                default("REGISTRY_CACHE_PODMAN_CLIENTS", "none"),
            )
        ),
    }
    answers: dict[str, Any] = {}
    settings = [
        ("REGISTRY_CACHE_PORT", "The cache's TCP port.", v_port, "3128"),
        (
            "REGISTRY_CACHE_DIR",
            "The cache directory on the cache host.",
            v_abs_path,
            "/var/lib/registry-cache",
        ),
        (
            "REGISTRY_CACHE_MAX_SIZE",
            "The cache's size bound (e.g. 32g, 500g, 2t).",
            v_size,
            "32g",
        ),
        (
            "REGISTRY_CACHE_INACTIVE",
            "Cached data unused this long is removed (e.g. 60d).",
            v_duration,
            "60d",
        ),
        (
            "REGISTRY_CACHE_TAG_TTL",
            "How long a tag is trusted before it is checked upstream (e.g. 5m).",
            v_duration,
            "5m",
        ),
        (
            "REGISTRY_CACHE_ALLOWED_CLIENTS",
            "Client networks allowed to use the cache (CIDR, space-separated).",
            v_networks,
            DEFAULT_ALLOWED_CLIENTS,
        ),
        (
            "REGISTRY_CACHE_ALLOW_PUSH",
            "Pass pushes through the cache (instead of refusing them)?",
            v_bool,
            "no",
        ),
        (
            "DOCKER_CLIENTS_SERIAL",
            "Docker hosts restarted at a time when their settings change (a number or 25%).",
            v_serial,
            "25%",
        ),
        (
            "DOCKER_CLIENT_CA_SOURCE",
            "Where clients get the cache's CA: inventory (read by Ansible) or url (/ca.crt).",
            v_ca_source,
            "inventory",
        ),
        (
            "REGISTRY_CACHE_DOCKER_MODE",
            "How Docker hosts use the cache: proxy (an HTTP(S) proxy for every registry) or"
            " mirror (a registry mirror).",
            v_docker_mode,
            "proxy",
        ),
    ]
    for env, prompt, validate, fallback in settings:
        answers[env] = p.ask(Question(env, prompt, validate, default(env, fallback)))
        if env == "REGISTRY_CACHE_ALLOW_PUSH":
            answers["REGISTRY_CACHE_UPSTREAM_PROXY"] = ask_upstream_proxy()

    auth_default = default("REGISTRY_CACHE_AUTH_REGISTRIES", "none")
    auth_prompt = (
        "Registry credentials the cache adds for clients that send none, space-separated\n"
        "host:user:password entries (Docker Hub: auth.docker.io:user:token; 'none' for none)."
    )
    if not secrets_readable:
        auth_default = "keep"
        auth_prompt += (
            f"\n{secrets_path} is vault-encrypted and no (right) vault password file was given:"
            " 'keep' leaves it as it is."
        )

    def v_auth_or_keep(text: str) -> str | None:
        if secrets_readable:
            return v_auth(text)
        if text.strip().lower() == "keep":
            return None
        # Replacing a file we cannot read would lose whatever else it holds.
        raise Invalid(
            f"{secrets_path} is encrypted and cannot be read without its vault password, so it"
            " can only be kept: run make config again with --vault-password-file (or"
            " REGISTRY_CACHE_VAULT_PASSWORD_FILE) to change it, or move it away to start anew"
        )

    auth = p.ask(
        Question("REGISTRY_CACHE_AUTH_REGISTRIES", auth_prompt, v_auth_or_keep, auth_default, True)
    )
    keep_secrets_file = auth is None

    # The store: the local disk, or an S3 bucket (for a cluster, shared by its nodes).
    s3: dict[str, str] = {}
    s3_endpoint = p.ask(
        Question(
            "REGISTRY_CACHE_S3_ENDPOINT",
            "An S3 bucket shared by the cache hosts: the S3 API's URL (http://seaweed.example:8333;"
            " 'none' for none, the local disk only).",
            v_s3_endpoint,
            default("REGISTRY_CACHE_S3_ENDPOINT", "none"),
        )
    )
    s3_secret: str | None = ""
    shared_max_size = ""
    if s3_endpoint:
        s3["endpoint"] = s3_endpoint
        for key, prompt, validate, fallback in (
            ("bucket", "The bucket.", v_s3_bucket, "registry-cache"),
            ("region", "The bucket's region.", v_word_or_none, "us-east-1"),
            ("prefix", "A prefix of every object's key ('none' for none).", v_word_or_none, "none"),
            (
                "access_key_id",
                "The access key id ('none' for anonymous access).",
                v_word_or_none,
                "none",
            ),
        ):
            env = f"REGISTRY_CACHE_S3_{key.upper()}"
            s3[key] = p.ask(Question(env, prompt, validate, default(env, fallback)))
        env = "REGISTRY_CACHE_S3_SECRET_ACCESS_KEY"

        def v_s3_secret(text: str) -> str | None:
            if secrets_readable:
                return v_word_or_none(text)
            if text.strip().lower() == "keep":
                return None
            raise Invalid(
                f"{secrets_path} is encrypted and cannot be read without its vault password, so"
                " it can only be kept: run make config again with --vault-password-file (or"
                " REGISTRY_CACHE_VAULT_PASSWORD_FILE) to change it"
            )

        s3_secret = p.ask(
            Question(
                env,
                "The secret access key ('none' for none; written to the secrets file only).",
                v_s3_secret,
                "keep" if not secrets_readable else default(env, "none"),
                True,
                lambda t: "none" if t in ("", "none") else ("keep" if t == "keep" else "****"),
            )
        )
        shared_max_size = p.ask(
            Question(
                "REGISTRY_CACHE_SHARED_MAX_SIZE",
                "The bucket's size bound (e.g. 2t; 'none' for none).",
                v_size_or_none,
                default("REGISTRY_CACHE_SHARED_MAX_SIZE", "none"),
            )
        )
    if s3_secret is None and not keep_secrets_file:
        raise SystemExit(f"make config: {secrets_path} can only be kept as it is")

    # hosts.yml: keep per-host variables written by hand (ansible_user, ...).
    def hvars(name: str, cache: bool) -> dict[str, Any]:
        v = dict(host_vars.get(name) or {})
        v.pop("registry_cache_address", None)
        if cache and address_of[name] != name:
            v["registry_cache_address"] = address_of[name]
        if name in LOCAL_HOSTS:
            v.setdefault("ansible_connection", "local")
        return v

    # Everything make config does not ask about (other groups, vars, variables and secrets
    # added by hand) stays as it was: only the answers are written over.
    inventory = dict(before.hosts)
    everyone = dict(inventory.get("all") or {})
    children = dict(everyone.get("children") or {})
    # The client groups are written also when empty: a play on one then matches no hosts
    # (without Ansible's warning for a pattern that names no group).
    for group, members in (
        ("registry_cache", {h: hvars(h, True) or None for h in cache_hosts}),
        *(
            (group, {c: hvars(c, False) or None for c in clients[env]})
            for env, group in CLIENT_GROUPS.items()
        ),
    ):
        children[group] = {**(children.get(group) or {}), "hosts": members}
    everyone["children"] = children
    inventory["all"] = everyone
    write_file(inv / "hosts.yml", dump("Written by make config.", inventory), 0o644)

    # The credentials, and a parent proxy URL that holds some, live in secrets.yml.
    upstream_proxy = answers["REGISTRY_CACHE_UPSTREAM_PROXY"]
    proxy_is_secret = has_userinfo(upstream_proxy)
    store_vars = {
        "registry_cache_store": {"type": "s3", **s3} if s3 else {"type": "filesystem"},
        "registry_cache_shared_max_size": shared_max_size,
    }
    asked = {*answers, "REGISTRY_CACHE_AUTH_REGISTRIES", *map(question_name, store_vars)}
    variables = {k: v for k, v in before.variables.items() if question_name(k) not in asked}
    variables.update(store_vars)
    variables.update(
        {
            variable_name(env): value
            for env, value in answers.items()
            if not (env == "REGISTRY_CACHE_UPSTREAM_PROXY" and proxy_is_secret)
        }
    )
    write_file(
        inv / "group_vars" / "all" / "vars.yml",
        dump("Written by make config (secrets are in secrets.yml).", variables),
        0o644,
    )

    if keep_secrets_file:
        os.chmod(secrets_path, 0o600)
        out.write(f"kept {secrets_path} as it was\n")
    else:
        secret_values = {**before.secrets, "registry_cache_auth_registries": auth}
        # The S3 store's secret access key: here only (the role adds it to the store).
        if s3 and s3_secret:
            secret_values["registry_cache_store_secret_access_key"] = s3_secret
        else:
            secret_values.pop("registry_cache_store_secret_access_key", None)
        # Only here when it holds credentials: otherwise it is in vars.yml, which this
        # file (read after it) would override.
        if proxy_is_secret:
            secret_values["registry_cache_upstream_proxy"] = upstream_proxy
        else:
            secret_values.pop("registry_cache_upstream_proxy", None)
        data = dump("Written by make config. Secret: mode 0600, git-ignored.", secret_values)
        if secret is not None:
            data = vault_lib(secret).encrypt(data)
        write_file(secrets_path, data, 0o600)
    encrypted = secrets_path.read_bytes().startswith(VAULT_HEADER.encode())
    out.write(
        f"\nwrote {inv / 'hosts.yml'}, {inv / 'group_vars/all/vars.yml'} and {secrets_path}"
        f" ({'vault-encrypted' if encrypted else 'not encrypted'}, mode 0600)\n"
        "next: ansible-playbook site.yml"
        + (" --vault-password-file FILE" if encrypted else "")
        + "   (or `make install` for this one host)\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
