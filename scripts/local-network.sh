#!/usr/bin/env bash
# A small Fincrypt network on one machine: NODES storage nodes (default 4) on
# 127.0.0.1 and a mount that places its blocks on them.
#
#   scripts/local-network.sh [DIR]
#
# Everything lives under DIR (default: a new temporary directory; a relative
# DIR is taken from where you run the script). The script builds the release
# binaries (`cargo build --release --locked`, into $CARGO_TARGET_DIR or
# target/), prints what it started and waits; Ctrl-C unmounts and stops every
# node. Files it creates under DIR (the recovery phrase in DIR/owner.phrase,
# logs, homes) are readable by you alone.
# Environment: NODES, BASE_PORT (default 4101: the nodes listen on
# BASE_PORT..BASE_PORT+NODES-1, the mount on BASE_PORT+NODES),
# FINCRYPT_PASSPHRASE (default "local network demo"; the home is created
# with it on first use), PRICES (e.g. "10 20 50": node i asks the i-th
# price in satoshis per GiB per period; default: every node is free). Other
# FINCRYPT_* variables reach every node and the mount alike (for paid
# storage: the bitcoin_rpc_* of scripts/regtest.sh, period, max_price).
set -euo pipefail

NODES=${NODES:-4}
read -r -a prices <<<"${PRICES:-}"
for p in "${prices[@]}"; do
  [[ $p =~ ^[0-9]+$ ]] || { echo "local-network: PRICES must be numbers of satoshis, not $p" >&2; exit 1; }
done
BASE_PORT=${BASE_PORT:-4101}
[[ $NODES =~ ^[0-9]+$ && $BASE_PORT =~ ^[0-9]+$ ]] ||
  { echo "local-network: NODES and BASE_PORT must be numbers" >&2; exit 1; }
export FINCRYPT_PASSPHRASE=${FINCRYPT_PASSPHRASE:-local network demo}
# The directory is made absolute before the cd below, so that a relative one
# means what it says and the commands printed at the end work from anywhere.
if [ "$#" -gt 0 ]; then
  (umask 077 && mkdir -p -- "$1")
  DIR=$(cd -- "$1" && pwd)
else
  DIR=$(mktemp -d -t fincrypt-net-XXXXXX)
fi
cd "$(dirname "$0")/.."
ROOT=$(pwd)

scripts/setup.sh   # fuse3 (fusermount3) and pkg-config, when missing
# One build, the one used below: release, the same binaries run.sh uses.
TARGET=${CARGO_TARGET_DIR:-target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BIN=$TARGET/release
echo "building release binaries into $BIN (cargo build --release --locked --bins)" >&2
cargo build --release --locked --bins

# From here on every file and directory the script or the programs it starts
# create is private from the moment it exists: the recovery phrase above all,
# but also logs and homes.
umask 077

if findmnt -M "$DIR/mnt" >/dev/null 2>&1; then
  echo "local-network: $DIR/mnt is mounted already (another run of this script, or one" \
    "that died); stop that one, or unmount with: fusermount3 -u $DIR/mnt" >&2
  exit 1
fi

pids=()
cleanup() {
  trap - INT TERM
  if mountpoint -q "$DIR/mnt" 2>/dev/null; then
    fusermount3 -u "$DIR/mnt" 2>/dev/null || fusermount3 -uz "$DIR/mnt" 2>/dev/null || true
  fi
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bootstrap=()
for i in $(seq 1 "$NODES"); do
  home="$DIR/node$i"
  port=$((BASE_PORT + i - 1))
  mkdir -p "$home"
  price=${prices[$((i - 1))]:-0}
  "$BIN/fincrypt" --home "$home" serve --listen "/ip4/127.0.0.1/tcp/$port" \
    --capacity 2GiB --price "$price" 2>"$home/serve.log" &
  pids+=($!)
  # The node prints its full address (with /p2p/<PeerId>) once it listens.
  addr=""
  for _ in $(seq 1 600); do
    addr=$(sed -n 's/^fincrypt serve: listening on //p;T;q' "$home/serve.log")
    [ -n "$addr" ] && break
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then
      echo "node $i stopped (port $port in use?):" >&2
      cat "$home/serve.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "node $i did not come up; its log is $home/serve.log" >&2; exit 1; }
  echo "node $i: $addr (log $home/serve.log)"
  bootstrap+=(--bootstrap "$addr")
done

owner="$DIR/owner"
phrase="$DIR/owner.phrase"
if [ ! -e "$owner/key.toml" ]; then
  # A fresh file (umask 077: mode 600 from creation), not an old one reused.
  rm -f "$phrase"
  if ! init_log=$("$BIN/fincrypt" --home "$owner" init 2>&1 >"$phrase"); then
    echo "$init_log" >&2
    exit 1
  fi
  echo "owner initialised; its recovery phrase is in $phrase (readable by you alone)"
elif [ -e "$phrase" ]; then
  chmod 600 "$phrase"   # written world-readable by earlier versions of this script
fi
mkdir -p "$DIR/mnt"
"$BIN/fincrypt" --home "$owner" mount "$DIR/mnt" \
  --listen "/ip4/127.0.0.1/tcp/$((BASE_PORT + NODES))" "${bootstrap[@]}" \
  2>"$owner.log" &
pids+=($!)
for _ in $(seq 1 600); do
  mountpoint -q "$DIR/mnt" && break
  kill -0 "${pids[-1]}" 2>/dev/null || break
  sleep 0.1
done
mountpoint -q "$DIR/mnt" || { echo "the mount did not come up:" >&2; cat "$owner.log" >&2; exit 1; }

cat <<INFO

Mounted on $DIR/mnt (log $owner.log). Try:
  $BIN/fincryptctl --home $owner redundancy set $DIR/mnt 3
  cp -r some/files $DIR/mnt/
  $BIN/fincryptctl --home $owner sync --replicated --timeout 60
  $BIN/fincryptctl --home $owner status
  $BIN/fincryptctl --home $DIR/node1 status
  $BIN/fincryptctl --home $owner manifest
Ctrl-C stops everything. If the mount stops (unmounted, or killed to play a
lost machine), the nodes keep running until Ctrl-C: README.md, "If your
machine is lost", shows how to bring the files back from them.
INFO
wait "${pids[-1]}" || true
echo "the mount has stopped; the nodes keep running until Ctrl-C" >&2
wait
