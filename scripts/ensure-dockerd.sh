#!/usr/bin/env bash
# Makes sure a Docker Engine answers on this host: does nothing when `docker info`
# already works, else starts Debian's dockerd in the background (this host may have
# no systemd as PID 1, and the docker.io postinst may or may not have started it)
# and waits until it answers. Log: $DOCKERD_LOG.
set -euo pipefail
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/registry-cache-ci-dockerd.log}
DOCKERD_TIMEOUT=${DOCKERD_TIMEOUT:-60}

if docker info >/dev/null 2>&1; then
  exit 0
fi
command -v dockerd >/dev/null || {
  echo "ensure-dockerd: dockerd is not installed (make deps installs docker.io)" >&2
  exit 1
}

# dockerd uses the containerd at /run/containerd/containerd.sock whenever that socket
# exists, and waits for it to answer: a socket left by a containerd that has gone makes
# it fail after a minute of retries. Nothing answers on a stale socket, so it can go.
SYSTEM_CONTAINERD=/run/containerd/containerd.sock
if [[ -S $SYSTEM_CONTAINERD ]] && command -v ctr >/dev/null &&
  ! timeout 10 ctr --address "$SYSTEM_CONTAINERD" version >/dev/null 2>&1; then
  echo "ensure-dockerd: no containerd answers on $SYSTEM_CONTAINERD; removing the stale socket"
  rm -f "$SYSTEM_CONTAINERD" "$SYSTEM_CONTAINERD.ttrpc"
fi

# A booted systemd can start the packaged service; use it when it is there.
if [[ -d /run/systemd/system ]] && systemctl start docker >/dev/null 2>&1; then
  :
else
  # containerd may be running already (docker.io's postinst, an earlier run);
  # dockerd starts its own when none is given.
  mkdir -p "$(dirname "$DOCKERD_LOG")"
  echo "ensure-dockerd: starting dockerd, log: $DOCKERD_LOG"
  # setsid: the daemon outlives this script and the make that ran it.
  setsid dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
fi

for ((i = 0; i < DOCKERD_TIMEOUT * 2; i++)); do
  if docker info >/dev/null 2>&1; then
    echo "ensure-dockerd: Docker Engine answers ($(docker info -f '{{.ServerVersion}} {{.Driver}} cgroup v{{.CgroupVersion}}'))"
    exit 0
  fi
  sleep 0.5
done
echo "ensure-dockerd: dockerd did not answer within ${DOCKERD_TIMEOUT}s; last lines of $DOCKERD_LOG:" >&2
tail -n 30 "$DOCKERD_LOG" >&2 || true
exit 1
