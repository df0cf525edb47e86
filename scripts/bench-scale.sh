#!/usr/bin/env bash
# Many small files on a mount with peers: copies FILES files (default 100,000,
# TOTAL_BYTES in all, default 1 GiB) into a Fincrypt mount that places its
# blocks on three `fincrypt serve` nodes on 127.0.0.1 at redundancy 3, then
# measures how long replication takes, what the daemons cost while idle, the
# mount's memory and the size of its manifest. It does this for two builds in
# the same run, BEFORE and then AFTER, and prints a side-by-side Markdown
# table (rows ready for docs/PERFORMANCE.md; the docs are not touched).
#
#   scripts/bench-scale.sh
#   FILES=2000 TOTAL_BYTES=20000000 IDLE_SECS=30 scripts/bench-scale.sh   # a quick look
#
# Environment:
#   FILES, TOTAL_BYTES  the data set (100000, 1073741824)
#   IDLE_SECS           seconds of idle measured after replication (600)
#   SYNC_TIMEOUT        `sync --replicated --timeout` (3600); the daemon checks it
#                       only between replication passes, so the step is also
#                       cut off at SYNC_TIMEOUT + 300 s
#   BEFORE              git rev of the first build (de66db8), built from a
#                       `git worktree` into $BENCH_CACHE/target; its binaries
#                       are kept in $BENCH_CACHE/bin-<sha> for later runs
#   BEFORE_BIN_DIR      use the fincrypt/fincryptctl in this directory instead
#   AFTER_BIN_DIR       the second build; default: this checkout's release
#                       build (`cargo build --release --locked`, into
#                       $CARGO_TARGET_DIR or target/)
#   SEED                the data set's seed (1); the same seed, FILES and
#                       TOTAL_BYTES give the same tree, byte for byte
#   VERIFY=0            skip comparing the mount's tree with the source
#   BENCH_DIR           work directory (/var/tmp/fincrypt-bench-scale),
#                       removed at the end unless KEEP=1
#   BENCH_CACHE         build cache (/var/tmp/fincrypt-bench-cache)
#   FINCRYPT_*          settings reach the daemons as usual (none are set here)
#
# What is measured, for each build on fresh homes:
# - copy: `cp -r` of the source tree into MNT/tree, after
#   `fincryptctl redundancy set MNT 3` and once the mount sees its 3 peers.
# - sync: from the end of the copy until
#   `fincryptctl sync --replicated --timeout SYNC_TIMEOUT` returns 0: every
#   own block has its 3 confirmed holders. A non-zero exit is reported as
#   such and the run goes on.
# - idle CPU: utime+stime (/proc/PID/stat) of the mount daemon and of the
#   three nodes over IDLE_SECS seconds right after that, times 3600/IDLE_SECS.
#   The daemons run with their default intervals (replication every 30 s,
#   proofs every 300 s, snapshots every 900 s): what idle costs in real use.
#   One clock tick (10 ms) is 36/IDLE_SECS s an hour: short runs are coarse.
# - memory: the mount daemon's VmHWM and VmRSS (/proc/PID/status) at the end
#   of the idle time.
# - manifest: HOME/manifest.redb (Home::manifest_file) allocated on disk, at
#   the end of the idle time and after the daemon has unmounted and exited,
#   beside the data size; the same for the volume's index (HOME/volume/
#   index.redb), whose entries carry each own block's holder set since the
#   manifest stopped keeping a row per block. Also the owner's volume and
#   what the nodes hold (du).
# Then (untimed) the mount's tree is compared with the source (diff -r), the
# mount is unmounted and the nodes stopped. Each build's homes stay until the
# end (bench-net.sh says why: ext4 without a journal and freshly deleted files).
#
# Needs: FUSE (fusermount3), python3, git, cargo (for builds), about 20 GiB
# and 1.2M inodes free at the default size.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SELF=$ROOT/scripts/bench-scale.sh
WORK=${BENCH_DIR:-/var/tmp/fincrypt-bench-scale}
CACHE=${BENCH_CACHE:-/var/tmp/fincrypt-bench-cache}
FILES=${FILES:-100000}
TOTAL_BYTES=${TOTAL_BYTES:-1073741824}
IDLE_SECS=${IDLE_SECS:-600}
SYNC_TIMEOUT=${SYNC_TIMEOUT:-3600}
BEFORE=${BEFORE:-de66db8}
SEED=${SEED:-1}
VERIFY=${VERIFY:-1}
KEEP=${KEEP:-0}
NODES=3
REDUNDANCY=3
START_LIMIT=60      # seconds for a node, the mount or its peers to come up
STOP_LIMIT=600      # seconds for a daemon to exit once asked (the mount writes back first)
SRC=$WORK/src
LOG=$WORK/bench.log
export FINCRYPT_PASSPHRASE=bench-scale-passphrase

