#!/bin/sh
# A local stand-in for the Dockerfile's pinned base image (python:3.11.7-slim-bookworm), which
# no registry reachable here serves: Debian bookworm bootstrapped from the apt mirror, with
# python3, python3-venv and python-is-python3. Prints the image's name on stdout; the image is
# reused while this script and the host's CA bundle are unchanged.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

inputs=$(cat "$0" "$ca_bundle" | sha256sum | cut -c1-12)
name=localhost/bigru-serve-base:bookworm-$inputs
if "$here/podman" image exists "$name"; then
    echo "$name"
    exit 0
fi

rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/bigru-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates,netbase \
    bookworm "$rootfs" "$mirror" >&2
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
# `RUN pip install` reaches the package index only through this host's TLS-intercepting
# proxy, so the stand-in (never our Dockerfile) trusts the host's CA bundle.
install -m 644 "$ca_bundle" "$rootfs/etc/ssl/certs/host-ca-bundle.crt"
tar -C "$rootfs" -c . | "$here/podman" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt' \
    --change 'CMD ["python3"]' \
    - "$name" >&2
echo "$name"
