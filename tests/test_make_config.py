"""`make config` writes an inventory that Ansible reads back with the given values.

Each test runs `make config` in a scratch copy of the repository (a git repository of
its own, so that `git check-ignore` answers for the copy's .gitignore) with the
project's venv, and reads the result with `ansible-inventory --list`.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SECRETS = Path("inventory/group_vars/all/secrets.yml")
# Every question make config asks, in order; an answer for each, for the interactive run.
QUESTION_ORDER = [
    "REGISTRY_CACHE_HOST",
    "REGISTRY_CACHE_ADDRESS",
    "REGISTRY_CACHE_CLIENTS",
    "REGISTRY_CACHE_CONTAINERD_CLIENTS",
    "REGISTRY_CACHE_PODMAN_CLIENTS",
    "REGISTRY_CACHE_PORT",
    "REGISTRY_CACHE_DIR",
    "REGISTRY_CACHE_MAX_SIZE",
    "REGISTRY_CACHE_INACTIVE",
    "REGISTRY_CACHE_TAG_TTL",
    "REGISTRY_CACHE_ALLOWED_CLIENTS",
    "REGISTRY_CACHE_ALLOW_PUSH",
    "REGISTRY_CACHE_UPSTREAM_PROXY",
    "DOCKER_CLIENTS_SERIAL",
    "DOCKER_CLIENT_CA_SOURCE",
    "REGISTRY_CACHE_DOCKER_MODE",
    "REGISTRY_CACHE_AUTH_REGISTRIES",
    "REGISTRY_CACHE_S3_ENDPOINT",
]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the files make config needs, as a git repository of its own
    (without any inventory an earlier `make config` wrote into the real checkout)."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("Makefile", "pyproject.toml", ".gitignore", "ansible.cfg"):
        shutil.copy2(REPO / name, root / name)  # copy2: make must see the venv as current
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("scripts", "proxy_app"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    (root / "inventory/group_vars").mkdir(parents=True)
    shutil.copy2(REPO / "inventory/hosts.yml.example", root / "inventory")
    # The project's venv, which `make config` uses (`make -o` keeps make from rebuilding it).
    (root / ".venv").symlink_to(VENV_BIN.parent)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def clean_env(**values: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REGISTRY_CACHE_", "DOCKER_CLIENT", "ANSIBLE_"))
    }
    env.update(values)
    return env


# `-o`: the venv counts as made (it is the project's own, symlinked into the copy).
MAKE_CONFIG = ["make", "-s", "-o", "venv", "-o", ".venv/bin/registry-cache", "config"]


def make_config(root: Path, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess:
    # Never let make rebuild the shared venv from the copy: check what it would run first.
    planned = subprocess.run(
        [*MAKE_CONFIG, "-n"], cwd=root, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert planned.endswith("scripts/configure.py"), planned
    return subprocess.run(
        MAKE_CONFIG, cwd=root, input=stdin, env=env, capture_output=True, text=True, timeout=120
    )


def inventory(root: Path, *extra: str) -> dict:
    out = subprocess.run(
        [str(VENV_BIN / "ansible-inventory"), "-i", str(root / "inventory"), "--list", *extra],
        cwd=root, env=clean_env(), check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    return json.loads(out)


def assert_secret_file_private(root: Path) -> None:
    path = root / SECRETS
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ignored = subprocess.run(["git", "check-ignore", "-q", str(SECRETS)], cwd=root)
    assert ignored.returncode == 0, f"{SECRETS} is not git-ignored"


FULL_ENV = {
    "REGISTRY_CACHE_HOST": "cache1.example.net",
    "REGISTRY_CACHE_ADDRESS": "10.1.2.3",
    "REGISTRY_CACHE_CLIENTS": "docker1 docker2 docker3",
    # A host may be in several client groups, the cache host too.
    "REGISTRY_CACHE_CONTAINERD_CLIENTS": "k8s1 k8s2 docker1",
    "REGISTRY_CACHE_PODMAN_CLIENTS": "build1 cache1.example.net",
    "REGISTRY_CACHE_PORT": "3130",
    "REGISTRY_CACHE_DIR": "/srv/registry-cache",
    "REGISTRY_CACHE_MAX_SIZE": "200g",
    "REGISTRY_CACHE_INACTIVE": "30d",
    "REGISTRY_CACHE_TAG_TTL": "10m",
    "REGISTRY_CACHE_ALLOWED_CLIENTS": "10.0.0.0/8 192.168.7.0/24",
    "REGISTRY_CACHE_ALLOW_PUSH": "no",
    "REGISTRY_CACHE_UPSTREAM_PROXY": "none",
    "DOCKER_CLIENTS_SERIAL": "2",
    "DOCKER_CLIENT_CA_SOURCE": "url",
    "REGISTRY_CACHE_DOCKER_MODE": "mirror",
    "REGISTRY_CACHE_AUTH_REGISTRIES": "auth.docker.io:hubuser:s3cr:et ghcr.io:me:ghp_tok",
    "REGISTRY_CACHE_S3_ENDPOINT": "none",
}


def test_non_interactive_from_environment(checkout: Path) -> None:
    result = make_config(checkout, clean_env(**FULL_ENV))
    assert result.returncode == 0, result.stdout + result.stderr
    # Nothing was asked, and no password was printed.
    assert "end of input" not in result.stdout
    assert "s3cr:et" not in result.stdout + result.stderr
    assert "ghp_tok" not in result.stdout + result.stderr

    inv = inventory(checkout)
    assert inv["registry_cache"]["hosts"] == ["cache1.example.net"]
    assert inv["docker_clients"]["hosts"] == ["docker1", "docker2", "docker3"]
    cache = inv["_meta"]["hostvars"]["cache1.example.net"]
    assert cache["registry_cache_address"] == "10.1.2.3"
    assert cache["registry_cache_port"] == 3130
    assert cache["registry_cache_dir"] == "/srv/registry-cache"
    assert cache["registry_cache_max_size"] == "200g"
    assert cache["registry_cache_inactive"] == "30d"
    assert cache["registry_cache_tag_ttl"] == "10m"
    assert cache["registry_cache_allowed_clients"] == ["10.0.0.0/8", "192.168.7.0/24"]
    assert cache["registry_cache_allow_push"] is False
    assert cache["registry_cache_upstream_proxy"] == ""
    assert cache["registry_cache_auth_registries"] == FULL_ENV["REGISTRY_CACHE_AUTH_REGISTRIES"]
    client = inv["_meta"]["hostvars"]["docker2"]
    assert client["docker_clients_serial"] == 2
    assert client["docker_client_ca_source"] == "url"
    assert "registry_cache_address" not in client

    assert_secret_file_private(checkout)
    # Only the secrets file holds the passwords.
    for path in (checkout / "inventory").rglob("*.yml"):
        if path != checkout / SECRETS:
            assert "s3cr:et" not in path.read_text(), path


def test_interactive_answers_with_a_bad_one_asked_again(checkout: Path) -> None:
    answers = {
        "REGISTRY_CACHE_HOST": "cachebox",
        "REGISTRY_CACHE_ADDRESS": "",  # default: the host
        "REGISTRY_CACHE_CLIENTS": "web1 web2",
        "REGISTRY_CACHE_CONTAINERD_CLIENTS": "",  # default: none
        "REGISTRY_CACHE_PODMAN_CLIENTS": "web2 cachebox",
        "REGISTRY_CACHE_PORT": "3128",
        "REGISTRY_CACHE_DIR": "",
        "REGISTRY_CACHE_MAX_SIZE": "64g",
        "REGISTRY_CACHE_INACTIVE": "",
        "REGISTRY_CACHE_TAG_TTL": "",
        "REGISTRY_CACHE_ALLOWED_CLIENTS": "172.20.0.0/16",
        "REGISTRY_CACHE_ALLOW_PUSH": "",
        "REGISTRY_CACHE_UPSTREAM_PROXY": "",
        "DOCKER_CLIENTS_SERIAL": "",
        "DOCKER_CLIENT_CA_SOURCE": "",
        "REGISTRY_CACHE_DOCKER_MODE": "",  # default: proxy
        # a malformed entry (no password) first, then a good one
        "REGISTRY_CACHE_AUTH_REGISTRIES": "quay.io:robot\nquay.io:robot:pa55word",
        "REGISTRY_CACHE_S3_ENDPOINT": "",  # default: none
    }
    stdin = "".join(answers[q] + "\n" for q in QUESTION_ORDER)
    result = make_config(checkout, clean_env(), stdin)
    assert result.returncode == 0, result.stdout + result.stderr
    # The bad auth entry was rejected with its reason and asked once more.
    assert result.stdout.count("not accepted") == 1
    assert "username:password" in result.stdout  # the reason, from the shared parser
    assert result.stdout.count("REGISTRY_CACHE_AUTH_REGISTRIES [") == 2
    assert "end of input" not in result.stdout
    assert "pa55word" not in result.stdout

    inv = inventory(checkout)
    assert inv["registry_cache"]["hosts"] == ["cachebox"]
    assert inv["docker_clients"]["hosts"] == ["web1", "web2"]
    assert "containerd_clients" in inv["all"]["children"]  # written, without hosts
    assert "hosts" not in inv.get("containerd_clients", {})
    assert inv["podman_clients"]["hosts"] == ["web2", "cachebox"]
    assert inv["_meta"]["hostvars"]["web1"]["docker_client_mode"] == "proxy"
    cache = inv["_meta"]["hostvars"]["cachebox"]
    assert "registry_cache_address" not in cache
    assert cache["registry_cache_max_size"] == "64g"
    assert cache["registry_cache_dir"] == "/var/lib/registry-cache"
    assert cache["registry_cache_allowed_clients"] == ["172.20.0.0/16"]
    assert cache["registry_cache_auth_registries"] == "quay.io:robot:pa55word"
    assert cache["docker_clients_serial"] == "25%"
    assert_secret_file_private(checkout)

    # A second run with empty answers keeps every earlier answer as its default,
    # and host variables added by hand to hosts.yml.
    hosts_file = checkout / "inventory/hosts.yml"
    hosts_file.write_text(
        hosts_file.read_text().replace("web2:", "web2:\n          ansible_user: ops")
    )
    before = inventory(checkout)
    assert before["_meta"]["hostvars"]["web2"]["ansible_user"] == "ops"
    again = make_config(checkout, clean_env(), "\n" * len(QUESTION_ORDER))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[64g]" in again.stdout and "[web1 web2]" in again.stdout
    assert "pa55word" not in again.stdout
    assert inventory(checkout) == before


def test_client_groups_and_docker_mode(checkout: Path) -> None:
    """The containerd and podman hosts become groups of their own beside docker_clients (a
    host may be in several, the cache host too), the Docker mode the docker clients'
    docker_client_mode; a re-run offers them as its defaults."""
    result = make_config(checkout, clean_env(**FULL_ENV))
    assert result.returncode == 0, result.stdout + result.stderr
    inv = inventory(checkout)
    assert inv["docker_clients"]["hosts"] == ["docker1", "docker2", "docker3"]
    assert inv["containerd_clients"]["hosts"] == ["k8s1", "k8s2", "docker1"]
    assert inv["podman_clients"]["hosts"] == ["build1", "cache1.example.net"]
    assert inv["registry_cache"]["hosts"] == ["cache1.example.net"]
    hostvars = inv["_meta"]["hostvars"]
    for name in inv["docker_clients"]["hosts"]:
        assert hostvars[name]["docker_client_mode"] == "mirror", name
    # The cache host, also a podman client, keeps its address.
    assert hostvars["cache1.example.net"]["registry_cache_address"] == "10.1.2.3"

    # Asked again, the earlier answers are the defaults, and kept.
    new = ("REGISTRY_CACHE_CONTAINERD_CLIENTS", "REGISTRY_CACHE_PODMAN_CLIENTS")
    env = {k: v for k, v in FULL_ENV.items() if k not in (*new, "REGISTRY_CACHE_DOCKER_MODE")}
    again = make_config(checkout, clean_env(**env), "\n\n\n")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "end of input" not in again.stdout
    assert "REGISTRY_CACHE_CONTAINERD_CLIENTS [k8s1 k8s2 docker1]: " in again.stdout
    assert "REGISTRY_CACHE_PODMAN_CLIENTS [build1 cache1.example.net]: " in again.stdout
    assert "REGISTRY_CACHE_DOCKER_MODE [mirror]: " in again.stdout
    assert inventory(checkout) == inv

    # 'none' empties a group, which stays in the inventory (a play on it matches no hosts).
    cleared = dict(
        FULL_ENV, REGISTRY_CACHE_PODMAN_CLIENTS="none", REGISTRY_CACHE_DOCKER_MODE="proxy"
    )
    assert make_config(checkout, clean_env(**cleared)).returncode == 0
    inv = inventory(checkout)
    assert "podman_clients" in inv["all"]["children"]
    assert "hosts" not in inv.get("podman_clients", {})
    assert inv["containerd_clients"]["hosts"] == ["k8s1", "k8s2", "docker1"]
    assert inv["_meta"]["hostvars"]["docker2"]["docker_client_mode"] == "proxy"


def test_a_bad_docker_mode_stops_with_the_allowed_values(checkout: Path) -> None:
    result = make_config(checkout, clean_env(**dict(FULL_ENV, REGISTRY_CACHE_DOCKER_MODE="bridge")))
    assert result.returncode != 0
    assert "REGISTRY_CACHE_DOCKER_MODE" in result.stderr
    assert "'bridge' is neither proxy nor mirror" in result.stderr
    assert not (checkout / "inventory/hosts.yml").exists()
    assert not (checkout / "inventory/group_vars/all").exists()


def test_bad_size_is_asked_again(checkout: Path) -> None:
    env = {k: v for k, v in FULL_ENV.items() if k != "REGISTRY_CACHE_MAX_SIZE"}
    result = make_config(checkout, clean_env(**env), "lots\n12x\n500m\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("not accepted") == 2
    assert "'lots' is not a size" in result.stdout
    inv = inventory(checkout)
    assert inv["_meta"]["hostvars"]["cache1.example.net"]["registry_cache_max_size"] == "500m"


def test_invalid_environment_value_stops_with_the_reason(checkout: Path) -> None:
    env = dict(FULL_ENV, REGISTRY_CACHE_AUTH_REGISTRIES="ghcr.io:nopassword")
    result = make_config(checkout, clean_env(**env))
    assert result.returncode != 0
    assert "REGISTRY_CACHE_AUTH_REGISTRIES" in result.stderr
    assert "username:password" in result.stderr
    assert not (checkout / SECRETS).exists()


def test_vault_encrypted_secrets(checkout: Path, tmp_path: Path) -> None:
    password_file = tmp_path / "vault-pass"
    password_file.write_text("correct horse battery staple\n")
    password_file.chmod(0o600)
    env = clean_env(**FULL_ENV, REGISTRY_CACHE_VAULT_PASSWORD_FILE=str(password_file))
    result = make_config(checkout, env)
    assert result.returncode == 0, result.stdout + result.stderr

    raw = (checkout / SECRETS).read_text()
    assert raw.startswith("$ANSIBLE_VAULT;")
    assert "ghp_tok" not in raw
    assert_secret_file_private(checkout)
    inv = inventory(checkout, "--vault-password-file", str(password_file))
    cache = inv["_meta"]["hostvars"]["cache1.example.net"]
    assert cache["registry_cache_auth_registries"] == FULL_ENV["REGISTRY_CACHE_AUTH_REGISTRIES"]

    # Without the password a re-run keeps the encrypted file untouched.
    env = clean_env(**{k: v for k, v in FULL_ENV.items() if k != "REGISTRY_CACHE_AUTH_REGISTRIES"})
    again = make_config(checkout, env, "\n")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (checkout / SECRETS).read_text() == raw


def test_what_was_added_by_hand_survives_a_rerun(checkout: Path) -> None:
    """make config writes over its own answers only: groups, variables and secrets added to
    the inventory by hand are still there after a re-run that changes an answer."""
    assert make_config(checkout, clean_env(**FULL_ENV)).returncode == 0
    inv_dir = checkout / "inventory"
    hosts_file = inv_dir / "hosts.yml"
    hosts_file.write_text(
        hosts_file.read_text()
        + "    monitoring:\n      hosts:\n        mon1:\n  vars:\n    ansible_user: ops\n"
    )
    hosts_file.write_text(
        hosts_file.read_text().replace(
            "    docker_clients:\n",
            "    docker_clients:\n      vars:\n        docker_role: fleet\n",
        )
    )
    vars_file = inv_dir / "group_vars/all/vars.yml"
    vars_file.write_text(vars_file.read_text() + "registry_cache_prefetch:\n  - alpine:3.20\n")
    secrets_file = checkout / SECRETS
    secrets_file.write_text(
        secrets_file.read_text() + "registry_cache_prefetch_proxy_password: hunter22\n"
    )

    again = make_config(checkout, clean_env(**dict(FULL_ENV, REGISTRY_CACHE_MAX_SIZE="300g")))
    assert again.returncode == 0, again.stdout + again.stderr
    inv = inventory(checkout)
    assert inv["monitoring"]["hosts"] == ["mon1"]
    cache = inv["_meta"]["hostvars"]["cache1.example.net"]
    assert cache["ansible_user"] == "ops"
    assert inv["_meta"]["hostvars"]["docker1"]["docker_role"] == "fleet"
    assert cache["registry_cache_max_size"] == "300g"
    assert cache["registry_cache_prefetch"] == ["alpine:3.20"]
    assert cache["registry_cache_prefetch_proxy_password"] == "hunter22"
    assert cache["registry_cache_auth_registries"] == FULL_ENV["REGISTRY_CACHE_AUTH_REGISTRIES"]
    assert_secret_file_private(checkout)
    assert "hunter22" not in vars_file.read_text()


def test_a_broken_inventory_file_stops_it_untouched(checkout: Path) -> None:
    assert make_config(checkout, clean_env(**FULL_ENV)).returncode == 0
    vars_file = checkout / "inventory/group_vars/all/vars.yml"
    broken = vars_file.read_text() + "registry_cache_prefetch: [alpine\n"
    vars_file.write_text(broken)
    result = make_config(checkout, clean_env(**FULL_ENV))
    assert result.returncode != 0
    assert f"{vars_file} is not valid YAML" in result.stderr
    assert vars_file.read_text() == broken


def test_an_unreadable_vault_file_is_kept_not_replaced(checkout: Path, tmp_path: Path) -> None:
    """Without the vault password the encrypted secrets cannot be merged, so new credentials
    are refused with the way out, instead of replacing whatever else the file holds."""
    password_file = tmp_path / "vault-pass"
    password_file.write_text("correct horse battery staple\n")
    env = clean_env(**FULL_ENV, REGISTRY_CACHE_VAULT_PASSWORD_FILE=str(password_file))
    assert make_config(checkout, env).returncode == 0
    raw = (checkout / SECRETS).read_text()

    result = make_config(checkout, clean_env(**FULL_ENV))
    assert result.returncode != 0
    assert "--vault-password-file" in result.stderr
    assert (checkout / SECRETS).read_text() == raw


PROXY_PASSWORD = "pr0xy-Pa55"
PROXY_WITH_CREDENTIALS = f"http://puser:{PROXY_PASSWORD}@proxy.example:3128"


def test_a_parent_proxy_with_credentials_is_a_secret(checkout: Path) -> None:
    """A parent proxy URL with user:password@ goes to secrets.yml (not the world-readable
    vars.yml), and its password is never printed, neither from the environment nor as the
    default of a later run; without credentials it is an ordinary setting again."""
    env = dict(FULL_ENV, REGISTRY_CACHE_UPSTREAM_PROXY=PROXY_WITH_CREDENTIALS)
    result = make_config(checkout, clean_env(**env))
    assert result.returncode == 0, result.stdout + result.stderr
    assert PROXY_PASSWORD not in result.stdout + result.stderr
    assert "http://puser:****@proxy.example:3128" in result.stdout

    vars_file = checkout / "inventory/group_vars/all/vars.yml"
    assert PROXY_PASSWORD not in vars_file.read_text()
    assert "registry_cache_upstream_proxy" not in vars_file.read_text()
    assert PROXY_PASSWORD in (checkout / SECRETS).read_text()
    assert_secret_file_private(checkout)
    cache = inventory(checkout)["_meta"]["hostvars"]["cache1.example.net"]
    assert cache["registry_cache_upstream_proxy"] == PROXY_WITH_CREDENTIALS

    # Asked again, the earlier URL is the default, shown masked, and kept.
    env.pop("REGISTRY_CACHE_UPSTREAM_PROXY")
    again = make_config(checkout, clean_env(**env), "\n")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "REGISTRY_CACHE_UPSTREAM_PROXY [http://puser:****@proxy.example:3128]" in again.stdout
    assert PROXY_PASSWORD not in again.stdout + again.stderr
    cache = inventory(checkout)["_meta"]["hostvars"]["cache1.example.net"]
    assert cache["registry_cache_upstream_proxy"] == PROXY_WITH_CREDENTIALS

    # A URL without credentials moves back to vars.yml (and out of secrets.yml, which
    # would override it).
    plain = dict(FULL_ENV, REGISTRY_CACHE_UPSTREAM_PROXY="http://proxy2.example:3128")
    assert make_config(checkout, clean_env(**plain)).returncode == 0
    assert "registry_cache_upstream_proxy" not in (checkout / SECRETS).read_text()
    assert "http://proxy2.example:3128" in vars_file.read_text()
    cache = inventory(checkout)["_meta"]["hostvars"]["cache1.example.net"]
    assert cache["registry_cache_upstream_proxy"] == "http://proxy2.example:3128"
    assert cache["registry_cache_auth_registries"] == FULL_ENV["REGISTRY_CACHE_AUTH_REGISTRIES"]


def test_a_bad_parent_proxy_url_is_rejected_without_its_password(checkout: Path) -> None:
    env = dict(FULL_ENV, REGISTRY_CACHE_UPSTREAM_PROXY=f"http://puser:{PROXY_PASSWORD}@a b:3128")
    result = make_config(checkout, clean_env(**env))
    assert result.returncode != 0
    assert "REGISTRY_CACHE_UPSTREAM_PROXY" in result.stderr
    assert "is not a proxy URL" in result.stderr
    assert PROXY_PASSWORD not in result.stdout + result.stderr


def test_a_parent_proxy_with_credentials_is_vault_encrypted(checkout: Path, tmp_path: Path) -> None:
    password_file = tmp_path / "vault-pass"
    password_file.write_text("correct horse battery staple\n")
    env = dict(FULL_ENV, REGISTRY_CACHE_UPSTREAM_PROXY=PROXY_WITH_CREDENTIALS)
    result = make_config(
        checkout, clean_env(**env, REGISTRY_CACHE_VAULT_PASSWORD_FILE=str(password_file))
    )
    assert result.returncode == 0, result.stdout + result.stderr
    raw = (checkout / SECRETS).read_text()
    assert raw.startswith("$ANSIBLE_VAULT;")
    assert PROXY_PASSWORD not in raw
    for path in (checkout / "inventory").rglob("*.yml"):
        assert PROXY_PASSWORD not in path.read_text(), path
    inv = inventory(checkout, "--vault-password-file", str(password_file))
    cache = inv["_meta"]["hostvars"]["cache1.example.net"]
    assert cache["registry_cache_upstream_proxy"] == PROXY_WITH_CREDENTIALS

    # Without the vault password, new proxy credentials cannot go into the encrypted file:
    # refused with the way out, the file untouched.
    env.pop("REGISTRY_CACHE_AUTH_REGISTRIES")
    again = make_config(checkout, clean_env(**env), "keep\n")
    assert again.returncode != 0
    assert "--vault-password-file" in again.stderr
    assert PROXY_PASSWORD not in again.stdout + again.stderr
    assert (checkout / SECRETS).read_text() == raw


S3_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
CLUSTER_ENV = dict(
    FULL_ENV,
    REGISTRY_CACHE_HOST="cache1.example.net cache2.example.net cache3",
    REGISTRY_CACHE_ADDRESS="10.1.2.3 10.1.2.4 cache3",
    REGISTRY_CACHE_S3_ENDPOINT="http://seaweed.example:8333",
    REGISTRY_CACHE_S3_BUCKET="registry-cache",
    REGISTRY_CACHE_S3_REGION="eu-west-1",
    REGISTRY_CACHE_S3_PREFIX="fleet/",
    REGISTRY_CACHE_S3_ACCESS_KEY_ID="AKIDEXAMPLE",
    REGISTRY_CACHE_S3_SECRET_ACCESS_KEY=S3_SECRET,
    REGISTRY_CACHE_SHARED_MAX_SIZE="2t",
)


def test_several_cache_hosts_with_an_s3_store(checkout: Path) -> None:
    """Several cache hosts make the registry_cache group, each with its address; the S3
    settings go into registry_cache_store, its secret into the secrets file only (mode
    0600), never printed; a re-run offers them all as its defaults and keeps them."""
    result = make_config(checkout, clean_env(**CLUSTER_ENV))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "end of input" not in result.stdout
    assert S3_SECRET not in result.stdout + result.stderr

    inv = inventory(checkout)
    assert inv["registry_cache"]["hosts"] == ["cache1.example.net", "cache2.example.net", "cache3"]
    hostvars = inv["_meta"]["hostvars"]
    assert hostvars["cache1.example.net"]["registry_cache_address"] == "10.1.2.3"
    assert hostvars["cache2.example.net"]["registry_cache_address"] == "10.1.2.4"
    assert "registry_cache_address" not in hostvars["cache3"]
    cache = hostvars["cache2.example.net"]
    assert cache["registry_cache_store"] == {
        "type": "s3",
        "endpoint": "http://seaweed.example:8333",
        "bucket": "registry-cache",
        "region": "eu-west-1",
        "prefix": "fleet/",
        "access_key_id": "AKIDEXAMPLE",
    }
    assert cache["registry_cache_store_secret_access_key"] == S3_SECRET
    assert cache["registry_cache_shared_max_size"] == "2t"

    assert_secret_file_private(checkout)
    assert S3_SECRET in (checkout / SECRETS).read_text()
    for path in (checkout / "inventory").rglob("*"):
        if path.is_file() and path != checkout / SECRETS:
            assert S3_SECRET not in path.read_text(), path

    # Asked again, the earlier answers are the defaults (the secret masked), and kept.
    asked = [k for k in CLUSTER_ENV if k.startswith("REGISTRY_CACHE_S3_")]
    asked += ["REGISTRY_CACHE_HOST", "REGISTRY_CACHE_ADDRESS", "REGISTRY_CACHE_SHARED_MAX_SIZE"]
    env = {k: v for k, v in CLUSTER_ENV.items() if k not in asked}
    again = make_config(checkout, clean_env(**env), "\n" * len(asked))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "end of input" not in again.stdout
    assert "REGISTRY_CACHE_HOST [cache1.example.net cache2.example.net cache3]: " in again.stdout
    assert "REGISTRY_CACHE_ADDRESS [10.1.2.3 10.1.2.4 cache3]: " in again.stdout
    assert "REGISTRY_CACHE_S3_ENDPOINT [http://seaweed.example:8333]: " in again.stdout
    assert "REGISTRY_CACHE_S3_SECRET_ACCESS_KEY [****]: " in again.stdout
    assert S3_SECRET not in again.stdout + again.stderr
    assert inventory(checkout) == inv

    # Back to one host and the local disk: the group shrinks, the store is the filesystem
    # and the secret leaves the secrets file.
    single = dict(FULL_ENV, REGISTRY_CACHE_HOST="cache1.example.net")
    assert make_config(checkout, clean_env(**single)).returncode == 0
    inv = inventory(checkout)
    assert inv["registry_cache"]["hosts"] == ["cache1.example.net"]
    cache = inv["_meta"]["hostvars"]["cache1.example.net"]
    assert cache["registry_cache_store"] == {"type": "filesystem"}
    assert cache["registry_cache_shared_max_size"] == ""
    assert "registry_cache_store_secret_access_key" not in cache
    assert S3_SECRET not in (checkout / SECRETS).read_text()


def test_one_address_per_cache_host(checkout: Path) -> None:
    env = dict(CLUSTER_ENV, REGISTRY_CACHE_ADDRESS="10.1.2.3 10.1.2.4")
    result = make_config(checkout, clean_env(**env))
    assert result.returncode != 0
    assert "one address for each of the 3 cache hosts" in result.stderr
    assert not (checkout / "inventory/hosts.yml").exists()


def test_the_s3_secret_is_vault_encrypted(checkout: Path, tmp_path: Path) -> None:
    password_file = tmp_path / "vault-pass"
    password_file.write_text("correct horse battery staple\n")
    env = clean_env(**CLUSTER_ENV, REGISTRY_CACHE_VAULT_PASSWORD_FILE=str(password_file))
    result = make_config(checkout, env)
    assert result.returncode == 0, result.stdout + result.stderr
    raw = (checkout / SECRETS).read_text()
    assert raw.startswith("$ANSIBLE_VAULT;")
    for path in (checkout / "inventory").rglob("*"):
        if path.is_file():
            assert S3_SECRET not in path.read_text(), path
    assert_secret_file_private(checkout)
    inv = inventory(checkout, "--vault-password-file", str(password_file))
    cache = inv["_meta"]["hostvars"]["cache3"]
    assert cache["registry_cache_store_secret_access_key"] == S3_SECRET
