# Source me: podman configuration kept in a folder of its own (not /etc, not ~/.config).
#
#     . deployment/podman/env.sh          # then podman / podman-compose as usual
#
# PODMAN_ROOT (default ${TMPDIR:-/tmp}/mergerec-podman) holds storage.conf, containers.conf, the image store
# (graphroot) and runtime state (runroot). Idempotent: files are rewritten only when their content changes.
# Why these settings (Debian 12 hosts without a Docker engine): crun fails with "cgroups in hybrid mode not
# supported", so runc + cgroupfs; podman's default rlimits exceed what root may set in some sandboxes
# ("setrlimit RLIMIT_NOFILE: Operation not permitted"), so explicit ulimits; journald may be absent, so file
# event logging.

export PODMAN_ROOT="${PODMAN_ROOT:-${TMPDIR:-/tmp}/mergerec-podman}"
mkdir -p "$PODMAN_ROOT/graphroot" "$PODMAN_ROOT/runroot"

_mergerec_write_if_changed() {  # path content
    if [ ! -f "$1" ] || [ "$(cat "$1")" != "$2" ]; then
        printf '%s\n' "$2" > "$1.tmp" && mv "$1.tmp" "$1"
    fi
}

_mergerec_write_if_changed "$PODMAN_ROOT/storage.conf" "[storage]
driver = \"overlay\"
graphroot = \"$PODMAN_ROOT/graphroot\"
runroot = \"$PODMAN_ROOT/runroot\""

_mergerec_write_if_changed "$PODMAN_ROOT/containers.conf" "[containers]
default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]

[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"
events_logfile_path = \"$PODMAN_ROOT/events.log\""

export CONTAINERS_STORAGE_CONF="$PODMAN_ROOT/storage.conf"
export CONTAINERS_CONF="$PODMAN_ROOT/containers.conf"
unset -f _mergerec_write_if_changed
