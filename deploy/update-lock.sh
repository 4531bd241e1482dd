#!/usr/bin/env bash
# Regenerates the hash-locked requirement files the image is built from:
#   deploy/requirements.lock        epp's runtime dependencies ([project] dependencies in pyproject.toml)
#   deploy/requirements-build.lock  the build backend (deploy/requirements-build.in)
# for the image's platform (Linux x86_64, CPython 3.11), whatever machine runs this. Run it from anywhere
# after changing a dependency in pyproject.toml:  deploy/update-lock.sh
# It installs the pinned resolver (uv) into a throwaway virtualenv, never into your environment.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"

compile() {
  "$tools/venv/bin/uv" pip compile "$1" --output-file "$2" \
    --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "deploy/update-lock.sh" --quiet
}
compile pyproject.toml deploy/requirements.lock
compile deploy/requirements-build.in deploy/requirements-build.lock
echo "updated deploy/requirements.lock and deploy/requirements-build.lock" >&2
