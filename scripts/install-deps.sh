#!/usr/bin/env bash
# Installs the Debian packages that the tests, Molecule and the benchmark need.
# Idempotent: apt runs only when something is missing.
set -euo pipefail
packages=(docker.io docker-registry skopeo debootstrap nginx apache2-utils iproute2 openssl curl python3-venv git chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
