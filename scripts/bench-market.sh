#!/usr/bin/env bash
# One period's settlement for CONTRACTS contracts (default 100) on a real
# regtest node (scripts/regtest.sh): the holders' proofs, the owner's checks
# and ledger, and one sendmany for every holder, beside one transaction per
# holder. Holders are simulated in one process (100 daemons are too many for
# 2 cores); the proofs, the ledger and the payments are real. Prints Markdown
# rows for docs/PERFORMANCE.md.
#
#   scripts/bench-market.sh
#   CONTRACTS=20 scripts/bench-market.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONTRACTS=${CONTRACTS:-100}
WORK=$(mktemp -d -t fincrypt-bench-market-XXXXXX)
trap 'scripts/regtest.sh stop "$WORK/node" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

cargo build --quiet --locked -p fincrypt-market --example bench_settle
eval "$(scripts/regtest.sh start "$WORK/node" | sed 's/^/export /')"
# One confirmed coin per payment, and one for the batch.
scripts/regtest.sh cli "$WORK/node" generatetoaddress $((CONTRACTS + 10)) \
  "$(scripts/regtest.sh cli "$WORK/node" getnewaddress)" >/dev/null
CONTRACTS=$CONTRACTS "${CARGO_TARGET_DIR:-target}/debug/examples/bench_settle"
