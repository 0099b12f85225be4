#!/usr/bin/env bash
# Refresh requirements/lock.txt, the environment `make setup` and CI install (with hashes).
#   requirements/lock.sh            after a change to pyproject.toml: keep every other pin
#   requirements/lock.sh --upgrade  every package to the newest version pyproject allows
# pip-compile (pip-tools) resolves pyproject.toml's dependencies and its `test` extra, plus
# requirements/build.in (pip, setuptools), and records every file's hash. The packages of
# requirements/nodeps.in cannot be resolved with the rest (torchattacks pins an old
# requests); they are appended, pinned and hashed, and installed like everything else:
# `make setup` installs the whole lock with --no-deps, so no resolver runs at install time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TOOL=${LOCK_TOOL_VENV:-.venv-lock}
LOCK=requirements/lock.txt
if [ ! -x "$TOOL/bin/pip-compile" ]; then
  "$PYTHON" -m venv "$TOOL"
  "$TOOL/bin/pip" install --quiet pip-tools==7.7.0
fi
"$TOOL/bin/pip-compile" --quiet "$@" --generate-hashes --allow-unsafe --strip-extras --extra test --extra cluster \
  --no-emit-index-url --no-emit-find-links --output-file "$LOCK" pyproject.toml requirements/build.in
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
  echo
  echo "# ---- requirements/nodeps.in: installed with the rest, never resolved with it ----"
  grep -Ev '^\s*(#|$)' requirements/nodeps.in | while read -r pin; do
    rm -f "$tmp"/*
    "$TOOL/bin/pip" download --quiet --no-deps --only-binary :all: "$pin" -d "$tmp" >/dev/null
    echo "$pin \\"
    for f in "$tmp"/*; do echo "    --hash=sha256:$(sha256sum "$f" | cut -d' ' -f1)"; done
  done
} >> "$LOCK"
echo "wrote $LOCK: $(grep -c '==' "$LOCK") packages"
