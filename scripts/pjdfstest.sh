#!/usr/bin/env bash
# Runs pjdfstest (the Rust port) as root against a Fincrypt mount made with
# --allow-other, with a tmpfs as the second filesystem for cross-device tests.
# Prints a closing line "pjdfstest: N passed, N failed, N skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

[ "$(id -u)" -eq 0 ] || { echo "pjdfstest.sh: must run as root (it switches users)" >&2; exit 1; }
command -v pjdfstest >/dev/null || cargo install --locked --quiet pjdfstest --version 0.2.2
id tests >/dev/null 2>&1 || useradd --user-group --no-create-home --home-dir / --shell /usr/sbin/nologin tests
cargo build --quiet --locked --bins
bin="${CARGO_TARGET_DIR:-$root/target}/debug/fincrypt"

work=$(mktemp -d /tmp/fincrypt-pjdfstest.XXXXXX)
# The switched-to users must be able to reach the mount.
chmod 755 "$work"
mkdir -p "$work/home" "$work/mnt" "$work/second"
cleanup() {
  cd /
  mountpoint -q "$work/mnt" && fusermount3 -u -z "$work/mnt" || true
  mountpoint -q "$work/second" && umount "$work/second" || true
  [ -n "${daemon:-}" ] && wait "$daemon" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

export FINCRYPT_PASSPHRASE=pjdfstest
"$bin" --home "$work/home" init >/dev/null
export FINCRYPT_SNAPSHOT_INTERVAL=0
mount -t tmpfs tmpfs "$work/second"
"$bin" --home "$work/home" mount --allow-other "$work/mnt" 2>"$work/daemon.log" &
daemon=$!
for _ in $(seq 200); do mountpoint -q "$work/mnt" && break; sleep 0.05; done
mountpoint -q "$work/mnt" || { cat "$work/daemon.log" >&2; exit 1; }

set +e
(cd "$work/mnt" && pjdfstest -c "$root/tests/pjdfstest.toml" -p "$work/mnt" -s "$work/second") >"$work/out" 2>&1
rc=$?
set -e
grep -E "FAILED|panicked" -A12 "$work/out" || true
summary=$(grep -E "^Summary:" "$work/out" || echo "Summary: no summary (pjdfstest exited $rc)")
echo "$summary"
fusermount3 -u "$work/mnt"
wait "$daemon"
daemon=""
failed=$(sed -n 's/^Summary: \([0-9]*\) failed.*/\1/p' <<<"$summary")
skipped=$(sed -n 's/.* \([0-9]*\) skipped.*/\1/p' <<<"$summary")
passed=$(sed -n 's/.* \([0-9]*\) passed.*/\1/p' <<<"$summary")
echo "pjdfstest: ${passed:-0} passed, ${failed:-1} failed, ${skipped:-0} skipped"
exit $rc
