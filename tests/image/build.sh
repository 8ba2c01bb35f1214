#!/bin/sh
# Build our Dockerfile with podman on the local stand-in base: tests/image/build.sh [TAG]
# --format docker keeps HEALTHCHECK (the OCI image format has no field for it).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tag=${1:-localhost/bigru-serve:image-test}

started=$(date +%s)
base=$("$here/base.sh")
built_base=$(date +%s)
"$here/podman" build --format docker --build-arg "PYTHON_IMAGE=$base" --tag "$tag" "$root"
finished=$(date +%s)

size=$("$here/podman" image inspect --format '{{.Size}}' "$tag")
echo "image-test: base $base in $((built_base - started)) s," \
     "$tag in $((finished - built_base)) s, $((size / 1000000)) MB"
