#!/usr/bin/env bash
# Runs every Fincrypt test: unit, property, crash and end-to-end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --locked "$@"
