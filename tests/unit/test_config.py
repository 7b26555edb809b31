from pathlib import Path

import pytest

from proxy_app.config import ConfigError, load_config, parse_duration, parse_size


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


def test_defaults_follow_the_design(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "cache_dir: /srv/cache\n"), environ={})
    assert [str(a) for a in cfg.listen] == ["0.0.0.0:3128", "[::]:3128"]
    assert cfg.ca_dir == Path("/srv/cache/ca")
    assert cfg.max_size == 32 << 30
    assert cfg.inactive == 60 * 86400
    assert cfg.tag_ttl == 300
    assert cfg.stale_if_error == 7 * 86400
    assert cfg.allow_push is False
    assert cfg.verify_client_access is False
    assert cfg.intercept == ("*",)
    assert cfg.allowed_ports == frozenset({443})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("32g", 32 << 30), ("500m", 500 << 20), ("1.5k", 1536), ("4096", 4096), ("2GiB", 2 << 30)],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("10m", 600), ("60d", 5184000), ("30", 30), ("1w", 604800)]
)
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key.*max_sise"):
        load_config(write(tmp_path, "max_sise: 10g\n"), environ={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_size: lots\n", "max_size"),
        ("tag_ttl: soon\n", "tag_ttl"),
        ("allow_push: maybe\n", "allow_push"),
        ("verify_client_access: sometimes\n", "verify_client_access"),
        ("listen: nowhere\n", "listen"),
        ("allowed_clients: [10.0.0.0/33]\n", "allowed_clients"),
        ("allowed_ports: [70000]\n", "allowed_ports"),
        ("log_format: xml\n", "log_format"),
        ("auth_registries: 'ghcr.io:onlyuser'\n", "auth_registries"),
        ("users: [{name: a, password_hash: plain}]\n", "users"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(write(tmp_path, text), environ={})


def test_admin_users(tmp_path: Path) -> None:
    text = (
        "users:\n"
        "  - {name: boss, password_hash: 'scrypt$1$1$1$AA==$AA==', admin: true}\n"
        "  - {name: puller, password_hash: 'scrypt$1$1$1$AA==$AA=='}\n"
    )
    boss, puller = load_config(write(tmp_path, text), environ={}).users
    assert (boss.name, boss.admin) == ("boss", True)
    assert (puller.name, puller.admin) == ("puller", False)


@pytest.mark.parametrize("value", ["'yes please'", "'true'", "1", "[true]"])
def test_admin_must_be_a_boolean(tmp_path: Path, value: str) -> None:
    text = f"users:\n  - {{name: boss, password_hash: 'scrypt$1', admin: {value}}}\n"
    with pytest.raises(ConfigError, match=r"'users'.*user 'boss': admin must be true or false"):
        load_config(write(tmp_path, text), environ={})


def test_environment_overrides_file(tmp_path: Path) -> None:
    env = {
        "REGISTRY_CACHE_MAX_SIZE": "1g",
        "REGISTRY_CACHE_INTERCEPT": "*.example.com registry.local:5000",
        "REGISTRY_CACHE_ALLOW_PUSH": "true",
        "REGISTRY_CACHE_AUTH_REGISTRIES": "auth.docker.io:bot:p:a:ss ghcr.io:me:tok",
    }
    cfg = load_config(write(tmp_path, "max_size: 5g\n"), environ=env)
    assert cfg.max_size == 1 << 30
    assert cfg.allow_push is True
    assert cfg.intercept == ("*.example.com", "registry.local:5000")
    # ports named in intercept are allowed CONNECT ports
    assert cfg.allowed_ports == frozenset({443, 5000})
    assert cfg.auth_registries["auth.docker.io"].password == "p:a:ss"
    assert cfg.auth_registries["ghcr.io"].username == "me"


def test_list_form_of_auth_registries(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "auth_registries:\n  - {host: Quay.io, username: u, password: s3cret}\n"),
        environ={},
    )
    assert cfg.auth_registries["quay.io"].username == "u"
    assert "s3cret" not in repr(cfg.auth_registries["quay.io"])  # passwords never in reprs


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yml", environ={})


def test_string_form_takes_a_port() -> None:
    from proxy_app.config import parse_auth_registries

    creds = parse_auth_registries("registry.local:5000:ci:pa:ss ghcr.io:me:tok")
    assert creds["registry.local:5000"].username == "ci"
    assert creds["registry.local:5000"].password == "pa:ss"
    assert creds["ghcr.io"].password == "tok"


HASH = "scrypt$16384$8$1$c2FsdA==$aGFzaA=="


def test_users_admin_flag(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            f"users:\n  - {{name: ops, password_hash: '{HASH}', admin: true}}\n"
            f"  - {{name: ci, password_hash: '{HASH}'}}\n",
        ),
        environ={},
    )
    assert [(u.name, u.admin) for u in cfg.users] == [("ops", True), ("ci", False)]


@pytest.mark.parametrize("value", ["'yes'", "1", "[true]", "null"])
def test_users_admin_must_be_a_boolean(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"users:\n  - {{name: ops, password_hash: '{HASH}', admin: {value}}}\n")
    with pytest.raises(ConfigError, match="user 'ops': admin must be true or false"):
        load_config(path, environ={})


def test_admin_socket_and_pinned(tmp_path: Path) -> None:
    text = "cache_dir: /srv/cache\npinned: [alpine, 'reg.rc.test:5000/a/b:1']\n"
    cfg = load_config(write(tmp_path, text), environ={})
    assert cfg.admin_socket_path == Path("/srv/cache/admin.sock")
    assert cfg.pinned == ("docker.io/library/alpine:latest", "reg.rc.test:5000/a/b:1")
    cfg = load_config(None, environ={"REGISTRY_CACHE_ADMIN_SOCKET": "/run/rc/admin.sock"})
    assert cfg.admin_socket_path == Path("/run/rc/admin.sock")
    with pytest.raises(ConfigError, match=r"'pinned'.*'\.\.'"):
        load_config(write(tmp_path, "pinned: ['reg.rc.test/../../etc/passwd']\n"), environ={})


def test_human_size_prints_what_parse_size_reads() -> None:
    from proxy_app.config import human_size, parse_size

    assert human_size(512) == "512 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(3 << 30) == "3.0 GiB"
    assert human_size(5 << 40) == "5.0 TiB"
    assert human_size(2048 << 40) == "2048.0 TiB"
    assert parse_size(human_size(3 << 30).replace(" ", "").replace("iB", "")) == 3 << 30
