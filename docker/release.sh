#!/usr/bin/env bash
# Builds the CPU and GPU images, pushes them, and pins the overlays to what was pushed, by digest:
#
#   docker/release.sh REPOSITORY VERSION      e.g.  docker/release.sh ghcr.io/acme/lookalike 0.1.0
#
# checks that the third-party images k8s/base pins by digest (Redis) are in their registry, pushes
# REPOSITORY:VERSION-cpu and REPOSITORY:VERSION-gpu (linux/amd64), then writes REPOSITORY@sha256:... into
# k8s/overlays/cpu and k8s/overlays/gpu (`kustomize edit set image`, or docker/pin_image.py without kustomize) and
# prints the digests. Commit the overlays: a deployment then runs exactly the images this release built, whatever
# happens to the tags later. Needs docker with buildx, logged in to the registry (docker login).
#
#   docker/release.sh pin OVERLAY_DIR REPOSITORY@sha256:DIGEST     only the pinning step
set -euo pipefail
cd "$(dirname "$0")/.."

pin() {  # OVERLAY_DIR REPOSITORY@sha256:DIGEST
  if command -v kustomize >/dev/null; then
    (cd "$1" && kustomize edit set image "lookalike=$2")
  else
    python3 docker/pin_image.py "$1" "$2"
  fi
}

if [ "${1:-}" = pin ]; then
  [ $# -eq 3 ] || { echo "usage: $0 pin OVERLAY_DIR REPOSITORY@sha256:DIGEST" >&2; exit 2; }
  pin "$2" "$3"
  exit 0
fi
[ $# -eq 2 ] || { echo "usage: $0 REPOSITORY VERSION (e.g. ghcr.io/acme/lookalike 0.1.0)" >&2; exit 2; }
repo=$1 version=$2
meta=$(mktemp -d)
trap 'rm -rf "$meta"' EXIT
# The third-party images of k8s/base (Redis) are pinned there by tag and digest: the digest must exist in the
# registry (else the pods could not pull it: stop here); say when the tag has moved since, as for the base image.
for ref in $(sed -n 's/^ *image: \([^ ]*@sha256:[0-9a-f]*\).*/\1/p' k8s/base/*.yaml); do
  docker buildx imagetools inspect "$ref" >/dev/null \
    || { echo "error: $ref (k8s/base) is not in its registry: pin it to a digest the registry serves" >&2; exit 1; }
  now=$(docker buildx imagetools inspect "${ref%@*}" --format '{{json .Manifest.Digest}}' 2>/dev/null | tr -d '"' || true)
  if [ -n "$now" ] && [ "$now" != "${ref#*@}" ]; then echo "note: ${ref%@*} is now $now (k8s/base pins ${ref#*@})"; fi
done
for flavour in cpu gpu; do
  # the base image's digest in the Dockerfile is checked by the build itself (a FROM by digest pulls those bytes or
  # fails); say when the tag has moved since, so that the next release can take the new base on purpose
  base=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' "docker/Dockerfile.$flavour" | head -1)
  now=$(docker buildx imagetools inspect "${base%@*}" --format '{{json .Manifest.Digest}}' 2>/dev/null | tr -d '"' || true)
  [ -n "$now" ] && [ "$now" != "${base#*@}" ] && echo "note: ${base%@*} is now $now (the Dockerfile pins ${base#*@})"
  docker buildx build --platform linux/amd64 -f "docker/Dockerfile.$flavour" -t "$repo:$version-$flavour" \
    --push --metadata-file "$meta/$flavour.json" .
  digest=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["containerimage.digest"])' \
    "$meta/$flavour.json")
  pin "k8s/overlays/$flavour" "$repo@$digest"
  echo "$flavour: $repo:$version-$flavour = $repo@$digest (k8s/overlays/$flavour pinned)"
done
