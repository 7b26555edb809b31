#!/usr/bin/env bash
# `make run`: the proxy in the foreground with a config in the checkout (run/config.yml,
# written with development defaults on first use; edit it freely, it is git-ignored).
set -euo pipefail
config=${1:-run/config.yml}
if [[ ! -f $config ]]; then
  mkdir -p "$(dirname "$config")"
  cat >"$config" <<YAML
# Development config for \`make run\`; see README.md for every key.
listen: ["127.0.0.1:3128"]
cache_dir: $(pwd)/run/cache
max_size: 10g
tag_ttl: 5m
log_format: text
YAML
  echo "wrote $config"
fi
echo "proxy on http://127.0.0.1:3128 - CA at http://127.0.0.1:3128/ca.crt - Ctrl-C stops it"
exec .venv/bin/registry-cache serve --config "$config"
