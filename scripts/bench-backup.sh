#!/usr/bin/env bash
# Watched folders beside restic (issue 18): backs the same two trees up with
# `fincrypt backup` (a watched folder) and with restic into a local
# repository, one tool after the other, and prints a Markdown table per tree
# (rows for docs/PERFORMANCE.md; the docs are not touched).
#
#   scripts/bench-backup.sh
#   BENCH_SIZE=67108864 SRC_FILES=2000 BENCH_ROUNDS=1 scripts/bench-backup.sh   # a quick look
#
# Environment:
#   BENCH_SIZE      bytes of the random tree (1073741824), in RANDOM_FILES
#                   files of equal size (8), from /dev/urandom
#   SRC_FILES       the source tree: whole crates of the local cargo registry
#   SRC_BYTES       (~/.cargo/registry/src), in name order, until SRC_FILES
#                   files (20000) or SRC_BYTES bytes (209715200); the
#                   Windows import-library crates (binary blobs) left out
#   SETTLE          the home's watch_settle, seconds (1)
#   BIN_DIR         fincrypt and fincryptctl to use; default: this checkout's
#                   release build, made here into BENCH_TARGET
#                   (/tmp/rel-target), a side target dir so that it does not
#                   touch the builds others make in target/
#   BENCH_DIR       work directory (/tmp/fincrypt-bench-backup): trees,
#                   homes, repositories, restores; removed at the end unless
#                   KEEP=1
#   BENCH_ROUNDS    rounds (3): each runs every step below for both tools on
#                   a fresh repository and home; the tables show each tool's
#                   best round per step (others' work on a shared machine only
#                   ever slows a step down) and list every round
#   STEP_TIMEOUT    seconds any one step may take (3600)
#
# Each round's repositories, homes and restores are kept until the end: on
# this machine's ext4 without a journal, creating a file scans the inodes
# freed in the last minutes, so deleting a restore just before the next tool
# creates its files would cost that tool (see bench-net.sh).
#
# For each tree, restic first, then Fincrypt, each step with the page cache
# dropped first (as root; otherwise the run says so):
# - first backup: restic: `restic backup SRC` into a fresh repository
#   (`restic init`, repository and cache under BENCH_DIR). Fincrypt: a fresh
#   home (snapshot_interval = 0, watch_settle = SETTLE) watching SRC; from
#   starting `fincrypt backup` until `fincryptctl watch status` shows
#   scans >= 1, pending == 0 and last_backed_up set (polled every 0.1 s by
#   one Python process). Then `fincryptctl sync` (every block sealed and
#   stored, a root committed) is timed on its own, and the daemon stopped
#   (SIGTERM; the time until it exits is logged).
# - rescan of the unchanged tree: restic: a second `restic backup` (it takes
#   the first snapshot as its parent). Fincrypt: the daemon started again,
#   timed until its first full scan is done (scans >= 1, pending == 0); the
#   bytes it read from the folder (bytes_read) are recorded, 0 when no
#   unchanged file is read again. Then the same once more without dropping
#   the page cache (restic: a third backup; Fincrypt: another restart).
#   Then the running daemon is asked to rescan (`fincryptctl watch rescan`,
#   which returns once the scan is done), cache dropped and warm: what a
#   daemon that is not restarted does on `watch_rescan` or a lost event.
# - changed: 1% of the files (at least one) are changed: a file over 16 MiB
#   gets 1 MiB of fresh random bytes in its middle, a smaller one a line
#   appended. restic: `restic backup` once the change is written. Fincrypt,
#   daemon running: from the end of the change until pending == 0 and the
#   daemon has read at least the changed files' bytes (bytes_read), i.e.
#   every changed file is imported; this includes the watch_settle seconds
#   of quiet the daemon waits for, and the table also gives it without.
#   (pending alone is not enough: it drops to 0 when a sync starts, and
#   last_backed_up is in whole seconds.)
#   restic changes the files at 0, 100, 200, ... of the sorted list, Fincrypt
#   (which backed the tree up after restic's change) those at 50, 150, ...
# - restore: restic: `restic restore latest --target DIR`. Fincrypt:
#   `fincrypt restore NAME DIR` while the daemon runs (it does the work).
#   Timed until the command returns (the files are in the page cache, not
#   yet synced to disk: the same for both). Each restore is then compared
#   with the source (`diff -r --no-dereference`); any difference stops the
#   run.
# - stored bytes: `du -sb` (apparent size) of the restic repository and of
#   the home's volume (HOME/volume), after the first backup and at the end
#   (both versions kept); at the end also the whole Fincrypt home (files of
#   4 KiB or less are inline in fs/meta.redb, not in the volume) and, in the
#   notes, the allocated sizes (`du -s --block-size=1`).
# - CPU: user + system seconds of restic (bash `time`) and of the Fincrypt
#   daemon (/proc/PID/stat) over each step; "CPU %" is of one core (200 % is
#   both cores busy). The poller's own fincryptctl calls are not counted.
#
# Needs: python3, restic (installed with apt-get if missing and run as root),
# cargo (for the build), about 5 GiB per round free at the default size.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${BENCH_DIR:-/tmp/fincrypt-bench-backup}
BENCH_SIZE=${BENCH_SIZE:-1073741824}
RANDOM_FILES=${RANDOM_FILES:-8}
SRC_FILES=${SRC_FILES:-20000}
SRC_BYTES=${SRC_BYTES:-209715200}
SETTLE=${SETTLE:-1}
STEP_TIMEOUT=${STEP_TIMEOUT:-3600}
KEEP=${KEEP:-0}
ROUNDS=${BENCH_ROUNDS:-3}
ROUND=0
TARGET=${BENCH_TARGET:-/tmp/rel-target}
LOG=$WORK/bench.log
RESULTS=$WORK/results.tsv   # round <TAB> tree <TAB> tool <TAB> key <TAB> value
CLK_TCK=$(getconf CLK_TCK)
export FINCRYPT_PASSPHRASE=bench-backup-passphrase
export RESTIC_PASSWORD=bench-backup-passphrase
DAEMON_PID=""

