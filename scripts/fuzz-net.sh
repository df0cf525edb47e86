#!/usr/bin/env bash
# Fuzzes the decoders of what peers send each other, with cargo-fuzz and
# libFuzzer, for a bounded time; exits non-zero if it finds a crash. Two
# targets in net/fuzz, run one after the other, EACH for FUZZ_SECONDS (so the
# whole run takes twice that, plus the builds):
#   decode  the peer protocol's messages (fincrypt-net)
#   market  the storage market's offers, proposals, contracts, paid
#           notices and mediator messages (fincrypt-market)
#
#   scripts/fuzz-net.sh            both targets, 60 seconds each
#   FUZZ_SECONDS=600 scripts/fuzz-net.sh
#   scripts/fuzz-net.sh market     only the targets named
#
# Needs rustup (for a nightly toolchain) and installs what else it needs:
# the nightly toolchain (minimal profile) and cargo-fuzz. Each target's corpus
# grows in net/fuzz/corpus/<target> (git-ignored): decode's is seeded with one
# frame per message kind, market's with one paid notice (offers and contracts
# need a node's signature, so none is written here). A crashing input is saved
# in net/fuzz/artifacts/<target>/; a crash in one target does not stop the
# other from running.
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

TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(decode market)
for target in "${TARGETS[@]}"; do
  case $target in
    decode|market) ;;
    *) echo "fuzz-net: no target $target (decode, market)" >&2; exit 2 ;;
  esac
done

seed_decode() {
  # Seeds come from the encoder itself, so they follow the format as it is now.
  FINCRYPT_FUZZ_SEEDS=$1 cargo test -q --manifest-path "$ROOT/Cargo.toml" \
    -p fincrypt-net --lib proto::tests::write_fuzz_seeds -- --ignored >/dev/null
}

seed_market() {
  # A paid notice, written out by hand in postcard's layout: version 1, the
  # contract id (16 bytes of 7), the txid's length (64) and 64 hex digits,
  # one item: period 0, 1 satoshi. Should the layout change, it is merely a
  # seed that no longer decodes.
  {
    printf '\x01'
    printf '\x07%.0s' $(seq 16)
    printf '\x40'
    printf 'ab%.0s' $(seq 32)
    printf '\x01\x00\x01'
  } >"$1/paid-notice"
  # A client's ask (version 1, DepositAddress) and a mediator's answer
  # (version 1, DepositAddress with a 5-byte address).
  printf '\x01\x00' >"$1/mediator-ask"
  printf '\x01\x00\x05mn2ab' >"$1/mediator-reply"
}

failed=()
for target in "${TARGETS[@]}"; do
  CORPUS=$ROOT/net/fuzz/corpus/$target
  mkdir -p "$CORPUS"
  "seed_$target" "$CORPUS"
  # The market's messages are refused over 1 KiB: longer inputs test nothing more.
  case $target in decode) MAX_LEN=65536 ;; market) MAX_LEN=2048 ;; esac
  echo "fuzz-net: fuzzing $target for ${SECONDS_TO_RUN}s" >&2
  # -rss_limit_mb: a decoder that allocates from an untrusted length fails loudly.
  if (cd "$ROOT/net" && cargo +nightly fuzz run "$target" "$CORPUS" -- \
      -max_total_time="$SECONDS_TO_RUN" -max_len="$MAX_LEN" -rss_limit_mb=1024 -print_final_stats=1); then
    echo "fuzz-net: no crash in $target in ${SECONDS_TO_RUN}s"
  else
    echo "fuzz-net: $target failed; see net/fuzz/artifacts/$target/" >&2
    failed+=("$target")
  fi
done
[ ${#failed[@]} -eq 0 ] || { echo "fuzz-net: crashed or failed: ${failed[*]}" >&2; exit 1; }
