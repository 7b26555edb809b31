#!/usr/bin/env bash
# Builds a wheelhouse for hosts without a package index: the wheel of this checkout,
# every dependency wheel, and ansible-core with its dependencies (for make install).
#   bash scripts/build-wheelhouse.sh DIR
# Then: registry_cache_package_source=wheelhouse registry_cache_wheelhouse=DIR (site.yml),
# or REGISTRY_CACHE_WHEELHOUSE=DIR make install.
# ANSIBLE_CORE_SPEC picks the ansible-core (default: any supported one, >=2.16,<2.20;
# molecule/local asks for the oldest supported, ==2.16.*, so that make install tests it).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: build-wheelhouse.sh DIR}
python=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
mkdir -p "$dir"
rm -f "$dir"/registry_cache-*.whl
rm -rf build/lib
# A fixed timestamp makes the project wheel reproducible (unchanged source, unchanged wheel).
SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel --quiet --disable-pip-version-check \
  --wheel-dir "$dir" . "ansible-core${ANSIBLE_CORE_SPEC:->=2.16,<2.20}"
ls "$dir"/registry_cache-*.whl >/dev/null
echo "wheelhouse: $(ls "$dir" | wc -l) wheels in $dir"
