#!/usr/bin/env bash
# Recovery of a lost machine beside `restic restore`: FILES files (default
# 10,000, TOTAL_BYTES in all, default 1 GiB) are copied into a Fincrypt mount
# that places them on three `fincrypt serve` nodes on 127.0.0.1 at redundancy
# 3 and replicated (`sync --replicated`); the owner's home is then removed and
# recovered from the phrase and one node's address, without and with --all.
# The same tree is backed up into a local restic repository and restored.
# Prints a Markdown table (rows for docs/PERFORMANCE.md; the docs are not
# touched).
#
#   scripts/bench-recover.sh
#   FILES=1000 TOTAL_BYTES=100000000 scripts/bench-recover.sh   # a quick look
#
# Environment:
#   FILES, TOTAL_BYTES  the data set (10000, 1073741824), made by
#                       scripts/lib/scale-tree.py with SEED (1)
#   BIN_DIR             fincrypt and fincryptctl to use; default: this
#                       checkout's release build (`cargo build --release --locked`)
#   BENCH_DIR           work directory (/var/tmp/fincrypt-bench-recover),
#                       removed at the end unless KEEP=1
#
# What is measured:
# - recover: wall seconds of `fincrypt recover --bootstrap NODE` on an empty
#   home, and the bytes it brought into the volume (du of HOME/volume): only
#   metadata and manifest blocks, since file data comes on first read.
# - recover --all: the same with every data block fetched.
# - restic restore: wall seconds of `restic restore latest --target DIR` from
#   a repository on the same disk (restic from Debian), and the bytes written.
# - files/s: files in the tree over the seconds; for recover without --all
#   this counts files whose metadata is back, not their data.
# Each timed step starts after a `sync`, so that none pays for the writeback
# of what the steps before it wrote (the copy leaves gigabytes dirty).
# After `recover --all`, the recovered tree is mounted with every node stopped
# and compared with the source (diff -r), so the figures are of a recovery
# that worked.
#
# Needs: FUSE (fusermount3), python3, restic (apt install restic), cargo (for
# the build), about 6 GiB free at the default size.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${BENCH_DIR:-/var/tmp/fincrypt-bench-recover}
FILES=${FILES:-10000}
TOTAL_BYTES=${TOTAL_BYTES:-1073741824}
SEED=${SEED:-1}
KEEP=${KEEP:-0}
START_LIMIT=60
export FINCRYPT_PASSPHRASE=bench-recover-passphrase
export RESTIC_PASSWORD=bench-recover-passphrase

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "bench-recover: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
bytes_in() { du -s --block-size=1 "$1" | awk '{ print $1 }'; }

