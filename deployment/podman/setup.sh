#!/usr/bin/env bash
# One-time (idempotent) host setup for building and running the containers with rootful podman:
#   1. packages: podman buildah fuse-overlayfs slirp4netns uidmap debootstrap runc (apt-get, only if missing)
#   2. podman configuration in $PODMAN_ROOT (see env.sh)
#   3. the local base image `localhost/localbase` (Debian bookworm minbase via debootstrap), for hosts that
#      cannot pull from a registry; skipped if it exists (LOCALBASE_REBUILD=1 to rebuild)
#   4. podman-compose 1.6.0 in its own virtualenv ($PODMAN_COMPOSE_VENV, default <repo>/.venv-podman)
# Usage: deployment/podman/setup.sh            (root; prints what it did and how long it took)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
. "$HERE/env.sh"
t0=$(date +%s)

need=()
for b in podman:podman buildah:buildah fuse-overlayfs:fuse-overlayfs slirp4netns:slirp4netns newuidmap:uidmap \
         debootstrap:debootstrap runc:runc; do
    command -v "${b%%:*}" >/dev/null 2>&1 || need+=("${b#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "[podman-setup] installing ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
echo "[podman-setup] $(podman --version); config in $PODMAN_ROOT"

# The Debian mirror this host already uses (one-line or deb822 sources), for debootstrap.
debian_mirror() {
    local m
    m=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -v security | awk '{print $2}' | head -n1 || true)
    if [ -z "$m" ]; then
        m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security \
            | awk '{print $2}' | head -n1 || true)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

if [ "${LOCALBASE_REBUILD:-0}" = 1 ] || ! podman image exists localhost/localbase:latest; then
    rootfs="$(mktemp -d "${TMPDIR:-/tmp}/localbase-rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT
    mirror="$(debian_mirror)"
    echo "[podman-setup] debootstrap bookworm from $mirror"
    t1=$(date +%s)
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$PODMAN_ROOT/debootstrap.log" 2>&1 \
        || { tail -n 20 "$PODMAN_ROOT/debootstrap.log"; exit 1; }
    tar -C "$rootfs" -c . | podman import - localhost/localbase:latest >/dev/null
    echo "[podman-setup] localbase image built in $(( $(date +%s) - t1 )) s"
else
    echo "[podman-setup] localbase image present"
fi

VENV="${PODMAN_COMPOSE_VENV:-$REPO/.venv-podman}"
if [ ! -x "$VENV/bin/podman-compose" ]; then
    python3 -m venv "$VENV"
    printf '*\n' > "$VENV/.gitignore"
    "$VENV/bin/pip" install -q podman-compose==1.6.0
fi
echo "[podman-setup] $("$VENV/bin/podman-compose" --version 2>/dev/null | tail -n1)"
echo "[podman-setup] done in $(( $(date +%s) - t0 )) s"
