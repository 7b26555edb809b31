#!/usr/bin/python
"""Sets or removes config_path of containerd's CRI registry in config.toml, keeping the rest.

containerd's CRI plugin reads registry hosts (hosts.toml) from the directory its
config.toml names as `config_path`, a key whose table depends on the file's version:
version 1 `plugins.cri.registry`, version 2 `plugins."io.containerd.grpc.v1.cri".registry`,
version 3 (containerd 2) `plugins."io.containerd.cri.v1.images".registry`.

No TOML writer keeps a file's comments and layout, so the file is edited as text: the
lines added end in a marker comment, which is how `state=absent` finds them again (and
only them: a config_path someone else set stays). Every result is parsed again before
it is written, and refused when it does not say what was meant. Settings containerd
refuses beside config_path (`mirrors`, `configs.<host>.tls`) stop the module with the
file's path before anything is changed.

An empty `config_path = ""` (as `containerd config default` writes it) is commented out
with a second marker rather than left beside the new key (TOML refuses a key twice);
`state=absent` puts it back as it was. A config_path this module added itself is
replaced when config_path changes.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: containerd_config_path
short_description: Set config_path of containerd's CRI registry in config.toml
description:
  - Adds C(config_path) to the CRI registry table of containerd's config.toml (versions 1, 2 and 3),
    keeping every other setting, comment and line as it was; removes only what it added.
options:
  path:
    description: Path of config.toml.
    type: path
    default: /etc/containerd/config.toml
  config_path:
    description: Directory of the registry hosts (hosts.toml per registry).
    type: path
    required: true
  state:
    description: present sets config_path; absent removes the lines this module added.
    type: str
    choices: [present, absent]
    default: present
author: Registry Cache maintainers
"""

RETURN = r"""
version:
  description: The config.toml version found (1 when the file names none, 2 for a new file).
  type: int
  returned: always
config_path:
  description: config_path in the file after the change (empty when none).
  type: str
  returned: always
"""

MARKER = "# registry-cache containerd_client"
# Ends a line of someone else's that this module commented out (starts with "#").
DISABLED = f"{MARKER} disabled"
REGISTRY_TABLES = {
    1: ("plugins", "cri", "registry"),
    2: ("plugins", "io.containerd.grpc.v1.cri", "registry"),
    3: ("plugins", "io.containerd.cri.v1.images", "registry"),
}
HEADER_RE = re.compile(r"^\s*\[(?!\[)(?P<name>[^\]]+)\]\s*(#.*)?$")
VERSION_RE = re.compile(r"^\s*version\s*=\s*(?P<v>\d+)\s*(#.*)?$")
EMPTY_CONFIG_PATH_RE = re.compile(r"""^\s*config_path\s*=\s*(""|'')\s*(#.*)?$""")


def toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


def table_key(parts: tuple[str, ...]) -> str:
    """The table's name as a header writes it: dotted parts, quoted where needed."""
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else f'"{p}"' for p in parts)


def split_key(name: str) -> tuple[str, ...]:
    """A header's dotted key as its parts (quotes and spaces around dots removed)."""
    parts = re.findall(r'\s*(?:"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([A-Za-z0-9_-]+))\s*(?:\.|$)', name)
    return tuple(a or b or c for a, b, c in parts)


def dig(data: dict[str, Any], parts: tuple[str, ...]) -> Any:
    for part in parts:
        if not isinstance(data, dict):
            return None
        data = data.get(part)  # type: ignore[assignment]
    return data


def version_of(data: dict[str, Any], text: str) -> int:
    if not text.strip():
        return 2
    version = data.get("version", 1)
    return version if isinstance(version, int) else 1


def conflicts(registry: Any) -> list[str]:
    """Settings containerd refuses beside config_path."""
    if not isinstance(registry, dict):
        return []
    found = []
    if registry.get("mirrors"):
        found.append("mirrors")
    for host, config in (registry.get("configs") or {}).items():
        if isinstance(config, dict) and config.get("tls"):
            found.append(f"configs.{host}.tls")
    return found


def with_config_path(text: str, version: int, config_path: str) -> str:
    """The text with config_path added to the registry table (the table too if missing)."""
    parts = REGISTRY_TABLES[version]
    lines = text.splitlines(keepends=True)
    value = f'config_path = "{config_path}"  {MARKER}\n'
    for index, line in enumerate(lines):
        match = HEADER_RE.match(line)
        if match and split_key(match.group("name")) == parts:
            # An empty config_path of the table (up to the next header) is commented out.
            for number in range(index + 1, len(lines)):
                if lines[number].lstrip().startswith("["):
                    break
                body = lines[number].rstrip("\r\n")
                if EMPTY_CONFIG_PATH_RE.match(body):
                    lines[number] = f"#{body}  {DISABLED}{lines[number][len(body) :]}"
                    break
            indent = re.match(r"\s*", line).group(0)  # type: ignore[union-attr]
            lines.insert(index + 1, f"{indent}  {value}")
            return "".join(lines)
    if text and not text.endswith("\n"):
        lines.append("\n")
    if not text.strip():
        lines.append(f"version = 2  {MARKER}\n")
    lines.append(f"\n[{table_key(parts)}]  {MARKER}\n  {value}")
    return "".join(lines)


