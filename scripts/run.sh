#!/usr/bin/env bash
# Builds Fincrypt and runs it with its embedded default: one machine, the local
# store, no peers. The first run creates an identity and shows its recovery phrase.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked --bins
bin="$PWD/target/release/fincrypt"
if ! "$bin" scrub >/dev/null 2>&1; then
  "$bin" init
fi
"$bin" scrub
