#!/usr/bin/env bash
# make install: this host becomes the registry cache and its own Docker client
# (playbooks/local.yml). Needs root, systemd and Python >= 3.11; without a Docker Engine
# the playbook installs Debian's docker.io (docker_client_install_docker).
# make uninstall (--uninstall): takes that away again (playbooks/uninstall-local.yml).
#
# It makes its own venv with ansible-core (.venv-install; the project's .venv
# when that already has Ansible) and runs the playbook against localhost. A
# second run changes nothing.
#
# Environment:
#   REGISTRY_CACHE_WHEELHOUSE           a folder of wheels (ansible-core, the project and
#                                       its dependencies) for hosts without a package
#                                       index: everything is installed from it, offline
#   REGISTRY_CACHE_VAULT_PASSWORD_FILE  the vault password file, when make config
#                                       encrypted the secrets
#   REGISTRY_CACHE_INSTALL_VENV         where to make the venv (default .venv-install)
# Arguments are passed to ansible-playbook (e.g. -e registry_cache_port=3129, --check).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

say() { printf 'make install: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (sudo make install): it installs a system service"
[[ -d /run/systemd/system ]] || die "this host does not run systemd"
playbook=playbooks/local.yml
if [[ ${1:-} == --uninstall ]]; then
  shift
  playbook=playbooks/uninstall-local.yml
elif ! systemctl cat docker.service >/dev/null 2>&1; then
  say "no Docker Engine here (no docker.service): the playbook installs Debian's docker.io"
fi

wheelhouse=${REGISTRY_CACHE_WHEELHOUSE:-}
if [[ -n $wheelhouse ]]; then
  wheelhouse=$(cd "$wheelhouse" && pwd) || die "REGISTRY_CACHE_WHEELHOUSE=$REGISTRY_CACHE_WHEELHOUSE is not a folder"
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
  die "$python is missing or older than 3.11"

# Debian's python3 needs python3-venv (ensurepip) to make a venv.
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  command -v apt-get >/dev/null || die "$python cannot make a venv (python3-venv is missing)"
  say "installing python3-venv"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi

if [[ -z ${REGISTRY_CACHE_INSTALL_VENV:-} && -x .venv/bin/ansible-playbook ]]; then
  venv=.venv
else
  venv=${REGISTRY_CACHE_INSTALL_VENV:-.venv-install}
  if [[ ! -x $venv/bin/ansible-playbook ]]; then
    say "making $venv with ansible-core"
    "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    if [[ -n $wheelhouse ]]; then
      pip+=(--no-index --find-links "$wheelhouse")
    fi
    "${pip[@]}" 'ansible-core>=2.16,<2.20'
  fi
fi

args=()
if [[ -n $wheelhouse ]]; then
  args+=(-e "{\"registry_cache_package_source\": \"wheelhouse\", \"registry_cache_wheelhouse\": \"$wheelhouse\"}")
fi
if [[ -n ${REGISTRY_CACHE_VAULT_PASSWORD_FILE:-} ]]; then
  args+=(--vault-password-file "$REGISTRY_CACHE_VAULT_PASSWORD_FILE")
fi

export ANSIBLE_CONFIG=$repo/ansible.cfg
export ANSIBLE_LOCALHOST_WARNING=false
export ANSIBLE_INVENTORY_UNPARSED_WARNING=false
say "running $playbook"
exec "$venv/bin/ansible-playbook" "$playbook" "${args[@]}" "$@"
