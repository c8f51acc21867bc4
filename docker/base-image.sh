#!/usr/bin/env bash
# Builds a Debian base image without an image registry: debootstrap a minimal Debian (minbase)
# from the Debian mirror apt already uses, then `docker import` it. Its tag is the BASE_IMAGE
# of an offline build (docs/compose.md), local/debian:bookworm unless given:
#
#   sudo docker/base-image.sh [IMAGE]
#
# Needs root (debootstrap), debootstrap itself and a running Docker engine (the docker CLI
# honours DOCKER_HOST). SUITE (default bookworm: its python3 is 3.11, what the host's wheels
# must match) and MIRROR (default: the first Debian archive among apt's sources) override.
# Exit 2 when a prerequisite is missing, with what to do; else debootstrap's or docker's status.
set -euo pipefail

image=${1:-local/debian:bookworm}
suite=${SUITE:-bookworm}

fail() { echo "docker/base-image.sh: $*" >&2; exit 2; }

apt_mirror() {
    # deb822 files (URIs: a b) and one-line files (deb [options] URI suite ...)
    {
        grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | cut -d: -f2- | tr ' ' '\n'
        grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | sed 's/\[[^]]*\]//' | awk '{print $2}'
    } | grep -E '/debian/?$' | head -n 1 || true
}

[ "$(id -u)" = 0 ] || fail "needs root (debootstrap makes device nodes and chroots): run it with sudo"
command -v debootstrap >/dev/null || fail "debootstrap not found: apt-get install debootstrap"
docker version >/dev/null 2>&1 || fail "no Docker engine answers \`docker version\`${DOCKER_HOST:+ at $DOCKER_HOST}: start one first (docs/compose.md, Prerequisites)"
mirror=${MIRROR:-$(apt_mirror)}
[ -n "$mirror" ] || fail "no Debian archive (a URI ending in /debian) among apt's sources: give one as MIRROR=..."

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/base-image.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
echo "docker/base-image.sh: debootstrap --variant=minbase $suite from $mirror" >&2
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
tar -C "$rootfs" -c . | docker import - "$image" >/dev/null
echo "docker/base-image.sh: $image imported" >&2
