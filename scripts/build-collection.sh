#!/usr/bin/env bash
# Builds the Ansible collection registry_cache_project.registry_cache from this checkout:
#   bash scripts/build-collection.sh [OUTDIR]     (default dist/)
# It holds the roles (registry_cache, docker_client, containerd_client, podman_client and
# their internal cache_trust), the playbooks (site.yml among them, every role named by its
# fully qualified name), containerd_client's module and filter as collection plugins (roles
# in a collection cannot carry plugins), and proxy_app's wheel in
# roles/registry_cache/files/wheels/, which the role installs (package_source bundled)
# instead of building one from a checkout. Install it with a requirements.yml:
#   collections:
#     - {name: dist/registry_cache_project-registry_cache-0.1.0.tar.gz, type: file}
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)
python=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
galaxy=${ANSIBLE_GALAXY:-$( [[ -x .venv/bin/ansible-galaxy ]] && echo .venv/bin/ansible-galaxy || echo ansible-galaxy )}
namespace=registry_cache_project
name=registry_cache
version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
roles=(registry_cache docker_client containerd_client podman_client cache_trust)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/$namespace/$name
mkdir -p "$root"/{roles,playbooks,plugins/modules,plugins/filter,meta}

for role in "${roles[@]}"; do
  cp -r "roles/$role" "$root/roles/$role"
done
# Plugins move from the role into the collection (same names, found from its roles).
mv "$root"/roles/containerd_client/library/*.py "$root/plugins/modules/"
mv "$root"/roles/containerd_client/filter_plugins/*.py "$root/plugins/filter/"
rmdir "$root/roles/containerd_client/library" "$root/roles/containerd_client/filter_plugins"

# proxy_app's wheel (reproducible: an unchanged checkout gives the same wheel).
rm -rf build/lib
mkdir -p "$root/roles/registry_cache/files/wheels"
SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps \
  --wheel-dir "$root/roles/registry_cache/files/wheels" .

# The playbooks, with every role by its fully qualified name; site.yml beside them.
cp -r playbooks/. "$root/playbooks/"
sed 's#playbooks/##' site.yml >"$root/playbooks/site.yml"
for role in "${roles[@]}"; do
  sed -i -E "s#(role|name): $role\$#\\1: $namespace.$name.$role#" "$root"/playbooks/*.yml
done

cat >"$root/galaxy.yml" <<GALAXY
namespace: $namespace
name: $name
version: $version
readme: README.md
authors: [Registry Cache maintainers]
description: A caching proxy and registry mirror for container registries, and the clients of a fleet pointed at it.
license: [Apache-2.0]
tags: [docker, containerd, podman, registry, cache, mirror]
repository: https://example.invalid/registry-cache
build_ignore: ["*.pyc", __pycache__]
GALAXY
cat >"$root/meta/runtime.yml" <<RUNTIME
---
requires_ansible: ">=2.16"
RUNTIME
cat >"$root/README.md" <<README
# $namespace.$name

The Ansible side of Registry Cache: roles \`registry_cache\` (the cache host),
\`docker_client\`, \`containerd_client\`, \`podman_client\` (the clients), and the playbooks
(\`playbooks/site.yml\` for a fleet, \`playbooks/rotate-ca.yml\`). proxy_app $version ships
as a wheel inside the \`registry_cache\` role. See the project's docs/ansible.md.
README

"$galaxy" collection build --force --output-path "$out" "$root" >/dev/null
echo "collection: $out/$namespace-$name-$version.tar.gz"
