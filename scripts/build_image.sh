#!/usr/bin/env bash
# Builds the Aspire image from ./Dockerfile on a machine that can reach Debian's mirror,
# PyPI, crates.io and static.rust-lang.org but no container registry:
#   1. installs docker.io and debootstrap when missing (apt);
#   2. starts a private dockerd (its own data/exec roots and socket under $STATE, no bridge,
#      no iptables) unless DOCKER_HOST names a daemon to use, or ours is already up;
#   3. makes the base image debian:bookworm-slim locally when the daemon lacks it:
#      debootstrap --variant=minbase bookworm, then `docker import`;
#   4. docker build --network=host (containers get no network of their own with --bridge=none);
#   5. checks the image: each binary starts (--version) and finds all its libraries.
# Safe to run again: each step checks first, and Docker's layer cache keeps what was built.
#
#   scripts/build_image.sh                 # aspire:0.1.0, CPU LibTorch
#   TORCH_VARIANT=cuda IMAGE=aspire:0.1.0-cuda scripts/build_image.sh
#   scripts/build_image.sh stop            # stop the private dockerd this script started
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE="${IMAGE:-aspire:0.1.0}"
TORCH_VARIANT="${TORCH_VARIANT:-cpu}"
BASE_IMAGE=debian:bookworm-slim
STATE="${ASPIRE_DOCKER_STATE:-$HOME/.cache/aspire/docker}"
# The legacy builder: Debian's docker.io has no buildx, and this Dockerfile needs no BuildKit.
export DOCKER_BUILDKIT=0

log() { printf '\033[1mbuild_image:\033[0m %s\n' "$*"; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

if [ "${1:-}" = stop ]; then
    if [ -s "$STATE/dockerd.pid" ] && kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null; then
        log "stopping dockerd $(cat "$STATE/dockerd.pid")"
        $SUDO kill -TERM "$(cat "$STATE/dockerd.pid")"
    else
        log "no dockerd of ours is running"
    fi
    exit 0
fi

need_apt=()
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

mkdir -p "$STATE"
if [ -z "${DOCKER_HOST:-}" ]; then
    export DOCKER_HOST="unix://$STATE/docker.sock"
    if ! docker info >/dev/null 2>&1; then
        log "starting dockerd (state in $STATE, log in $STATE/dockerd.log)"
        # --bridge=none --iptables=false: no network setup on the host; builds use the
        # host's network instead (--network=host below).
        $SUDO setsid dockerd --data-root "$STATE/data" --exec-root "$STATE/exec" \
            --pidfile "$STATE/dockerd.pid" --host "$DOCKER_HOST" \
            --bridge=none --iptables=false >"$STATE/dockerd.log" 2>&1 &
        for _ in $(seq 60); do
            docker info >/dev/null 2>&1 && break
            sleep 1
        done
        docker info >/dev/null 2>&1 || { tail -20 "$STATE/dockerd.log" >&2; log "dockerd did not start"; exit 1; }
    fi
fi
log "docker daemon: $DOCKER_HOST ($(docker version --format '{{.Server.Version}}'))"

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
    rootfs="$STATE/rootfs-bookworm"
    if [ ! -e "$rootfs/.complete" ]; then
        log "debootstrap --variant=minbase bookworm from $mirror (about 30 s, 200 MB)"
        $SUDO rm -rf "$rootfs"
        $SUDO debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
            || { tail -20 "$STATE/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }
        # What the official image has: updates and security, no package caches.
        security="${mirror%/debian}/debian-security"
        printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
            "$mirror" "$mirror" "$security" | $SUDO tee "$rootfs/etc/apt/sources.list" >/dev/null
        $SUDO rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
        $SUDO touch "$rootfs/.complete"
    fi
    log "importing $rootfs as $BASE_IMAGE"
    $SUDO tar -C "$rootfs" --exclude=./.complete -c . | docker import - "$BASE_IMAGE" >/dev/null
fi

# Behind a TLS-intercepting proxy the build stage must trust the proxy's CA: take the
# host's local CAs (Debian keeps them in /usr/local/share/ca-certificates).
extra_ca=deploy/docker/extra-ca
find "$extra_ca" -name '*.crt' -delete
trap 'find "$extra_ca" -name "*.crt" -delete' EXIT
for crt in "${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"/*.crt; do
    [ -e "$crt" ] && cp "$crt" "$extra_ca/"
done
[ -n "$(ls "$extra_ca"/*.crt 2>/dev/null)" ] && log "trusting in the build stage: $(cd "$extra_ca" && echo *.crt)"

log "docker build -t $IMAGE (TORCH_VARIANT=$TORCH_VARIANT); a cold build takes a while (release build of the workspace)"
start=$(date +%s)
docker build --network=host --build-arg "TORCH_VARIANT=$TORCH_VARIANT" \
    --build-arg "CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-$(nproc)}" -t "$IMAGE" .
log "built $IMAGE in $(( $(date +%s) - start )) s"

log "checking $IMAGE"
for b in aspire-discovery aspire-worker aspire-router aspirectl; do
    docker run --rm --network=none --entrypoint "$b" "$IMAGE" --version
done
docker run --rm --network=none --entrypoint sh "$IMAGE" -c \
    'for b in /usr/local/bin/aspire*; do if ldd "$b" | grep "not found"; then exit 1; fi; done; id; du -sh /opt/libtorch/lib; ls /opt/libtorch/lib'
docker image ls "$IMAGE"
log "done: $IMAGE"
