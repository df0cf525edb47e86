#!/usr/bin/env bash
# A small Fincrypt network on one machine: NODES storage nodes (default 4) on
# 127.0.0.1 and a mount that places its blocks on them.
#
#   scripts/local-network.sh [DIR]
#
# Everything lives under DIR (default: a new temporary directory). The script
# prints what it started and waits; Ctrl-C unmounts and stops every node.
# Environment: NODES, BASE_PORT (default 4101), FINCRYPT_PASSPHRASE (default
# "local network demo"; the home is created with it on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-4}
BASE_PORT=${BASE_PORT:-4101}
DIR=${1:-$(mktemp -d -t fincrypt-net-XXXXXX)}
export FINCRYPT_PASSPHRASE=${FINCRYPT_PASSPHRASE:-local network demo}

cargo build --quiet --bins
BIN=target/debug
mkdir -p "$DIR"

pids=()
cleanup() {
  if mountpoint -q "$DIR/mnt" 2>/dev/null; then
    fusermount3 -u "$DIR/mnt" || true
  fi
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  wait || true
}
trap cleanup EXIT INT TERM

bootstrap=()
for i in $(seq 1 "$NODES"); do
  home="$DIR/node$i"
  port=$((BASE_PORT + i - 1))
  mkdir -p "$home"
  "$BIN/fincrypt" --home "$home" serve --listen "/ip4/127.0.0.1/tcp/$port" \
    --capacity 2GiB 2>"$home/serve.log" &
  pids+=($!)
  # The node prints its full address (with /p2p/<PeerId>) once it listens.
  for _ in $(seq 1 600); do
    addr=$(sed -n 's/^fincrypt serve: listening on //p' "$home/serve.log" | head -n1)
    [ -n "$addr" ] && break
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then
      cat "$home/serve.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "node $i did not come up" >&2; exit 1; }
  echo "node $i: $addr"
  bootstrap+=(--bootstrap "$addr")
done

owner="$DIR/owner"
if [ ! -e "$owner/key.toml" ]; then
  "$BIN/fincrypt" --home "$owner" init >"$owner.phrase"
  echo "owner initialised; recovery phrase in $owner.phrase"
fi
mkdir -p "$DIR/mnt"
"$BIN/fincrypt" --home "$owner" mount "$DIR/mnt" \
  --listen "/ip4/127.0.0.1/tcp/$((BASE_PORT + NODES))" "${bootstrap[@]}" \
  2>"$owner.log" &
pids+=($!)
for _ in $(seq 1 600); do
  mountpoint -q "$DIR/mnt" && break
  sleep 0.1
done
mountpoint -q "$DIR/mnt" || { cat "$owner.log" >&2; exit 1; }

cat <<INFO

Mounted on $DIR/mnt. Try:
  $BIN/fincryptctl --home $owner redundancy set $DIR/mnt 3
  cp -r some/files $DIR/mnt/
  $BIN/fincryptctl --home $owner sync --replicated --timeout 60
  $BIN/fincryptctl --home $owner status
  $BIN/fincryptctl --home $DIR/node1 status
Ctrl-C stops everything.
INFO
wait "${pids[-1]}"
