#!/usr/bin/env bash
# Builds Fincrypt and runs it with its embedded default: one machine, the
# local store, no peers, mounted at ~/fincrypt (or the directory given).
# The first run creates an identity and shows its recovery phrase once.
# Stop it with Ctrl-C or `fusermount3 -u ~/fincrypt`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked --bins
mnt="${1:-$HOME/fincrypt}"
# A mount point left by a killed mount cannot be created or even looked at:
# fincrypt itself says what to do then.
mkdir -p "$mnt" 2>/dev/null || true
exec target/release/fincrypt mount "$mnt"
