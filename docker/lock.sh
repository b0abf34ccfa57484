#!/usr/bin/env bash
# Regenerates the images' lock files from pyproject.toml's dependencies, docker/requirements-{cpu,gpu}.in and the
# versions of docker/constraints.txt: every package the image installs, pinned (==) with the sha256 of each of its
# files on PyPI. The Dockerfiles install them with `pip install --require-hashes --no-deps`: a package that is not
# in the lock, or a file whose hash differs, fails the build.
#
#   docker/lock.sh            # after changing a dependency or a constraint; commit the .lock files
#
# Needs uv (pip install uv==0.13.9) and PyPI. The images run Python 3.11 on Debian bookworm (glibc 2.36), x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
for flavour in cpu gpu; do
  extra=()
  [ "$flavour" = gpu ] && extra=(--no-emit-package faiss-cpu)
  uv pip compile pyproject.toml "docker/requirements-$flavour.in" -c docker/constraints.txt "${extra[@]}" \
    --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command docker/lock.sh --quiet -o "docker/requirements-$flavour.lock"
done
