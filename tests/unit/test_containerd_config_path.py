"""The containerd_config_path module, run as Ansible runs a local module: a subprocess
`python containerd_config_path.py args.json`, whose JSON answer is read back."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

MODULE = (
    Path(__file__).resolve().parents[2]
    / "roles"
    / "containerd_client"
    / "library"
    / "containerd_config_path.py"
)
MARKER = "# registry-cache containerd_client"
CERTS = "/etc/containerd/certs.d"
V1 = ("plugins", "cri", "registry")
V2 = ("plugins", "io.containerd.grpc.v1.cri", "registry")
V3 = ("plugins", "io.containerd.cri.v1.images", "registry")
REGISTRY_PARTS = (V1, V2, V3)

DEBIAN_12 = """\
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""


def run(
    tmp_path: Path,
    path: Path,
    config_path: str = CERTS,
    state: str = "present",
    check: bool = False,
    diff: bool = False,
) -> dict[str, Any]:
    args = tmp_path / "module-args.json"
    args.write_text(
        json.dumps(
            {
                "ANSIBLE_MODULE_ARGS": {
                    "path": str(path),
                    "config_path": config_path,
                    "state": state,
                    "_ansible_check_mode": check,
                    "_ansible_diff": diff,
                }
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, str(MODULE), str(args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.stdout.strip(), f"no answer from the module: {proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout)
    assert (proc.returncode != 0) == bool(result.get("failed")), (proc.returncode, result)
    return result


def snapshot(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns, st.st_mode


def dig(data: dict[str, Any], parts: tuple[str, ...]) -> Any:
    for part in parts:
        data = data[part]
    return data


def without_registry(data: dict[str, Any], parts: tuple[str, ...]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    dig(data, parts[:-1]).pop(parts[-1], None)
    return data


def marked_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.endswith(MARKER)]


def present_then_absent(tmp_path: Path, config: Path, parts: tuple[str, ...]) -> str:
    """Sets config_path, checks both runs of each state, and returns the text in between."""
    original = config.read_bytes()
    before = tomllib.loads(original.decode())

    first = run(tmp_path, config)
    assert first["changed"] is True, first
    assert first["config_path"] == CERTS
    changed = config.read_text()
    after = tomllib.loads(changed)
    assert dig(after, parts)["config_path"] == CERTS
    assert without_registry(after, parts) == without_registry(before, parts)

    second = run(tmp_path, config)
    assert second["changed"] is False, second
    assert config.read_text() == changed

    removed = run(tmp_path, config, state="absent")
    assert removed["changed"] is True, removed
    assert config.read_bytes() == original

    again = run(tmp_path, config, state="absent")
    assert again["changed"] is False, again
    assert config.read_bytes() == original
    return changed


def test_debian_12_config_gets_a_registry_table_and_gives_it_back(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(DEBIAN_12)
    changed = present_then_absent(tmp_path, config, V2)
    assert changed.startswith(DEBIAN_12)
    assert changed[len(DEBIAN_12) :] == (
        f'\n[plugins."io.containerd.grpc.v1.cri".registry]  {MARKER}\n'
        f'  config_path = "{CERTS}"  {MARKER}\n'
    )
    assert run(tmp_path, config, state="absent")["version"] == 2


def test_config_path_goes_into_the_registry_table_already_there(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "version = 2\n"
        "# Registry settings of the site\n"
        '[plugins."io.containerd.grpc.v1.cri".registry]  # kept here\n'
        "  # the auth of the site\n"
        '  [plugins."io.containerd.grpc.v1.cri".registry.auths."r.example"]\n'
        '    username = "u"  # who\n'
        "\n"
        '[plugins."io.containerd.grpc.v1.cri".containerd]\n'
        '  snapshotter = "overlayfs"\n'
    )
    changed = present_then_absent(tmp_path, config, V2)
    lines = changed.splitlines()
    header = lines.index('[plugins."io.containerd.grpc.v1.cri".registry]  # kept here')
    assert lines[header + 1] == f'  config_path = "{CERTS}"  {MARKER}'
    assert "# Registry settings of the site" in lines
    assert "  # the auth of the site" in lines
    assert '    username = "u"  # who' in lines
    assert len(marked_lines(changed)) == 1
    data = tomllib.loads(changed)
    assert dig(data, V2)["auths"] == {"r.example": {"username": "u"}}


@pytest.mark.parametrize(
    ("text", "parts", "version", "header"),
    [
        (
            '[plugins.cri]\n  sandbox_image = "k8s.gcr.io/pause:3.6"\n'
            '[plugins.cri.containerd]\n  snapshotter = "overlayfs"\n',
            V1,
            1,
            "[plugins.cri.registry]",
        ),
        (
            "version = 3\n\n[plugins]\n  [plugins.'io.containerd.cri.v1.images']\n"
            "    snapshotter = 'overlayfs'\n",
            V3,
            3,
            '[plugins."io.containerd.cri.v1.images".registry]',
        ),
    ],
    ids=["version-1", "version-3"],
)
def test_each_version_has_its_own_registry_table(
    tmp_path: Path, text: str, parts: tuple[str, ...], version: int, header: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    changed = present_then_absent(tmp_path, config, parts)
    assert f"{header}  {MARKER}" in changed.splitlines()
    assert run(tmp_path, config)["version"] == version
    other_tables = set(REGISTRY_PARTS) - {parts}
    data = tomllib.loads(config.read_text())
    for other in other_tables:
        with pytest.raises((KeyError, TypeError)):
            dig(data, other)


def test_missing_file_is_created_and_removed_again(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "containerd" / "config.toml"
    result = run(tmp_path, config)
    assert result["changed"] is True
    assert result["version"] == 2
    data = tomllib.loads(config.read_text())
    assert data["version"] == 2
    assert dig(data, V2) == {"config_path": CERTS}
    assert config.stat().st_mode & 0o7777 == 0o644
    assert run(tmp_path, config)["changed"] is False

    removed = run(tmp_path, config, state="absent")
    assert removed["changed"] is True
    assert not config.exists()
    assert run(tmp_path, config, state="absent")["changed"] is False
    assert not config.exists()


def test_config_path_already_set_is_left_alone(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{CERTS}"\n'
    )
    before = snapshot(config)
    result = run(tmp_path, config)
    assert result["changed"] is False
    assert result["config_path"] == CERTS
    assert snapshot(config) == before

    removed = run(tmp_path, config, state="absent")
    assert removed["changed"] is False
    assert removed["config_path"] == CERTS
    assert snapshot(config) == before


def test_config_path_of_another_directory_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
        '  config_path = "/srv/hosts.d"\n'
    )
    before = snapshot(config)
    result = run(tmp_path, config)
    assert result["failed"] is True
    assert str(config) in result["msg"]
    assert "/srv/hosts.d" in result["msg"]
    assert snapshot(config) == before
    assert run(tmp_path, config, state="absent")["changed"] is False
    assert snapshot(config) == before


@pytest.mark.parametrize(
    ("table", "named"),
    [
        (
            '[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
            '  endpoint = ["https://mirror.example"]\n',
            "mirrors",
        ),
        (
            '[plugins."io.containerd.grpc.v1.cri".registry.configs."r.example".tls]\n'
            '  ca_file = "/etc/ssl/r.pem"\n',
            "configs.r.example.tls",
        ),
    ],
    ids=["mirrors", "tls"],
)
def test_settings_containerd_refuses_beside_config_path_stop_it(
    tmp_path: Path, table: str, named: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"version = 2\n\n{table}")
    before = snapshot(config)
    for check in (True, False):
        result = run(tmp_path, config, check=check)
        assert result["failed"] is True
        assert named in result["msg"]
        assert str(config) in result["msg"]
        assert snapshot(config) == before


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"\n  x = 1\n')
    before = snapshot(config)
    for state in ("present", "absent"):
        result = run(tmp_path, config, state=state)
        assert result["failed"] is True
        assert "not valid TOML" in result["msg"]
        assert str(config) in result["msg"]
        assert snapshot(config) == before


def test_check_mode_reports_the_change_and_leaves_the_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(DEBIAN_12)
    before = snapshot(config)
    result = run(tmp_path, config, check=True)
    assert result["changed"] is True
    assert result["config_path"] == CERTS
    assert "diff" not in result
    assert snapshot(config) == before

    missing = tmp_path / "new" / "config.toml"
    assert run(tmp_path, missing, check=True)["changed"] is True
    assert not missing.parent.exists()

    run(tmp_path, config)
    changed = snapshot(config)
    assert run(tmp_path, config, state="absent", check=True)["changed"] is True
    assert snapshot(config) == changed


def test_diff_mode_returns_a_diff(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(DEBIAN_12)
    result = run(tmp_path, config, check=True, diff=True)
    assert result["diff"]["before"] == DEBIAN_12
    assert result["diff"]["after"].startswith(DEBIAN_12)
    assert f'config_path = "{CERTS}"' in result["diff"]["after"]
    assert config.read_text() == DEBIAN_12

    result = run(tmp_path, config, diff=True)
    assert result["diff"]["after"] == config.read_text()
    removed = run(tmp_path, config, state="absent", diff=True)
    assert removed["diff"]["after"] == DEBIAN_12
    assert config.read_text() == DEBIAN_12


def test_file_mode_is_kept(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(DEBIAN_12)
    config.chmod(0o600)
    run(tmp_path, config)
    assert config.stat().st_mode & 0o7777 == 0o600
    run(tmp_path, config, state="absent")
    assert config.stat().st_mode & 0o7777 == 0o600
    assert config.read_text() == DEBIAN_12
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".config.toml.")]


def test_header_with_spaces_around_the_dots_is_recognised(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "version = 2\n"
        '[ plugins . "io.containerd.grpc.v1.cri" . registry ]  # spaced\n'
        '  [ plugins . "io.containerd.grpc.v1.cri" . registry . auths . "r.example" ]\n'
        '    username = "u"\n'
    )
    changed = present_then_absent(tmp_path, config, V2)
    assert len(marked_lines(changed)) == 1
    lines = changed.splitlines()
    assert lines[2] == f'  config_path = "{CERTS}"  {MARKER}'


def test_sub_table_without_its_parent_header_still_gives_valid_toml(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "version = 2\n\n"
        '[plugins."io.containerd.grpc.v1.cri".registry.configs."r.example".auth]\n'
        '  username = "u"\n'
        '  password = "p"\n'
    )
    changed = present_then_absent(tmp_path, config, V2)
    registry = dig(tomllib.loads(changed), V2)
    assert registry["config_path"] == CERTS
    assert registry["configs"] == {"r.example": {"auth": {"username": "u", "password": "p"}}}


# `containerd config default` writes an empty config_path in the registry table.
CONTAINERD_1_7_DEFAULT = """\
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.8"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = ""

      [plugins."io.containerd.grpc.v1.cri".registry.auths]

      [plugins."io.containerd.grpc.v1.cri".registry.configs]

      [plugins."io.containerd.grpc.v1.cri".registry.headers]

      [plugins."io.containerd.grpc.v1.cri".registry.mirrors]

    [plugins."io.containerd.grpc.v1.cri".x509_key_pair_streaming]
      tls_cert_file = ""
"""
CONTAINERD_2_DEFAULT = """\
version = 3
root = '/var/lib/containerd'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'

    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = 'registry.k8s.io/pause:3.10'

    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = ''

    [plugins.'io.containerd.cri.v1.images'.image_decryption]
      key_model = 'node'
"""


@pytest.mark.parametrize(
    ("text", "parts"),
    [(CONTAINERD_1_7_DEFAULT, V2), (CONTAINERD_2_DEFAULT, V3)],
    ids=["containerd-1.7", "containerd-2"],
)
def test_empty_config_path_of_containerd_config_default_is_replaced(
    tmp_path: Path, text: str, parts: tuple[str, ...]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    changed = present_then_absent(tmp_path, config, parts)
    assert len(marked_lines(changed)) == 1
    assert "config_path = " in "".join(
        line for line in changed.splitlines() if line.startswith("#")
    )


def test_a_new_config_path_replaces_the_one_this_module_set(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONTAINERD_1_7_DEFAULT)
    run(tmp_path, config, config_path="/srv/old.d")
    result = run(tmp_path, config)
    assert result["changed"] is True, result
    changed = config.read_text()
    assert dig(tomllib.loads(changed), V2)["config_path"] == CERTS
    assert "/srv/old.d" not in changed
    assert run(tmp_path, config, state="absent")["changed"] is True
    assert config.read_text() == CONTAINERD_1_7_DEFAULT

    created = tmp_path / "created" / "config.toml"
    run(tmp_path, created, config_path="/srv/old.d")
    assert run(tmp_path, created)["changed"] is True
    assert dig(tomllib.loads(created.read_text()), V2) == {"config_path": CERTS}
    run(tmp_path, created, state="absent")
    assert not created.exists()


def test_trailing_blank_lines_and_crlf_line_ends_come_back(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_bytes(
        b'version = 2\r\n[plugins."io.containerd.grpc.v1.cri".registry]\r\n'
        b'  [plugins."io.containerd.grpc.v1.cri".registry.auths."r.example"]\r\n'
        b'    username = "u"\r\n\r\n\r\n'
    )
    present_then_absent(tmp_path, config, V2)


def test_a_symlinked_config_stays_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text(DEBIAN_12)
    config = tmp_path / "config.toml"
    config.symlink_to(real)
    run(tmp_path, config)
    assert config.is_symlink()
    assert dig(tomllib.loads(real.read_text()), V2)["config_path"] == CERTS
    run(tmp_path, config, state="absent")
    assert config.is_symlink()
    assert real.read_text() == DEBIAN_12