wait_for() {
  local deadline=$(($(date +%s) + $1)); shift
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

command -v restic >/dev/null || die "restic is not installed (apt install restic)"
command -v fusermount3 >/dev/null || die "fusermount3 is missing (apt install fuse3)"

if [ -n "${BIN_DIR:-}" ]; then
  BIN=$BIN_DIR
else
  log "building this checkout (release)"
  (cd "$ROOT" && cargo build --release --locked --bins >&2)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
FC=$BIN/fincrypt
CTL=$BIN/fincryptctl

rm -rf "$WORK"
mkdir -p "$WORK"
NODE_PIDS=()
MNT=$WORK/mnt
mkdir -p "$MNT"
cleanup() {
  mountpoint -q "$MNT" 2>/dev/null && { fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" || true; }
  local p
  for p in "${NODE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ "$KEEP" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

log "writing the data set: $FILES files, $TOTAL_BYTES bytes"
python3 "$ROOT/scripts/lib/scale-tree.py" "$WORK/src" "$FILES" "$TOTAL_BYTES" "$SEED" >"$WORK/tree.json"

ADDRS=()
for i in 1 2 3; do
  "$FC" --home "$WORK/node$i" serve --listen /ip4/127.0.0.1/tcp/0 --capacity 20GiB \
    2>"$WORK/node$i.log" &
  NODE_PIDS+=($!)
done
for i in 1 2 3; do
  wait_for "$START_LIMIT" grep -q "listening on /ip4/127.0.0.1/tcp/" "$WORK/node$i.log" ||
    die "node $i did not come up"
  ADDRS+=("$(grep -o 'listening on /ip4/127.0.0.1/tcp/[^ ]*' "$WORK/node$i.log" | head -1 | cut -d' ' -f3)")
done
BOOT=()
for a in "${ADDRS[@]}"; do BOOT+=(--bootstrap "$a"); done

log "the owner: init, mount, copy, sync --replicated"
OWNER=$WORK/owner
PHRASE=$("$FC" --home "$OWNER" init 2>/dev/null)
sed -i 's/^snapshot_interval = .*/snapshot_interval = 0/; s/^redundancy = .*/redundancy = 3/' "$OWNER/config.toml"
"$FC" --home "$OWNER" mount "$MNT" --listen /ip4/127.0.0.1/tcp/0 "${BOOT[@]}" 2>"$WORK/owner.log" &
OWNER_PID=$!
wait_for "$START_LIMIT" mountpoint -q "$MNT" || die "the owner's mount did not come up"
cp -r "$WORK/src/." "$MNT/"
"$CTL" --home "$OWNER" sync --replicated --timeout 3600 >/dev/null
fusermount3 -u "$MNT"
wait "$OWNER_PID" || true
# The home is lost: moved out of reach rather than removed, since removing
# thousands of files here just before the recovery makes this filesystem
# slow to create the recovery's own (ext4 passes over inodes freed moments
# ago), a cost a new machine does not have. Removed with the work directory.
mv "$OWNER" "$WORK/lost-home"

recover_into() {  # HOME [--all]: seconds, then bytes in its volume
  local home=$1; shift
  local t0 t1
  # What the steps before wrote (gigabytes, at first) is on disk before the
  # clock starts, so that no timed step pays for another's writeback.
  sync
  t0=$(now)
  FINCRYPT_LOG=warn,fincrypt::recover=info FINCRYPT_RECOVERY_PHRASE=$PHRASE "$FC" --home "$home" recover --bootstrap "${ADDRS[0]}" "$@" \
    >"$home.out" 2>"$home.err" || die "recover $* failed: $(cat "$home.err")"
  t1=$(now)
  # Where the time went, step by step, for the log.
  sed -n 's/.*recovery step done step=\(.*\) ms=\([0-9]*\).*/  \1: \2 ms/p' "$home.err" >&2
  echo "$(elapsed "$t0" "$t1") $(bytes_in "$home/volume")"
}

log "recover (metadata only)"
read -r META_S META_B < <(recover_into "$WORK/recovered")
log "recover --all"
read -r ALL_S ALL_B < <(recover_into "$WORK/recovered-all" --all)

log "checking the --all recovery with every node stopped"
for p in "${NODE_PIDS[@]}"; do kill "$p"; done
wait "${NODE_PIDS[@]}" 2>/dev/null || true
NODE_PIDS=()
"$FC" --home "$WORK/recovered-all" mount "$MNT" 2>"$WORK/check.log" &
CHECK_PID=$!
wait_for "$START_LIMIT" mountpoint -q "$MNT" || die "the recovered mount did not come up"
diff -r "$WORK/src" "$MNT" >/dev/null || die "the recovered tree differs from the source"
fusermount3 -u "$MNT"
wait "$CHECK_PID" || true

log "restic: backup, then restore"
restic init --repo "$WORK/restic" >/dev/null 2>&1
restic --repo "$WORK/restic" backup "$WORK/src" >/dev/null 2>&1
sync
t0=$(now)
restic --repo "$WORK/restic" restore latest --target "$WORK/restic-out" >/dev/null 2>&1
t1=$(now)
RESTIC_S=$(elapsed "$t0" "$t1")
RESTIC_B=$(bytes_in "$WORK/restic-out")
diff -r "$WORK/src" "$WORK/restic-out$WORK/src" >/dev/null || die "restic's restore differs"

cat <<EOF

| $FILES files, $(mib "$TOTAL_BYTES") MiB, 3 nodes on loopback | seconds | bytes fetched or written, MiB | files/s |
|---|---:|---:|---:|
| \`fincrypt recover\` (metadata only) | $META_S | $(mib "$META_B") | $(rate "$FILES" "$META_S") |
| \`fincrypt recover --all\` | $ALL_S | $(mib "$ALL_B") | $(rate "$FILES" "$ALL_S") |
| \`restic restore\` (local repository) | $RESTIC_S | $(mib "$RESTIC_B") | $(rate "$FILES" "$RESTIC_S") |
EOF
