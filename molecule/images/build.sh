#!/usr/bin/env bash
# Builds the local test images of DESIGN.md (nothing can be pulled from a public registry):
#   registry-cache-test/debian-systemd:bookworm  Debian with systemd, Python, curl, openssl,
#                                                docker-registry, nginx, skopeo, htpasswd, make
#   registry-cache-test/debian-docker:bookworm   the same plus Debian's docker.io (with its
#                                                containerd) and podman: every client runtime
#   .build/docker-repo-<suite>/                  a flat apt repository of docker.io and what it
#                                                needs beyond the base image
# One debootstrap; the Docker variant is that tree plus docker.io, installed in a chroot (from
# the host's network, so the build needs no container networking). Each image carries a label
# with the hash of this script; an image whose label matches is reused, not rebuilt.
# Env: SUITE (bookworm; trixie for Debian 13, as MOLECULE_DISTRO picks), MIRROR
# (deb.debian.org), FORCE=1 rebuilds.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=registry-cache-test/debian-systemd:$SUITE
DOCKER_IMAGE=registry-cache-test/debian-docker:$SUITE
LABEL=registry-cache-test.inputs
build_dir=$here/.build
base_packages=(
  systemd systemd-sysv dbus libpam-systemd
  python3 python3-venv python3-apt ca-certificates curl openssl iproute2 procps
  make git sudo less
  docker-registry skopeo apache2-utils nginx-light
)
engine_packages=(docker.io)
# Debian 13 moved the docker command out of docker.io, into docker-cli.
[[ $SUITE == bookworm ]] || engine_packages+=(docker-cli)
docker_packages=("${engine_packages[@]}" podman)

inputs=$( { cat "$0"; echo "$SUITE $MIRROR"; } | sha256sum | cut -c1-16)
label_of() { docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$1" 2>/dev/null || true; }

if [[ -z ${FORCE:-} && $(label_of "$BASE_IMAGE") == "$inputs" && $(label_of "$DOCKER_IMAGE") == "$inputs" &&
  -s $build_dir/docker-repo-$SUITE/Packages ]]; then
  echo "images: $BASE_IMAGE and $DOCKER_IMAGE are up to date (inputs $inputs)"
  exit 0
fi

start=$SECONDS
mkdir -p "$build_dir/debs"
# Seed the .deb cache with the host's own (hard links, free): apt and debootstrap take a
# cached file only when its checksum matches the mirror's index, so a stale one is refetched.
cp -nl /var/cache/apt/archives/*.deb "$build_dir/debs/" 2>/dev/null || true
rootfs=$(mktemp -d "$build_dir/rootfs.XXXXXX")
cleanup() {
  for m in var/cache/apt/archives proc; do
    if mountpoint -q "$rootfs/$m" 2>/dev/null; then umount -l "$rootfs/$m"; fi
  done
  rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

echo "images: debootstrap $SUITE into $rootfs"
# debootstrap only the minimal base (its --include resolves complex dependencies badly);
# apt-get in a chroot adds the rest.
debootstrap --variant=minbase --cache-dir="$build_dir/debs" \
  "$SUITE" "$rootfs" "$MIRROR" >"$build_dir/debootstrap.log" 2>&1 || {
  tail -n 30 "$build_dir/debootstrap.log" >&2
  exit 1
}
echo "images: debootstrap done in $((SECONDS - start)) s"

in_root() { chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
chroot_up() { # network, /proc, the .deb cache, and no service starts while installing
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod +x "$rootfs/usr/sbin/policy-rc.d"
  mount -t proc proc "$rootfs/proc"
  mount --bind "$build_dir/debs" "$rootfs/var/cache/apt/archives"
}
chroot_down() {
  umount "$rootfs/var/cache/apt/archives" "$rootfs/proc"
  rm -f "$rootfs/usr/sbin/policy-rc.d" "$rootfs/etc/resolv.conf"
}
install() { # install PACKAGE...
  in_root apt-get install -y -q --no-install-recommends "$@" >>"$build_dir/apt.log" 2>&1 || {
    tail -n 30 "$build_dir/apt.log" >&2
    exit 1
  }
}

cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SOURCES
: >"$build_dir/apt.log"
chroot_up
in_root apt-get update -q >>"$build_dir/apt.log" 2>&1
install "${base_packages[@]}"
chroot_down
echo "images: base packages installed at $((SECONDS - start)) s"

# Tune the tree for a container that boots systemd.
: >"$rootfs/etc/machine-id" # systemd makes one at boot
echo 'LANG=C.UTF-8' >"$rootfs/etc/default/locale"
# Units that make no sense in a container, or that would serve on their own.
in_root systemctl mask \
  getty.target console-getty.service systemd-firstboot.service systemd-udevd.service \
  systemd-udev-trigger.service systemd-remount-fs.service sys-kernel-config.mount \
  sys-kernel-debug.mount sys-kernel-tracing.mount sys-fs-fuse-connections.mount \
  systemd-modules-load.service apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service \
  >/dev/null 2>&1
# The upstream test registry (docker-registry behind nginx) is switched on only where wanted.
in_root systemctl disable docker-registry.service nginx.service >/dev/null 2>&1 || true

import() { # import IMAGE: the tree as an image booting systemd, labelled with the inputs
  tar -C "$rootfs" --numeric-owner --xattrs --acls -c . | docker import \
    --change 'ENV container=docker' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/sbin/init"]' \
    --change "LABEL $LABEL=$inputs" \
    - "$1" >/dev/null
  echo "images: built $1 ($(docker image inspect -f '{{.Size}}' "$1" | numfmt --to=iec)) at $((SECONDS - start)) s"
}
import "$BASE_IMAGE"

echo "images: adding ${docker_packages[*]}"
chroot_up
# The .debs docker.io needs beyond the base image: for a local apt repository, the package
# index of a host with systemd but no Docker that must install docker.io offline
# (molecule/local's rc-local-bare).
# (A simulated install lists them: --print-uris leaves out those already in the .deb cache.)
docker_debs=$(in_root apt-get install -s -qq --no-install-recommends "${engine_packages[@]}" |
  awk '$1 == "Inst" { v = substr($3, 2); sub(/:/, "%3a", v); a = $NF; gsub(/[][)]/, "", a); print $2 "_" v "_" a ".deb" }')
install "${docker_packages[@]}"
chroot_down
import "$DOCKER_IMAGE"

repo=$build_dir/docker-repo-$SUITE
rm -rf "$repo"
mkdir -p "$repo"
for deb in $docker_debs; do ln -f "$build_dir/debs/$deb" "$repo/" || { echo "images: $deb is not in the .deb cache" >&2; exit 1; }; done
(
  cd "$repo"
  for deb in *.deb; do
    dpkg-deb -f "$deb"
    echo "Filename: ./$deb"
    echo "Size: $(stat -c %s "$deb")"
    echo "SHA256: $(sha256sum "$deb" | cut -d' ' -f1)"
    echo
  done >Packages
)
echo "images: docker.io's apt repository in $repo ($(ls "$repo" | grep -c '\.deb$') packages)"
echo "images: done in $((SECONDS - start)) s"