def without_marked_lines(text: str) -> str:
    """The text without the lines this module added, and with the lines it commented out back."""
    kept: list[str] = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        if body.rstrip().endswith(MARKER):
            # A table this module added was preceded by one blank line it added too.
            if HEADER_RE.match(body) and kept and not kept[-1].strip():
                kept.pop()
            continue
        if body.startswith("#") and body.endswith(f"  {DISABLED}"):
            line = body[1 : -len(f"  {DISABLED}")] + line[len(body) :]
        kept.append(line)
    result = "".join(kept)
    return result if result.strip() else ""


def write_atomically(path: str, text: str, old: os.stat_result | None) -> None:
    """Replaces the file (a symlink's target) at once, keeping its mode and owner."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config.toml.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, old.st_mode & 0o7777 if old else 0o644)
        if old and (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
            # Not root: the file is ours then.
            with contextlib.suppress(PermissionError):
                os.chown(tmp, old.st_uid, old.st_gid)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "default": "/etc/containerd/config.toml"},
            "config_path": {"type": "path", "required": True},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
        },
        supports_check_mode=True,
    )
    path: str = module.params["path"]
    wanted: str = module.params["config_path"]
    # A symlinked config.toml stays a symlink: its target is what is read and replaced.
    target = os.path.realpath(path)
    exists = os.path.exists(target)
    text = ""
    try:
        if exists:
            # newline="": CRLF line ends are kept as they are.
            with open(target, encoding="utf-8", newline="") as source:
                text = source.read()
        data = toml_loads(text)
    except ImportError:
        module.fail_json(msg="containerd_config_path needs Python >= 3.11 (tomllib) or tomli")
    except ValueError as error:
        module.fail_json(
            msg=f"{path} is not valid TOML, so containerd would not start with it either; "
            f"nothing was changed. Fix the file, then run again. ({error})"
        )
    version = version_of(data, text)
    if version not in REGISTRY_TABLES:
        module.fail_json(msg=f"{path} has version = {version}; this role knows versions 1, 2 and 3")
    parts = REGISTRY_TABLES[version]
    registry = dig(data, parts)
    current = registry.get("config_path", "") if isinstance(registry, dict) else ""
    result: dict[str, Any] = {"changed": False, "version": version, "config_path": current}

    if module.params["state"] == "absent":
        if MARKER not in text:
            module.exit_json(**result)
        new_text = without_marked_lines(text)
        try:
            new_current = dig(toml_loads(new_text), parts)
        except ValueError as error:
            module.fail_json(
                msg=f"removing this role's lines from {path} would leave invalid TOML ({error}); "
                "nothing was changed"
            )
        result.update(changed=True, config_path=(new_current or {}).get("config_path", ""))
        if module._diff:
            result["diff"] = {"before": text, "after": new_text, "before_header": path}
        if not module.check_mode:
            if new_text:
                write_atomically(target, new_text, os.stat(target))
            else:
                os.unlink(target)
        module.exit_json(**result)

    if current == wanted:
        module.exit_json(**result)
    source_text = text
    if current and MARKER in text:
        # The config_path may be this module's own, from an earlier config_path: replaced.
        try:
            base_text = without_marked_lines(text)
            base_registry = dig(toml_loads(base_text), parts)
        except ValueError:
            base_text, base_registry = text, registry
        if not (isinstance(base_registry, dict) and base_registry.get("config_path")):
            source_text, registry, current = base_text, base_registry, ""
    table = table_key(parts)
    if current:
        module.fail_json(
            msg=f'{path} sets config_path = "{current}" in [{table}]; set '
            f'containerd_client_config_path to "{current}" so that the hosts.toml files go where '
            "containerd reads them, or change the file yourself. Nothing was changed."
        )
    refused = conflicts(registry)
    if refused:
        module.fail_json(
            msg=f"{path} sets {', '.join(refused)} in [{table}], which containerd refuses "
            "beside config_path (the CRI plugin would not load). Move those settings into "
            "hosts.toml files (containerd's docs/hosts.md) and take them out of config.toml; "
            "nothing was changed."
        )
    new_text = with_config_path(source_text, version, wanted)
    try:
        new_registry = dig(toml_loads(new_text), parts)
    except ValueError as error:
        module.fail_json(
            msg=f"could not add config_path to {path} as text without breaking it ({error}); add "
            f'config_path = "{wanted}" to [{table}] yourself. Nothing was changed.'
        )
    if not isinstance(new_registry, dict) or new_registry.get("config_path") != wanted:
        module.fail_json(
            msg=f"could not add config_path to [{table}] of {path}; add it yourself. "
            "Nothing was changed."
        )
    result.update(changed=True, config_path=wanted)
    if module._diff:
        result["diff"] = {"before": text, "after": new_text, "before_header": path}
    if not module.check_mode:
        if not exists:
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        write_atomically(target, new_text, os.stat(target) if exists else None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
