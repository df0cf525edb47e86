#!/usr/bin/env bash
# Fuzzes the peer protocol's message decoder (net/fuzz, target "decode") for a
# bounded time with cargo-fuzz and libFuzzer; exits non-zero if it finds a crash.
#
#   scripts/fuzz-net.sh            60 seconds
#   FUZZ_SECONDS=600 scripts/fuzz-net.sh
#
# Needs rustup (for a nightly toolchain) and installs what else it needs:
# the nightly toolchain (minimal profile) and cargo-fuzz. The corpus grows in
# net/fuzz/corpus/decode (git-ignored), seeded with one frame per message kind;
# a crashing input is saved in net/fuzz/artifacts/decode/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_TO_RUN=${FUZZ_SECONDS:-60}

command -v rustup >/dev/null || { echo "fuzz-net: rustup is needed for a nightly toolchain" >&2; exit 1; }
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz-net: installing the nightly toolchain" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-net: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

CORPUS=$ROOT/net/fuzz/corpus/decode
mkdir -p "$CORPUS"
# Seeds come from the encoder itself, so they follow the format as it is now.
FINCRYPT_FUZZ_SEEDS=$CORPUS cargo test -q --manifest-path "$ROOT/Cargo.toml" \
  -p fincrypt-net --lib proto::tests::write_fuzz_seeds -- --ignored >/dev/null

cd "$ROOT/net"
# -rss_limit_mb: a decoder that allocates from an untrusted length fails loudly.
cargo +nightly fuzz run decode "$CORPUS" -- \
  -max_total_time="$SECONDS_TO_RUN" -max_len=65536 -rss_limit_mb=1024 -print_final_stats=1
echo "fuzz-net: no crash in ${SECONDS_TO_RUN}s"