log() { printf '[%s] %s\n' "$(date +%T)" "$*" | tee -a "$LOG" >&2; }
die() { log "bench-scale: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# Waits up to $1 seconds for the command in the rest of the arguments to succeed.
wait_for() {
  local deadline=$(($(date +%s) + $1)); shift
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# True while process $1 exists and is not a zombie.
alive() {
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [ "${st%% *}" != Z ]
}
gone() { ! alive "$1"; }

# Runs "$@" in the background and waits for it, so that a signal to this
# script is handled at once rather than when a long step ends. With
# `--out FILE` first, the command's output goes to FILE (the trap's does not).
FG=""
run_waiting() {
  if [ "$1" = --out ]; then
    local out=$2; shift 2
    "$@" >"$out" 2>&1 &
  else
    "$@" &
  fi
  FG=$!
  local rc=0
  wait "$FG" || rc=$?
  FG=""
  return "$rc"
}

# The first value of $2 in the JSON object $1, or nothing if it is not there.
json_get() {
  python3 -c '
import json, sys
try:
    v = json.loads(sys.argv[1]).get(sys.argv[2])
except Exception:
    v = None
print("" if v is None else v)' "$1" "$2"
}

# =============================================================== one build
# `bench-scale.sh --run SIDE BINDIR`: runs the measurement for one build in a
# process of its own (its trap owns the mount and the nodes) and writes
# key<TAB>value lines to $WORK/result-SIDE.tsv.

RUN=""; MNT=""; OWNER=""; BIN=""; SIDE=""
MOUNT_PID=""
NODE_PIDS=()
RESULT=""

put() { printf '%s\t%s\n' "$1" "$2" >>"$RESULT"; }

# Asks process $1 to stop (signal $2, or none) unless it is gone; waits up
# to $3 s, then kills it. Sets STOPPED to its exit status (from `wait`).
STOPPED=0
stop_pid() {
  local pid=$1 sig=$2 limit=$3
  STOPPED=0
  if alive "$pid"; then
    [ "$sig" = none ] || kill -"$sig" "$pid" 2>/dev/null || true
    if ! wait_for "$limit" gone "$pid"; then
      log "$SIDE: process $pid did not exit within $limit s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || STOPPED=$?
}

run_cleanup() {
  trap - INT TERM
  [ -z "$FG" ] || { kill -TERM "$FG" 2>/dev/null || true; wait "$FG" 2>/dev/null || true; }
  if [ -n "$MNT" ] && mountpoint -q "$MNT" 2>/dev/null; then
    fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" 2>/dev/null || true
  fi
  [ -z "$MOUNT_PID" ] || stop_pid "$MOUNT_PID" TERM 60
  local pid
  for pid in "${NODE_PIDS[@]}"; do
    stop_pid "$pid" TERM 30
  done
}

# utime + stime of process $1 in clock ticks.
cpu_ticks() {
  local st f
  st=$(cat "/proc/$1/stat") || return 1
  read -ra f <<<"${st##*) }"
  echo $((f[11] + f[12]))
}
ticks_per_hour() {  # ticks over $2 seconds, as CPU seconds per hour
  awk -v t="$1" -v s="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t / hz * 3600 / s }'
}
# A /proc/PID/status field in KiB, as MiB.
status_mib() {
  awk -v k="$2:" '$1 == k { printf "%.1f", $2 / 1024 }' "/proc/$1/status"
}
# Bytes allocated on disk under the paths given (0 if none exist).
disk_bytes() {
  local b
  b=$(du -sc --block-size=1 "$@" 2>/dev/null | awk 'END { print $1 }') || true
  echo "${b:-0}"
}

peers_at_least() {
  local st n
  st=$("$BIN/fincryptctl" --home "$OWNER" status --json 2>/dev/null) || return 1
  n=$(json_get "$st" peers)
  if [ -z "$n" ]; then
    log "$SIDE: status has no peers field; not waiting for peers"
    return 0
  fi
  [ "$n" -ge "$1" ]
}

start_network() {
  local i home addr
  local boot=()
  # Room for three copies of everything and then some, on each node.
  local capacity=$(( (TOTAL_BYTES * 2 + FILES * 65536) / 1048576 + 1024 ))MiB
  for i in $(seq 1 "$NODES"); do
    home=$RUN/node$i
    mkdir -p "$home"
    (cd "$RUN" && exec "$BIN/fincrypt" --home "$home" serve --listen /ip4/127.0.0.1/tcp/0 \
      --capacity "$capacity" 2>"$home/serve.log") &
    NODE_PIDS+=($!)
    wait_for "$START_LIMIT" grep -q '^fincrypt serve: listening on ' "$home/serve.log" || {
      cat "$home/serve.log" >&2; die "$SIDE: node $i did not come up"; }
    addr=$(sed -n 's/^fincrypt serve: listening on //p;T;q' "$home/serve.log")
    boot+=(--bootstrap "$addr")
  done
  OWNER=$RUN/owner
  MNT=$RUN/mnt
  mkdir -p "$MNT"
  "$BIN/fincrypt" --home "$OWNER" init >/dev/null 2>"$RUN/init.log" ||
    { cat "$RUN/init.log" >&2; die "$SIDE: fincrypt init failed"; }
  (cd "$RUN" && exec "$BIN/fincrypt" --home "$OWNER" mount "$MNT" \
    --listen /ip4/127.0.0.1/tcp/0 "${boot[@]}" 2>"$RUN/owner.log") &
  MOUNT_PID=$!
  wait_for "$START_LIMIT" mountpoint -q "$MNT" || {
    cat "$RUN/owner.log" >&2; die "$SIDE: the mount did not come up"; }
  wait_for "$START_LIMIT" peers_at_least "$NODES" || die "$SIDE: the mount did not see $NODES peers"
}

run_side() {
  SIDE=$1 BIN=$2
  RUN=$WORK/run-$SIDE
  RESULT=$WORK/result-$SIDE.tsv
  trap run_cleanup EXIT
  trap 'exit 143' INT TERM
  exec 8>&- 9>&-   # the run's locks stay with the main process, not the daemons
  umask 077        # the homes hold identities: private from creation, like real ones
  rm -rf "$RUN"; mkdir -p "$RUN"
  : >"$RESULT"
  start_network
  "$BIN/fincryptctl" --home "$OWNER" redundancy set "$MNT" "$REDUNDANCY"
  mkdir "$MNT/tree"

  local c0 c1 c2 t0 t1 t2 rc=0 pid
  log "$SIDE: copying $FILES files into the mount"
  c0=$(cpu_ticks "$MOUNT_PID")
  t0=$(now)
  run_waiting cp -r "$SRC/." "$MNT/tree/"
  t1=$(now)
  put copy_s "$(elapsed "$t0" "$t1")"
  log "$SIDE: copy took $(elapsed "$t0" "$t1") s; sync --replicated"
  run_waiting --out "$RUN/sync.log" timeout "$((SYNC_TIMEOUT + 300))" "$BIN/fincryptctl" \
    --home "$OWNER" sync --replicated --timeout "$SYNC_TIMEOUT" || rc=$?
  [ "$rc" -eq 0 ] || cat "$RUN/sync.log" >&2
  t2=$(now)
  alive "$MOUNT_PID" || { tail -n 20 "$RUN/owner.log" >&2; die "$SIDE: the mount daemon exited during the copy or the sync"; }
  c1=$(cpu_ticks "$MOUNT_PID")
  if [ "$rc" -eq 0 ]; then
    put sync_s "$(elapsed "$t1" "$t2")"
  else
    put sync_s "exit $rc after $(elapsed "$t1" "$t2")"
  fi
  put mount_cpu_busy_s "$(awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t / hz }')"
  log "$SIDE: sync --replicated: exit $rc after $(elapsed "$t1" "$t2") s; idle for $IDLE_SECS s"

  # Idle: nothing touches the mount; every daemon must stay up throughout.
  local n0=0 n1=0 i0 i1 deadline
  for pid in "${NODE_PIDS[@]}"; do n0=$((n0 + $(cpu_ticks "$pid"))); done
  c1=$(cpu_ticks "$MOUNT_PID")
  i0=$(now)
  deadline=$(awk -v t="$i0" -v s="$IDLE_SECS" 'BEGIN { printf "%.3f", t + s }')
  while awk -v n="$(now)" -v d="$deadline" 'BEGIN { exit !(n < d) }'; do
    for pid in "$MOUNT_PID" "${NODE_PIDS[@]}"; do
      alive "$pid" || die "$SIDE: process $pid exited while idle (logs in $RUN)"
    done
    sleep 1
  done
  c2=$(cpu_ticks "$MOUNT_PID")
  for pid in "${NODE_PIDS[@]}"; do n1=$((n1 + $(cpu_ticks "$pid"))); done
  i1=$(now)
  local idle
  idle=$(elapsed "$i0" "$i1")
  put mount_idle_cpu_per_h "$(ticks_per_hour $((c2 - c1)) "$idle")"
  put nodes_idle_cpu_per_h "$(ticks_per_hour $((n1 - n0)) "$idle")"
  put mount_vmhwm_mib "$(status_mib "$MOUNT_PID" VmHWM)"
  put mount_vmrss_mib "$(status_mib "$MOUNT_PID" VmRSS)"
  put manifest_bytes "$(disk_bytes "$OWNER/manifest.redb")"
  put index_bytes "$(disk_bytes "$OWNER/volume/index.redb")"
  [ -e "$OWNER/manifest.redb" ] || log "$SIDE: no $OWNER/manifest.redb"
  local st own
  st=$("$BIN/fincryptctl" --home "$OWNER" status --json 2>/dev/null) || st="{}"
  own=$(json_get "$st" own_blocks)
  put own_blocks "${own:-n/a}"
  log "$SIDE: idle measured over $idle s"

  if [ "$VERIFY" = 1 ]; then
    if run_waiting --out "$RUN/diff.txt" diff -rq "$SRC" "$MNT/tree"; then
      put verify ok
    else
      put verify DIFFERS
      log "$SIDE: the mount's tree differs from the source ($(wc -l <"$RUN/diff.txt") lines in $RUN/diff.txt):"
      head -n 10 "$RUN/diff.txt" >&2
    fi
  fi

  # Unmount; the daemon writes back and exits on its own.
  fusermount3 -u "$MNT" || die "$SIDE: fusermount3 -u $MNT failed"
  stop_pid "$MOUNT_PID" none "$STOP_LIMIT"
  rc=$STOPPED
  MOUNT_PID=""
  put mount_exit "$rc"
  [ "$rc" -eq 0 ] || { log "$SIDE: the mount daemon exited $rc:"; tail -n 20 "$RUN/owner.log" >&2; }
  put manifest_final_bytes "$(disk_bytes "$OWNER/manifest.redb")"
  put index_final_bytes "$(disk_bytes "$OWNER/volume/index.redb")"
  for pid in "${NODE_PIDS[@]}"; do
    stop_pid "$pid" TERM 60
    rc=$STOPPED
    [ "$rc" -eq 0 ] || log "$SIDE: node $pid exited $rc"
  done
  NODE_PIDS=()
  put volume_bytes "$(disk_bytes "$OWNER/volume")"
  put held_bytes "$(disk_bytes "$RUN"/node*/held)"
  log "$SIDE: done"
}

# =============================================================== the whole run

CHILD=""
WT=""
cleanup() {
  trap - INT TERM
  [ -z "$FG" ] || { kill -TERM "$FG" 2>/dev/null || true; wait "$FG" 2>/dev/null || true; }
  [ -z "$CHILD" ] || { kill -TERM "$CHILD" 2>/dev/null || true; wait "$CHILD" 2>/dev/null || true; }
  [ -z "$WT" ] || git -C "$ROOT" worktree remove --force "$WT" 2>/dev/null || true
  if [ "$KEEP" = 1 ]; then
    log "kept $WORK"
  else
    log "removing the homes and the source tree under $WORK"
    rm -rf "$WORK"/run-* "$SRC"
  fi
}

# The binaries of rev $1 in $CACHE/bin-<sha>, built when not there yet; sets BUILT.
BUILT=""
build_rev() {
  local sha out
  sha=$(git -C "$ROOT" rev-parse --verify "$1^{commit}") || die "not a git rev: $1"
  out=$CACHE/bin-$sha
  if [ -x "$out/fincrypt" ] && [ -x "$out/fincryptctl" ]; then
    log "using the cached build of $1 ($out)"
  else
    log "building $1 (${sha:0:12}, release) from a git worktree; log in $CACHE/build-$sha.log"
    WT=$CACHE/src
    git -C "$ROOT" worktree remove --force "$WT" 2>/dev/null || rm -rf "$WT"
    git -C "$ROOT" worktree add -f --detach "$WT" "$sha" >&2 ||
      die "git worktree add $WT $sha failed"
    if ! run_waiting --out "$CACHE/build-$sha.log" env -C "$WT" \
        CARGO_TARGET_DIR="$CACHE/target" cargo build --release --locked --bins; then
      tail -n 20 "$CACHE/build-$sha.log" >&2; die "the build of $1 failed"
    fi
    rm -rf "$out.tmp"; mkdir -p "$out.tmp"
    cp "$CACHE/target/release/fincrypt" "$CACHE/target/release/fincryptctl" "$out.tmp/"
    mv "$out.tmp" "$out"
    git -C "$ROOT" worktree remove --force "$WT"; WT=""
  fi
  BUILT=$out
}

build_here() {
  local target=${CARGO_TARGET_DIR:-target}
  case $target in /*) ;; *) target=$ROOT/$target ;; esac
  log "building this checkout (release) into $target/release; log in $WORK/build.log"
  if ! run_waiting --out "$WORK/build.log" env -C "$ROOT" cargo build --release --locked --bins; then
    tail -n 20 "$WORK/build.log" >&2; die "the build of this checkout failed"
  fi
  BUILT=$target/release
}

generate() {
  log "generating $FILES files, $TOTAL_BYTES bytes in all (seed $SEED) in $SRC"
  rm -rf "$SRC"; mkdir -p "$SRC"
  run_waiting --out "$WORK/dataset.json" \
    python3 "$ROOT/scripts/lib/scale-tree.py" "$SRC" "$FILES" "$TOTAL_BYTES" "$SEED" ||
    { cat "$WORK/dataset.json" >&2; die "generating the data set failed"; }
  log "data set: $(cat "$WORK/dataset.json")"
}

render_table() {
  python3 - "$WORK" "$BEFORE_LABEL" "$AFTER_LABEL" "$IDLE_SECS" <<'PY'
import json, os, sys
work, lb, la, idle = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ds = json.load(open(os.path.join(work, "dataset.json")))
def load(side):
    p = os.path.join(work, f"result-{side}.tsv")
    if not os.path.exists(p):
        return {}
    return dict(l.rstrip("\n").split("\t", 1) for l in open(p) if "\t" in l)
b, a = load("before"), load("after")
data = ds["bytes"]
mib = lambda v: f"{int(v) / 2**20:,.1f}"
def share(v):
    return f"{int(v) / 2**20:,.2f} ({100 * int(v) / data:.2f} %)"
rows = [
    ("copy into the mount (`cp -r`), s", "copy_s", None),
    ("`sync --replicated` after the copy, s", "sync_s", None),
    ("mount daemon CPU during copy + sync, s", "mount_cpu_busy_s", None),
    (f"mount daemon CPU per idle hour, s (over {idle} s)", "mount_idle_cpu_per_h", None),
    ("3 nodes' CPU per idle hour, s (together)", "nodes_idle_cpu_per_h", None),
    ("mount daemon VmHWM, MiB", "mount_vmhwm_mib", None),
    ("mount daemon VmRSS after idle, MiB", "mount_vmrss_mib", None),
    ("manifest.redb on disk, MiB (of data)", "manifest_bytes", share),
    ("manifest.redb after unmount, MiB (of data)", "manifest_final_bytes", share),
    ("volume's index.redb on disk, MiB (of data)", "index_bytes", share),
    ("volume's index.redb after unmount, MiB (of data)", "index_final_bytes", share),
    ("owner's volume after unmount, MiB", "volume_bytes", mib),
    ("held by the 3 nodes, MiB", "held_bytes", mib),
    ("own blocks (`status`)", "own_blocks", None),
    ("mount daemon exit status", "mount_exit", None),
    ("tree reads back (`diff -r`)", "verify", None),
]
def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None
print(f"| {ds['files']:,} files, {data / 2**20:,.0f} MiB, 3 serve nodes, redundancy 3 "
      f"| before: {lb} | after: {la} | after / before |")
print("|---|---:|---:|---:|")
for label, key, fmt in rows:
    vb, va = b.get(key), a.get(key)
    if vb is None and va is None:
        continue
    ratio = ""
    if num(vb) and num(va) is not None:
        ratio = f"{num(va) / num(vb):.2f}"
    show = lambda v: "n/a" if v is None else (fmt(v) if fmt and num(v) is not None else v)
    print(f"| {label} | {show(vb)} | {show(va)} | {ratio} |")
print()
print(f"Data set: {ds['files']:,} files in {ds['dirs']:,} directories (up to {ds['max_depth']} deep), "
      f"{data:,} bytes; sizes median {ds['median']:,} B, p90 {ds['p90']:,} B, p99 {ds['p99']:,} B, "
      f"largest {ds['max']:,} B; {ds['text_files']:,} text-like, the rest random bytes "
      f"(digest {ds['sha256']}).")
PY
}

main() {
  for c in python3 fusermount3 git awk; do
    command -v "$c" >/dev/null || { echo "bench-scale: needs $c" >&2; exit 1; }
  done
  [ -c /dev/fuse ] || { echo "bench-scale: no /dev/fuse" >&2; exit 1; }
  [[ $FILES =~ ^[1-9][0-9]*$ && $TOTAL_BYTES =~ ^[0-9]+$ && $IDLE_SECS =~ ^[1-9][0-9]*$ ]] ||
    { echo "bench-scale: FILES and IDLE_SECS must be positive numbers, TOTAL_BYTES a number" >&2; exit 1; }
  mkdir -p "$WORK" "$CACHE"
  exec 9>"$WORK/.lock"
  flock -n 9 || { echo "bench-scale: another run is using $WORK" >&2; exit 1; }
  exec 8>"$CACHE/.lock"
  flock -n 8 || { echo "bench-scale: another run is using $CACHE" >&2; exit 1; }
  : >"$LOG"
  rm -f "$WORK"/result-*.tsv "$WORK/table.md"

  # Room: the source, and for each build the owner's volume and three nodes'
  # copies (about 1.2 x the data each, plus a block file per small file),
  # kept until the end; a build's target directory if one is needed.
  local data_mib=$((TOTAL_BYTES >> 20)) per_copy need need_inodes free free_inodes
  per_copy=$((data_mib * 6 / 5 + FILES * 8 / 1024))
  need=$((data_mib + FILES * 4 / 1024 + 2 * (NODES + 1) * per_copy + 1024))
  [ -n "${BEFORE_BIN_DIR:-}" ] || need=$((need + 4096))
  need_inodes=$(( (FILES * (1 + 2 * (NODES + 1)) + FILES / 25) * 6 / 5 + 10000 ))
  free=$(df -Pm "$WORK" | awk 'NR == 2 { print $4 }')
  free_inodes=$(df -Pi "$WORK" | awk 'NR == 2 { print $4 }')
  [ "$free" -ge "$need" ] || die "needs about $need MiB free in $WORK, has $free"
  [ "$free_inodes" = - ] || [ "$free_inodes" -ge "$need_inodes" ] ||
    die "needs about $need_inodes free inodes in $WORK, has $free_inodes"

  trap cleanup EXIT
  trap 'exit 130' INT TERM

  local before_bin after_bin
  if [ -n "${BEFORE_BIN_DIR:-}" ]; then
    before_bin=$(cd "$BEFORE_BIN_DIR" && pwd); BEFORE_LABEL="binaries in $before_bin"
  else
    build_rev "$BEFORE"; before_bin=$BUILT
    BEFORE_LABEL=$(git -C "$ROOT" rev-parse --short "$BEFORE^{commit}")
  fi
  if [ -n "${AFTER_BIN_DIR:-}" ]; then
    after_bin=$(cd "$AFTER_BIN_DIR" && pwd); AFTER_LABEL="binaries in $after_bin"
  else
    build_here; after_bin=$BUILT
    AFTER_LABEL=$(git -C "$ROOT" describe --always --dirty)
  fi
  for b in "$before_bin" "$after_bin"; do
    if [ ! -x "$b/fincrypt" ] || [ ! -x "$b/fincryptctl" ]; then
      die "no fincrypt and fincryptctl in $b"
    fi
  done
  generate

  local side bin rc
  for side in before after; do
    bin=$before_bin; [ "$side" = before ] || bin=$after_bin
    log "$side: $bin"
    "$BASH" "$SELF" --run "$side" "$bin" &
    CHILD=$!
    rc=0; wait "$CHILD" || rc=$?
    CHILD=""
    [ "$rc" -eq 0 ] || log "$side: the run failed (exit $rc); see $LOG and $WORK/run-$side"
  done

  local table
  table=$(render_table)
  {
    echo "Run of $(date +%F): $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -n 1)),"
    echo "$(awk '/^MemTotal:/ {printf "%.0f", $2 / 1048576}' /proc/meminfo) GiB, kernel $(uname -r)."
    echo
    echo "$table"
  } >"$WORK/table.md"
  echo
  cat "$WORK/table.md"
  log "the table is also in $WORK/table.md"
}

if [ "${1:-}" = "--run" ]; then
  shift
  run_side "$@"
else
  main "$@"
fi