log() { printf '[%s] %s\n' "$(date +%T)" "$*" | tee -a "$LOG" >&2; }
die() { log "bench-backup: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
rec() { printf '%s\t%s\t%s\t%s\t%s\n' "$ROUND" "$1" "$2" "$3" "$4" >>"$RESULTS"; }
apparent() { du -sb "$1" | cut -f1; }
allocated() { du -s --block-size=1 "$1" | cut -f1; }

CAN_DROP=0
[ "$(id -u)" -eq 0 ] && CAN_DROP=1
drop_caches() {
  sync
  [ "$CAN_DROP" = 0 ] || echo 3 >/proc/sys/vm/drop_caches
}

# ---------------------------------------------------------------- setup

install_restic() {
  command -v restic >/dev/null && return 0
  [ "$(id -u)" -eq 0 ] || die "restic is not installed (apt-get install -y restic)"
  log "installing restic"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic >/dev/null
}

# The tree may be mid-edit by someone else: a failed build says so and stops.
build() {
  if [ -n "${BIN_DIR:-}" ]; then
    BIN=$(cd "$BIN_DIR" && pwd)
    FC_VERSION="binaries in $BIN"
    return 0
  fi
  log "building this checkout (release) into $TARGET"
  if ! (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release --locked \
      --bin fincrypt --bin fincryptctl) >"$WORK/build.log" 2>&1; then
    tail -n 20 "$WORK/build.log" >&2
    die "the build failed"
  fi
  BIN=$TARGET/release
  FC_VERSION="release build of $(git -C "$ROOT" describe --always --dirty)"
}

# $1: RANDOM_FILES files of BENCH_SIZE / RANDOM_FILES random bytes each.
make_random_tree() {
  local i each=$((BENCH_SIZE / RANDOM_FILES))
  mkdir -p "$1"
  for i in $(seq -w 1 "$RANDOM_FILES"); do
    head -c "$each" /dev/urandom >"$1/random-$i.bin"
  done
}

# $1: whole crates from the cargo registry, in name order, until SRC_FILES
# files or SRC_BYTES bytes.
make_source_tree() {
  local reg crate files=0 bytes=0
  reg=$(ls -d "$HOME"/.cargo/registry/src/*/ | head -n 1)
  mkdir -p "$1"
  for crate in $(ls "$reg" | grep -Ev '^(winapi-(i686|x86_64)-pc-windows-gnu|windows)'); do
    cp -a "$reg/$crate" "$1/"
    files=$((files + $(find "$reg/$crate" -type f | wc -l)))
    bytes=$((bytes + $(du -sb "$reg/$crate" | cut -f1)))
    [ "$files" -lt "$SRC_FILES" ] && [ "$bytes" -lt "$SRC_BYTES" ] || break
  done
}

# Changes 1% of the regular files of tree $1 (at least one): those at
# $2, $2 + 100, ... of the sorted list (modulo its length). Prints the
# count and the changed files' bytes after the change.
change_tree() {
  python3 - "$1" "$2" <<'PY'
import os, sys
root, offset = sys.argv[1], int(sys.argv[2])
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
               if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f)))
count = max(1, len(files) // 100)
chosen = sorted({files[(offset + 100 * k) % len(files)] for k in range(count)})
total = 0
for path in chosen:
    size = os.path.getsize(path)
    if size > 16 << 20:
        with open(path, "r+b") as f:        # 1 MiB of new bytes in the middle
            f.seek(size // 2)
            f.write(os.urandom(1 << 20))
    else:
        with open(path, "ab") as f:         # a line at the end
            f.write(b"\n// changed by bench-backup %d\n" % offset)
    total += os.path.getsize(path)
print(len(chosen), total)
PY
}

# Compares a restore with the source; stops the run at any difference.
check_same() {  # SRC RESTORED WHAT
  if ! diff -r --no-dereference "$1" "$2" >"$WORK/diff.out" 2>&1; then
    head -n 20 "$WORK/diff.out" >&2
    die "$3: the restored tree differs from the source (see $WORK/diff.out)"
  fi
  log "$3: the restore is identical to the source"
}

# ---------------------------------------------------------------- restic

# Runs a command with its output in the log; sets WALL and CPU (user +
# system seconds of it and its children).
timed() {
  local TIMEFORMAT='%R %U %S' user sys
  { time timeout "$STEP_TIMEOUT" "$@" >>"$LOG" 2>&1; } 2>"$WORK/time.out" ||
    die "failed: $* (see $LOG)"
  read -r WALL user sys <"$WORK/time.out"
  CPU=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
}
restic_timed() { timed restic --repo "$REPO" --cache-dir "$WORK/restic-cache" "$@"; }

bench_restic() {  # TREE SRC
  local tree=$1 src=$2 n bytes
  REPO=$WORK/r$ROUND-$tree-restic-repo
  restic --repo "$REPO" init >>"$LOG" 2>&1
  rec "$tree" restic repo_version "$(restic --repo "$REPO" cat config 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')"

  log "$tree: restic first backup"
  drop_caches
  restic_timed backup --host bench "$src"
  rec "$tree" restic first_s "$WALL"; rec "$tree" restic first_cpu "$CPU"
  rec "$tree" restic stored_first "$(apparent "$REPO")"

  log "$tree: restic rescan of the unchanged tree"
  drop_caches
  restic_timed backup --host bench "$src"
  rec "$tree" restic rescan_s "$WALL"; rec "$tree" restic rescan_cpu "$CPU"
  log "$tree: restic rescan again, page cache warm"
  restic_timed backup --host bench "$src"
  rec "$tree" restic rescan_warm_s "$WALL"

  log "$tree: restic after changing 1% of the files"
  drop_caches
  read -r n bytes < <(change_tree "$src" 0) || die "$tree: changing the tree failed"
  rec "$tree" restic changed_files "$n"; rec "$tree" restic changed_bytes "$bytes"
  restic_timed backup --host bench "$src"
  rec "$tree" restic changed_s "$WALL"; rec "$tree" restic changed_cpu "$CPU"

  log "$tree: restic restore"
  drop_caches
  restic_timed restore latest --target "$WORK/r$ROUND-$tree-restic-out"
  rec "$tree" restic restore_s "$WALL"; rec "$tree" restic restore_cpu "$CPU"
  check_same "$src" "$WORK/r$ROUND-$tree-restic-out$src" "$tree: restic"

  rec "$tree" restic stored_end "$(apparent "$REPO")"
  rec "$tree" restic stored_end_alloc "$(allocated "$REPO")"
}

# ---------------------------------------------------------------- fincrypt

cpu_of() {  # PID: user + system seconds so far
  awk -v t="$CLK_TCK" '{ sub(/.*\) /, ""); printf "%.2f", ($12 + $13) / t }' "/proc/$1/stat"
}

# The daemon's busiest threads so far: "name CPU-s" of the top three.
busiest_threads() {  # PID
  local t
  for t in /proc/"$1"/task/*; do
    awk -v t="$CLK_TCK" -v n="$(cat "$t/comm")" '{ sub(/.*\) /, ""); printf "%s %.2f\n", n, ($12 + $13) / t }' "$t/stat"
  done | sort -k2 -rn | head -n 3 | paste -sd, - | sed 's/,/, /g'
}

start_daemon() {  # HOME LOG
  # Run from the work dir so a stray .env elsewhere cannot change settings.
  (cd "$WORK" && exec "$BIN/fincrypt" --home "$1" backup >>"$2" 2>&1) &
  DAEMON_PID=$!
}

stop_daemon() {
  local t0=$(now)
  kill -TERM "$DAEMON_PID"
  wait "$DAEMON_PID" || die "the fincrypt daemon exited with status $? (see its log)"
  log "fincrypt: the daemon stopped in $(elapsed "$t0" "$(now)") s"
  DAEMON_PID=""
}

# Polls `fincryptctl watch status --json` every 0.1 s until folder NAME
# meets the condition; prints the unix time it first did, the time the
# daemon first answered, and the folder's status as JSON on one line.
# One Python process for the whole wait, so that polling costs one short
# fincryptctl run per 0.1 s beside the daemon.
#   first          scans >= 1, pending == 0, last_backed_up set
#   read:N         pending == 0, bytes_read >= N, last_backed_up set
wait_status() {  # HOME NAME CONDITION
  timeout "$STEP_TIMEOUT" python3 - "$BIN/fincryptctl" "$1" "$2" "$3" "$DAEMON_PID" <<'PY'
import json, os, subprocess, sys, time
ctl, home, name, cond, pid = sys.argv[1:6]
answered = None
while True:
    if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z":
        sys.exit("the fincrypt daemon is gone")
    out = subprocess.run([ctl, "--home", home, "watch", "status", "--json"],
                         capture_output=True, text=True)
    t = time.time()
    if out.returncode == 0:
        answered = answered or t
        f = next(v for v in json.loads(out.stdout) if v["name"] == name)
        if cond == "first":
            done = f["scans"] >= 1
        else:
            done = f["bytes_read"] >= int(cond.split(":")[1])
        if done and f["pending"] == 0 and f["last_backed_up"] is not None:
            print(f"{t:.3f} {answered:.3f} {json.dumps(f, separators=(',', ':'))}")
            break
    time.sleep(0.1)
PY
}

field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

bench_fincrypt() {  # TREE SRC
  local tree=$1 src=$2 home=$WORK/r$ROUND-$tree-fincrypt-home dlog=$WORK/r$ROUND-$tree-fincrypt.log
  local t0 t1 t2 up st cpu0 n bytes base
  "$BIN/fincrypt" --home "$home" init >/dev/null 2>>"$LOG"
  sed -i "s/^snapshot_interval = .*/snapshot_interval = 0/; s/^watch_settle = .*/watch_settle = $SETTLE/" \
    "$home/config.toml"
  grep -q "^watch_settle = $SETTLE\$" "$home/config.toml" || die "could not set watch_settle in $home/config.toml"
  "$BIN/fincrypt" --home "$home" watch "$src" --name "$tree" >>"$LOG" 2>&1

  log "$tree: fincrypt first backup"
  drop_caches
  t0=$(now)
  start_daemon "$home" "$dlog"
  read -r t1 up st < <(wait_status "$home" "$tree" first) || die "$tree: the first backup did not finish"
  rec "$tree" fincrypt first_s "$(elapsed "$t0" "$t1")"
  rec "$tree" fincrypt first_up_s "$(elapsed "$t0" "$up")"
  rec "$tree" fincrypt first_cpu "$(cpu_of "$DAEMON_PID")"
  rec "$tree" fincrypt first_threads "$(busiest_threads "$DAEMON_PID")"
  rec "$tree" fincrypt first_files "$(field "$st" files)"
  rec "$tree" fincrypt first_bytes_read "$(field "$st" bytes_read)"
  rec "$tree" fincrypt errors "$(field "$st" error_count)"
  [ "$(field "$st" error_count)" = 0 ] || log "$tree: fincrypt reports errors: $st"
  t0=$(now)
  "$BIN/fincryptctl" --home "$home" sync >>"$LOG" 2>&1 || die "fincryptctl sync failed"
  rec "$tree" fincrypt first_sync_s "$(elapsed "$t0" "$(now)")"
  rec "$tree" fincrypt first_hwm_kib "$(awk '/^VmHWM:/ { print $2 }' "/proc/$DAEMON_PID/status")"
  stop_daemon
  rec "$tree" fincrypt stored_first "$(apparent "$home/volume")"

  log "$tree: fincrypt rescan of the unchanged tree (daemon restarted)"
  drop_caches
  t0=$(now)
  start_daemon "$home" "$dlog"
  read -r t1 up st < <(wait_status "$home" "$tree" first) || die "$tree: the rescan did not finish"
  rec "$tree" fincrypt rescan_s "$(elapsed "$t0" "$t1")"
  rec "$tree" fincrypt rescan_up_s "$(elapsed "$t0" "$up")"
  rec "$tree" fincrypt rescan_cpu "$(cpu_of "$DAEMON_PID")"
  rec "$tree" fincrypt rescan_bytes_read "$(field "$st" bytes_read)"
  log "$tree: fincrypt rescan again, page cache warm (daemon restarted)"
  stop_daemon
  t0=$(now)
  start_daemon "$home" "$dlog"
  read -r t1 up st < <(wait_status "$home" "$tree" first) || die "$tree: the rescan did not finish"
  rec "$tree" fincrypt rescan_warm_s "$(elapsed "$t0" "$t1")"
  rec "$tree" fincrypt rescan_warm_up_s "$(elapsed "$t0" "$up")"
  for cache in dropped warm; do
    log "$tree: fincrypt rescan by the running daemon (fincryptctl watch rescan), cache $cache"
    [ "$cache" = warm ] || drop_caches
    t0=$(now)
    out=$("$BIN/fincryptctl" --home "$home" watch rescan "$tree" --json) || die "$tree: watch rescan failed"
    rec "$tree" fincrypt "live_rescan_${cache}_s" "$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.4f", b - a }')"
    rec "$tree" fincrypt "live_rescan_${cache}_daemon_s" \
      "$(python3 -c 'import json,sys; print(round(json.loads(sys.argv[1])[0]["folder"]["last_scan_seconds"], 4))' "$out")"
    rec "$tree" fincrypt "live_rescan_${cache}_read" \
      "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])[0]["bytes_read"])' "$out")"
  done

  log "$tree: fincrypt after changing 1% of the files (daemon running)"
  base=$(field "$st" bytes_read)
  drop_caches
  cpu0=$(cpu_of "$DAEMON_PID")
  t0=$(now)
  read -r n bytes < <(change_tree "$src" 50) || die "$tree: changing the tree failed"
  t1=$(now)
  rec "$tree" fincrypt changed_files "$n"; rec "$tree" fincrypt changed_bytes "$bytes"
  rec "$tree" fincrypt change_write_s "$(elapsed "$t0" "$t1")"
  read -r t2 up st < <(wait_status "$home" "$tree" "read:$((base + bytes))") ||
    die "$tree: the change was not backed up"
  rec "$tree" fincrypt changed_s "$(elapsed "$t1" "$t2")"
  rec "$tree" fincrypt changed_cpu "$(awk -v a="$cpu0" -v b="$(cpu_of "$DAEMON_PID")" 'BEGIN { printf "%.2f", b - a }')"
  rec "$tree" fincrypt changed_bytes_read "$(( $(field "$st" bytes_read) - base ))"

  log "$tree: fincrypt restore (through the running daemon)"
  drop_caches
  cpu0=$(cpu_of "$DAEMON_PID")
  timed "$BIN/fincrypt" --home "$home" restore "$tree" "$WORK/r$ROUND-$tree-fincrypt-out"
  rec "$tree" fincrypt restore_s "$WALL"
  # The daemon does the work; the command's own CPU is added.
  rec "$tree" fincrypt restore_cpu "$(awk -v a="$cpu0" -v b="$(cpu_of "$DAEMON_PID")" -v c="$CPU" \
    'BEGIN { printf "%.2f", b - a + c }')"
  check_same "$src" "$WORK/r$ROUND-$tree-fincrypt-out" "$tree: fincrypt"

  stop_daemon
  rec "$tree" fincrypt stored_end "$(apparent "$home/volume")"
  rec "$tree" fincrypt stored_end_alloc "$(allocated "$home/volume")"
  # What else the home keeps: the filesystem's metadata (fs/meta.redb) and
  # the watch stamps (watch.redb).
  rec "$tree" fincrypt home_end "$(apparent "$home")"
  rec "$tree" fincrypt home_end_alloc "$(allocated "$home")"
}

# ---------------------------------------------------------------- report

render() {
  python3 - "$RESULTS" "$SETTLE" <<'PY'
import sys
from collections import defaultdict
r = defaultdict(lambda: defaultdict(dict))   # tree -> (tool, key) -> round -> value
for line in open(sys.argv[1]):
    rnd, tree, tool, key, val = line.rstrip("\n").split("\t")
    r[tree][tool, key][int(rnd)] = val
settle = float(sys.argv[2])
MiB = 1 << 20
for tree in r:
    v = r[tree]
    files, size = int(v["-", "files"][0]), int(v["-", "bytes"][0])
    rounds = sorted(v["restic", "first_s"])
    def best(tool, step):
        """The round with the shortest time for step."""
        return min(rounds, key=lambda n: float(v[tool, step + "_s"][n]))
    def g(tool, key, n=None):
        return float(v[tool, key][rounds[0] if n is None else n])
    def t(tool, step):                      # best time of step, and its round
        n = best(tool, step)
        return g(tool, step + "_s", n), n
    def cpu(tool, step):
        s, n = t(tool, step)
        c = g(tool, step + "_cpu", n)
        return f"{c:.1f} ({100 * c / s:.0f} %)"
    print(f"\n{v['-', 'label'][0]}: {files:,} files, {size / MiB:,.1f} MiB\n")
    print("| step | restic | fincrypt | fincrypt vs restic |")
    print("|---|---:|---:|---:|")
    (rs, _), (fs_, fn) = t("restic", "first"), t("fincrypt", "first")
    print(f"| first backup, s | {rs:.2f} | {fs_:.2f} | |")
    print(f"| first backup, MiB/s | {size / MiB / rs:,.1f} | {size / MiB / fs_:,.1f} | **{rs / fs_:.2f}x** the throughput |")
    fd = min(g("fincrypt", "first_s", n) + g("fincrypt", "first_sync_s", n) for n in rounds)
    print(f"| first backup + `fincryptctl sync` (durable), s | {rs:.2f} | {fd:.2f} | {rs / fd:.2f}x the throughput |")
    print(f"| first backup, files/s | {files / rs:,.0f} | {files / fs_:,.0f} | |")
    print(f"| first backup, CPU-s (CPU %) | {cpu('restic', 'first')} | {cpu('fincrypt', 'first')} | |")
    (rs, _), (fs_, fn) = t("restic", "rescan"), t("fincrypt", "rescan")
    print(f"| rescan of the unchanged tree, s | {rs:.2f} | {fs_:.2f} | **{rs / fs_:.1f}x** as fast |")
    print(f"| rescan, CPU-s (CPU %) | {cpu('restic', 'rescan')} | {cpu('fincrypt', 'rescan')} | |")
    read = max(int(g("fincrypt", "rescan_bytes_read", n)) for n in rounds)
    print(f"| rescan, bytes read from the tree (most of any round) | | {read:,} | |")
    (rs, _), (fs_, _) = t("restic", "rescan_warm"), t("fincrypt", "rescan_warm")
    print(f"| rescan again, page cache warm, s | {rs:.2f} | {fs_:.2f} | {rs / fs_:.1f}x as fast |")
    (rs, _), (fs_, _) = t("restic", "rescan"), t("fincrypt", "live_rescan_dropped")
    fs_ = max(fs_, 1e-4)
    print(f"| rescan by the running daemon (`fincryptctl watch rescan`), cache dropped, s | {rs:.2f} | {fs_:.3f} | **{rs / fs_:.1f}x** as fast |")
    (rs, _), (fs_, _) = t("restic", "rescan_warm"), t("fincrypt", "live_rescan_warm")
    fs_ = max(fs_, 1e-4)
    print(f"| the same, page cache warm, s | {rs:.2f} | {fs_:.3f} | **{rs / fs_:.1f}x** as fast |")
    read = max(int(g("fincrypt", f"live_rescan_{c}_read", n)) for n in rounds for c in ("dropped", "warm"))
    print(f"| rescans by the running daemon, bytes read from the tree (most of any) | | {read:,} | |")
    (rs, _), (fs_, _) = t("restic", "changed"), t("fincrypt", "changed")
    n_changed = int(g("fincrypt", "changed_files"))
    print(f"| backup after changing 1% ({n_changed:,} files), s | {rs:.2f} | {fs_:.2f} "
          f"({fs_ - settle:.2f} without the {settle:g} s settle) | {rs / fs_:.2f}x as fast ({rs / max(fs_ - settle, 0.01):.2f}x without) |")
    print(f"| after the change, CPU-s (CPU %) | {cpu('restic', 'changed')} | {cpu('fincrypt', 'changed')} | |")
    (rs, _), (fs_, _) = t("restic", "restore"), t("fincrypt", "restore")
    print(f"| restore, s | {rs:.2f} | {fs_:.2f} | |")
    print(f"| restore, MiB/s | {size / MiB / rs:,.1f} | {size / MiB / fs_:,.1f} | {rs / fs_:.2f}x the throughput |")
    print(f"| restore, CPU-s (CPU %) | {cpu('restic', 'restore')} | {cpu('fincrypt', 'restore')} | |")
    rs, fs_ = g("restic", "stored_first"), g("fincrypt", "stored_first")
    print(f"| stored after the first backup, MiB | {rs / MiB:,.1f} | {fs_ / MiB:,.1f} | **{fs_ / rs:.3f}** of restic's |")
    rs, fs_ = g("restic", "stored_end"), g("fincrypt", "stored_end")
    print(f"| stored at the end (both versions), MiB | {rs / MiB:,.1f} | {fs_ / MiB:,.1f} | {fs_ / rs:.3f} of restic's |")
    rs, fs_ = g("restic", "stored_end"), g("fincrypt", "home_end")
    print(f"| the same, whole Fincrypt home (volume + fs/meta.redb + watch.redb), MiB | {rs / MiB:,.1f} | {fs_ / MiB:,.1f} | {fs_ / rs:.3f} of restic's |")
    print()
    print("Every round, in order (s):\n")
    for step, label in (("first", "first backup"), ("rescan", "rescan, cache dropped"),
                        ("rescan_warm", "rescan, cache warm"), ("changed", "after the change"),
                        ("restore", "restore")):
        cells = "; ".join(f"{tool} " + " / ".join(f"{g(tool, step + '_s', n):.2f}" for n in rounds)
                          for tool in ("restic", "fincrypt"))
        print(f"- {label}: {cells}")
    print("- fincrypt's `fincryptctl sync` after the first backup: "
          + " / ".join(f"{g('fincrypt', 'first_sync_s', n):.2f}" for n in rounds))
    print("- stored at the end, MiB: " + "; ".join(
        f"{tool} " + " / ".join(f"{g(tool, 'stored_end', n) / MiB:,.1f}" for n in rounds)
        for tool in ("restic", "fincrypt")))
    print(f"- restic repository version {v['restic', 'repo_version'][rounds[0]]}; allocated on disk at the end "
          f"(round 1): restic {g('restic', 'stored_end_alloc') / MiB:,.1f} MiB, fincrypt volume "
          f"{g('fincrypt', 'stored_end_alloc') / MiB:,.1f} MiB, whole home {g('fincrypt', 'home_end_alloc') / MiB:,.1f} MiB")
    fn = best("fincrypt", "first")
    print(f"- fincrypt first backup (round {fn}): the daemon answered after {g('fincrypt', 'first_up_s', fn):.2f} s; "
          f"peak RSS {g('fincrypt', 'first_hwm_kib', fn) / 1024:.0f} MiB; "
          f"{int(g('fincrypt', 'first_files', fn)):,} files, {int(g('fincrypt', 'first_bytes_read', fn)):,} bytes read; "
          f"errors: {' / '.join(v['fincrypt', 'errors'][n] for n in rounds)}; "
          f"busiest threads (CPU-s): {v['fincrypt', 'first_threads'][fn]}")
    print("- fincrypt rescans: the daemon answered after "
          + " / ".join(f"{g('fincrypt', 'rescan_up_s', n):.2f}" for n in rounds) + " s (cache dropped), "
          + " / ".join(f"{g('fincrypt', 'rescan_warm_up_s', n):.2f}" for n in rounds) + " s (warm)")
    print("- fincrypt rescans by the running daemon, as the command saw them (the daemon's own count): "
          + "; ".join(f"cache {c} " + " / ".join(
              f"{g('fincrypt', f'live_rescan_{c}_s', n):.3f} ({g('fincrypt', f'live_rescan_{c}_daemon_s', n):.3f})"
              for n in rounds) for c in ("dropped", "warm")))
    print(f"- changed: restic {int(g('restic', 'changed_files'))} files ({g('restic', 'changed_bytes') / MiB:,.1f} MiB after the change), "
          f"fincrypt {n_changed} files ({g('fincrypt', 'changed_bytes') / MiB:,.1f} MiB; written in "
          f"{g('fincrypt', 'change_write_s'):.2f} s, the daemon read {g('fincrypt', 'changed_bytes_read') / MiB:,.1f} MiB) (round 1)")
PY
}

# ---------------------------------------------------------------- main

cleanup() {
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true
  fi
  [ "$KEEP" = 1 ] || rm -rf "$WORK"
}

main() {
  rm -rf "$WORK"
  mkdir -p "$WORK"
  : >"$LOG"; : >"$RESULTS"
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  [ "$CAN_DROP" = 1 ] || log "not root: the page cache is NOT dropped between steps"
  install_restic
  build
  log "fincrypt: $FC_VERSION; $(restic version | cut -d' ' -f1-2)"

  log "making the trees"
  make_random_tree "$WORK/random"
  make_source_tree "$WORK/source"
  local tree
  for tree in random source; do
    rec "$tree" - files "$(find "$WORK/$tree" -type f | wc -l)"
    rec "$tree" - bytes "$(find "$WORK/$tree" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')"
  done
  rec random - label "random data ($RANDOM_FILES files)"
  rec source - label "source tree (cargo registry crates)"

  for ROUND in $(seq "$ROUNDS"); do
    for tree in random source; do
      log "round $ROUND of $ROUNDS, $tree: load average $(cut -d' ' -f1-3 /proc/loadavg)"
      bench_restic "$tree" "$WORK/$tree"
      bench_fincrypt "$tree" "$WORK/$tree"
    done
  done

  echo
  echo "Run of $(date +%F): $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -n 1)),"
  echo "kernel $(uname -r); $(restic version | cut -d' ' -f1-2); Fincrypt: $FC_VERSION;"
  echo "watch_settle = $SETTLE; page cache dropped before each step: $([ "$CAN_DROP" = 1 ] && echo yes || echo no);"
  echo "best of $ROUNDS rounds (every round listed below each table)."
  render
}

main "$@"
