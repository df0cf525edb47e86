#!/usr/bin/env bash
# Runs the same file workloads on a Fincrypt mount, on gocryptfs and on cryfs,
# one after another, prints a Markdown table and writes it into
# docs/PERFORMANCE.md ("Filesystem beside gocryptfs and cryfs (issue 5)").
#
#   scripts/bench-fs.sh             run everything (as root: drops caches)
#   scripts/bench-fs.sh --no-docs   run, print the table, leave the docs alone
#
# All backing stores live under $BENCH_DIR (default /var/tmp/fincrypt-bench),
# so the three filesystems sit on the same disk. Idempotent: leftover mounts
# and stores of an earlier run are removed first; the source tarball is kept.
# The three filesystems take turns for $BENCH_ROUNDS rounds (default 3), each
# on a fresh store, and the table shows each one's best round: other work on
# a shared machine only ever slows a run down.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${BENCH_DIR:-/var/tmp/fincrypt-bench}
DOCS=$ROOT/docs/PERFORMANCE.md
HEADING="## Filesystem beside gocryptfs and cryfs (issue 5)"
WRITE_DOCS=1
[ "${1:-}" = "--no-docs" ] && WRITE_DOCS=0

FS_LIST=(fincrypt gocryptfs cryfs)
ROUNDS=${BENCH_ROUNDS:-3}
WORKLOADS=(seqwrite seqread randread smallfiles untar)
PASS=bench-passphrase
SMALL_FILES=10000
TAR_TARGET_BYTES=$((80 << 20))
STEP_TIMEOUT=600      # seconds any one step may take before it counts as hung
MOUNT_TIMEOUT=60

# FINCRYPT_BIN=path benchmarks that binary instead of building target/release/fincrypt.
FINCRYPT=${FINCRYPT_BIN:-$ROOT/target/release/fincrypt}
FC_HOME=$WORK/fincrypt-home   FC_MNT=$WORK/fincrypt-mnt   FC_PID=""
GO_CIPHER=$WORK/gocryptfs-cipher GO_MNT=$WORK/gocryptfs-mnt
CRY_BASE=$WORK/cryfs-base     CRY_MNT=$WORK/cryfs-mnt
SRC_TAR=$WORK/src.tar
RESULTS=$WORK/results.tsv     # round <TAB> fs <TAB> workload <TAB> value|FAIL <TAB> note
LOG=$WORK/bench.log

export CRYFS_FRONTEND=noninteractive CRYFS_NO_UPDATE_CHECK=true
export FINCRYPT_PASSPHRASE=$PASS FINCRYPT_SNAPSHOT_INTERVAL=0

log() { printf '[%s] %s\n' "$(date +%T)" "$*" | tee -a "$LOG" >&2; }
now() { date +%s.%N; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# Waits up to $1 seconds for the command in the rest of the arguments to succeed.
wait_for() {
  local deadline=$(($(date +%s) + $1)); shift
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
not_mounted() { ! mountpoint -q "$1"; }

# ---------------------------------------------------------------- setup

install_tools() {
  local p missing=()
  for p in fio gocryptfs cryfs fuse3; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# The tree may be mid-edit by someone else: a failed build is retried twice,
# a minute apart, before giving up.
build_fincrypt() {
  [ -z "${FINCRYPT_BIN:-}" ] || return 0
  local try
  for try in 1 2 3; do
    log "building fincrypt (release)"
    if (cd "$ROOT" && cargo build --release --bins) >"$WORK/build.log" 2>&1; then
      return 0
    fi
    tail -n 15 "$WORK/build.log" >&2
    [ "$try" -lt 3 ] && { log "build failed; retrying in 60 s"; sleep 60; }
  done
  log "build failed three times; giving up"
  return 1
}

# A tarball of real source code: whole crates from the cargo registry, in
# name order, until about 80 MiB (the Windows import-library crates are
# binary blobs and are left out). Made once and reused.
make_tarball() {
  [ -s "$SRC_TAR" ] && return 0
  local reg total=0 size crate crates=()
  reg=$(ls -d "$HOME"/.cargo/registry/src/index.crates.io-*/ | head -n 1)
  for crate in $(ls "$reg" | grep -Ev '^(winapi-(i686|x86_64)-pc-windows-gnu|windows)'); do
    size=$(du -sb "$reg/$crate" | cut -f1)
    crates+=("$crate"); total=$((total + size))
    [ "$total" -lt "$TAR_TARGET_BYTES" ] || break
  done
  log "making $SRC_TAR from ${#crates[@]} crates"
  tar -C "$reg" -cf "$SRC_TAR.tmp" "${crates[@]}"
  mv "$SRC_TAR.tmp" "$SRC_TAR"
}

# Unmounts whatever an earlier (interrupted) run left and removes its stores.
reset_workdir() {
  local m
  for m in "$FC_MNT" "$GO_MNT" "$CRY_MNT"; do
    mountpoint -q "$m" 2>/dev/null && { fusermount3 -u "$m" || fusermount3 -uz "$m"; }
  done
  wait_for 30 not_mounted "$FC_MNT" || true
  rm -rf "$FC_HOME" "$FC_MNT" "$GO_CIPHER" "$GO_MNT" "$CRY_BASE" "$CRY_MNT" "$RESULTS" "$WORK"/fio-*.json
  mkdir -p "$WORK" "$FC_MNT" "$GO_MNT" "$CRY_MNT"
  : >"$RESULTS"
}

cleanup() {
  local m
  for m in "$FC_MNT" "$GO_MNT" "$CRY_MNT"; do
    mountpoint -q "$m" 2>/dev/null && { fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true; }
  done
  if [ -n "$FC_PID" ] && kill -0 "$FC_PID" 2>/dev/null; then
    wait_for 30 eval '! kill -0 "$FC_PID" 2>/dev/null' || kill -TERM "$FC_PID" 2>/dev/null || true
  fi
}

# ---------------------------------------------------------------- filesystems
# mount_X creates the filesystem on first use; umount_X returns once the
# daemon has let go of the mount (and, for Fincrypt, exited).

mount_fincrypt() {
  if [ ! -e "$FC_HOME/key.toml" ]; then
    "$FINCRYPT" --home "$FC_HOME" init >/dev/null 2>>"$LOG" || return 1
    sed -i 's/^snapshot_interval = .*/snapshot_interval = 0/' "$FC_HOME/config.toml"
  fi
  # Run from the work dir so a stray .env elsewhere cannot change settings.
  (cd "$WORK" && exec "$FINCRYPT" --home "$FC_HOME" mount "$FC_MNT" >>"$LOG" 2>&1) &
  FC_PID=$!
  wait_for "$MOUNT_TIMEOUT" mountpoint -q "$FC_MNT"
}
umount_fincrypt() {
  local t0=$(now)
  fusermount3 -u "$FC_MNT" || return 1
  if ! wait_for "$STEP_TIMEOUT" eval '! kill -0 "$FC_PID" 2>/dev/null'; then
    log "fincrypt: daemon still running ${STEP_TIMEOUT}s after unmount; SIGTERM"
    kill -TERM "$FC_PID"; return 1
  fi
  wait "$FC_PID" || { log "fincrypt: daemon exited with status $?"; return 1; }
  FC_PID=""
  log "fincrypt: unmount took $(python3 -c "print(f'{$(now) - $t0:.1f}')") s"
}

mount_gocryptfs() {
  echo "$PASS" >"$WORK/gocryptfs.pass"
  if [ ! -e "$GO_CIPHER/gocryptfs.conf" ]; then
    mkdir -p "$GO_CIPHER"
    gocryptfs -init -q -passfile "$WORK/gocryptfs.pass" "$GO_CIPHER" >>"$LOG" 2>&1 || return 1
  fi
  gocryptfs -q -nosyslog -passfile "$WORK/gocryptfs.pass" "$GO_CIPHER" "$GO_MNT" >>"$LOG" 2>&1 || return 1
  wait_for "$MOUNT_TIMEOUT" mountpoint -q "$GO_MNT"
}
umount_gocryptfs() {
  fusermount3 -u "$GO_MNT" && wait_for "$STEP_TIMEOUT" not_mounted "$GO_MNT"
}

mount_cryfs() {   # ~13 s of key derivation per mount, outside every timing
  mkdir -p "$CRY_BASE"
  # The store is made anew each run; cryfs would refuse it as "replaced".
  echo "$PASS" | cryfs --allow-replaced-filesystem "$CRY_BASE" "$CRY_MNT" >>"$LOG" 2>&1 || return 1
  wait_for "$MOUNT_TIMEOUT" mountpoint -q "$CRY_MNT"
}
umount_cryfs() {
  cryfs-unmount "$CRY_MNT" >>"$LOG" 2>&1 && wait_for "$STEP_TIMEOUT" not_mounted "$CRY_MNT" || return 1
  # The daemon may still be writing blocks out after the mount is gone.
  wait_for "$STEP_TIMEOUT" eval '! pgrep -f -- "$CRY_BASE $CRY_MNT" >/dev/null'
}

# ---------------------------------------------------------------- workloads
# Each prints "value<TAB>note" and fails if the workload did.

# fio on one 1 GiB file, fio-1g.dat, in the mount. $1 mount, $2 job name,
# $3 JSON key (bw_bytes or iops), the rest extra fio options.
fio_job() {
  local mnt=$1 name=$2 key=$3 json=$WORK/fio-$fs-$2.json; shift 3
  timeout "$STEP_TIMEOUT" fio --name="$name" --directory="$mnt" --filename=fio-1g.dat \
    --size=1G --ioengine=psync --numjobs=1 --output-format=json "$@" >"$json" 2>>"$LOG" || return 1
  python3 - "$json" "$key" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
if job["error"]:
    sys.exit(f"fio error {job['error']}")
side = job["read"] if job["read"]["io_bytes"] else job["write"]
v = side[sys.argv[2]]
print(f"{v / 2**20:.1f}" if sys.argv[2] == "bw_bytes" else f"{v:.0f}",
      f"{side['io_bytes'] / 2**20:.0f} MiB in {side['runtime'] / 1000:.1f} s", sep="\t")
PY
}

wl_seqwrite() {
  fio_job "$1" seqwrite bw_bytes --rw=write --bs=1M --end_fsync=1 || return 1
}
wl_seqread() {
  [ "$(stat -c %s "$1/fio-1g.dat")" -eq $((1 << 30)) ] || { log "$fs: fio-1g.dat is not 1 GiB after remount"; return 1; }
  fio_job "$1" seqread bw_bytes --rw=read --bs=1M || return 1
}
wl_randread() {
  fio_job "$1" randread iops --rw=randread --bs=4k --runtime=20 --time_based || return 1
}

# Creates (4 KiB of fresh random bytes each), stats and deletes the files;
# prints files/s over the three phases together and each phase's time.
wl_smallfiles() {
  timeout "$STEP_TIMEOUT" python3 - "$1/small" "$SMALL_FILES" <<'PY'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
names = [f"{d}/f{i:05d}" for i in range(n)]
data = [os.urandom(4096) for _ in range(n)]
os.mkdir(d)
t0 = time.monotonic()
for name, buf in zip(names, data):
    with open(name, "wb") as f:
        f.write(buf)
os.sync()
t1 = time.monotonic()
for name in names:
    if os.stat(name).st_size != 4096:
        sys.exit(f"{name}: wrong size")
t2 = time.monotonic()
for name in names:
    os.unlink(name)
os.sync()
t3 = time.monotonic()
if os.listdir(d):
    sys.exit("files left after delete")
os.rmdir(d)
print(f"{n / (t3 - t0):.0f}\tcreate {t1 - t0:.1f} s, stat {t2 - t1:.1f} s, delete {t3 - t2:.1f} s")
PY
}

# Times tar -xf + sync, then checks the extracted tree against the tarball
# (untimed): any difference but modification times fails the workload;
# those are counted in the note. Prints seconds, with MiB/s in the note.
wl_untar() {
  local dest=$1/x t0 t1 bytes diffs mtimes=0 note
  mkdir -p "$dest" || return 1
  t0=$(now)
  timeout "$STEP_TIMEOUT" tar -xf "$SRC_TAR" -C "$dest" || return 1
  sync
  t1=$(now)
  diffs=$(tar -df "$SRC_TAR" -C "$dest" 2>&1) || true
  if [ -n "$diffs" ]; then
    echo "$diffs" >>"$LOG"
    if grep -qv ': Mod time differs$' <<<"$diffs"; then
      log "$fs: extracted tree differs from the tarball"; return 1
    fi
    mtimes=$(grep -c ': Mod time differs$' <<<"$diffs")
    log "$fs: $mtimes extracted files lost their modification time"
  fi
  bytes=$(stat -c %s "$SRC_TAR")
  note=$(python3 -c "print(f'{$bytes / 2**20 / ($t1 - $t0):.1f} MiB/s')")
  [ "$mtimes" -eq 0 ] || note+="; mtime not kept on $mtimes files"
  printf '%s\t%s\n' "$(python3 -c "print(f'{$t1 - $t0:.2f}')")" "$note"
}

# ---------------------------------------------------------------- driver

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$1" "$2" "$3" "${4:-}" >>"$RESULTS"; }

# Runs workload $2 on filesystem $1 at mount $3, recording the figure or FAIL.
measure() {
  local out
  log "$1: $2"
  if out=$("wl_$2" "$3"); then
    record "$1" "$2" "${out%%$'\t'*}" "${out#*$'\t'}"
    log "$1: $2 = ${out//$'\t'/ ; }"
  else
    record "$1" "$2" FAIL "see $LOG"
    log "$1: $2 FAILED"
  fi
}

bench_fs() {
  fs=$1   # main's variable: the workloads read it for log lines and file names
  local mnt store wl
  case $fs in
    fincrypt) mnt=$FC_MNT store=$FC_HOME ;;
    gocryptfs) mnt=$GO_MNT store=$GO_CIPHER ;;
    cryfs) mnt=$CRY_MNT store=$CRY_BASE ;;
  esac

  rm -rf "$store"
  log "$fs: round $round of $ROUNDS, mounting (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  if ! "mount_$fs"; then
    log "$fs: mount failed"
    for wl in "${WORKLOADS[@]}"; do record "$fs" "$wl" FAIL "mount failed"; done
    return 0
  fi
  measure "$fs" seqwrite "$mnt"
  record "$fs" store-after-write "$(du -sm "$store" | cut -f1)" "MiB of backing store"

  log "$fs: remounting with caches dropped"
  if ! { "umount_$fs" && drop_caches && "mount_$fs"; }; then
    log "$fs: remount failed"
    for wl in seqread randread smallfiles untar; do record "$fs" "$wl" FAIL "remount failed"; done
    return 0
  fi
  measure "$fs" seqread "$mnt"
  drop_caches
  measure "$fs" randread "$mnt"
  measure "$fs" smallfiles "$mnt"
  measure "$fs" untar "$mnt"
  "umount_$fs" || log "$fs: unmount failed"
}

# Prints the Markdown table from $RESULTS.
render_table() {
  python3 - "$RESULTS" <<'PY'
import sys
from collections import defaultdict
FS = ("fincrypt", "gocryptfs", "cryfs")
runs = defaultdict(list)  # (fs, workload) -> [(value or None for a failure, note)]
for line in open(sys.argv[1]):
    _, fs, wl, val, note = line.rstrip("\n").split("\t")
    runs[fs, wl].append((None if val == "FAIL" else float(val), note))
rows = [  # workload, label, unit, higher is better
    ("seqwrite", "sequential write 1 GiB, 1 MiB blocks", "MiB/s", True),
    ("seqread", "sequential read 1 GiB cold, 1 MiB blocks", "MiB/s", True),
    ("randread", "random read 4 KiB, 20 s", "IOPS", True),
    ("smallfiles", "create + stat + delete 10,000 x 4 KiB", "files/s", True),
    ("untar", "untar source tree + sync", "s", False),
]
def best(fs, wl, higher):
    ok = [r for r in runs[fs, wl] if r[0] is not None]
    return (max if higher else min)(ok, key=lambda r: r[0]) if ok else None
def fmt(v, unit):
    return f"{v:,.2f}" if unit == "s" else f"{v:,.0f}"
def cell(fs, wl, unit, higher):
    all_runs = runs[fs, wl]
    if not all_runs:
        return "not run"
    failed = [note for v, note in all_runs if v is None]
    b = best(fs, wl, higher)
    if b is None:
        return f"**FAILED** ({failed[0]})" if failed[0] else "**FAILED**"
    text = f"{fmt(b[0], unit)} {unit}"
    if wl == "untar" and b[1]:
        text += f" ({b[1]})"
    if failed:
        text += f", **failed in {len(failed)} of {len(all_runs)} rounds**"
    return text
def ratio(fs, wl, higher):
    a, g = best(fs, wl, higher), best("gocryptfs", wl, higher)
    if a is None or g is None or a[0] == 0 or g[0] == 0:
        return "n/a"
    return f"{(a[0] / g[0] if higher else g[0] / a[0]):.2f}"
print("| workload | fincrypt | gocryptfs | cryfs | fincrypt/gocryptfs | cryfs/gocryptfs |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for wl, label, unit, higher in rows:
    cells = [cell(fs, wl, unit, higher) for fs in FS]
    print(f"| {label} | " + " | ".join(cells)
          + f" | {ratio('fincrypt', wl, higher)} | {ratio('cryfs', wl, higher)} |")
print()
print("Every round, in order:\n")
for wl, label, unit, higher in rows:
    per_fs = ["{} {}".format(fs, " / ".join("FAILED" if v is None else fmt(v, unit) for v, _ in runs[fs, wl]))
              for fs in FS if runs[fs, wl]]
    print(f"- {label} ({unit}): " + "; ".join(per_fs))
stores = ["{} {}".format(fs, " / ".join(f"{v:.0f}" for v, _ in runs[fs, "store-after-write"]))
          for fs in FS if runs[fs, "store-after-write"]]
print("- backing store after the 1 GiB write (MiB): " + "; ".join(stores))
phases = [f"{fs} {b[1]}" for fs in FS if (b := best(fs, "smallfiles", True))]
if phases:
    print("- small-file phases of the best round: " + "; ".join(phases))
PY
}

# Replaces (or appends) the section under $HEADING in docs/PERFORMANCE.md.
write_docs() {
  local table=$1 tar_mib tar_files section fc_version
  fc_version="working tree at $(git -C "$ROOT" describe --always --dirty), release build"
  [ -z "${FINCRYPT_BIN:-}" ] || fc_version="binary $FINCRYPT_BIN"
  tar_mib=$(( $(stat -c %s "$SRC_TAR") >> 20 ))
  tar_files=$(tar -tf "$SRC_TAR" | grep -vc '/$')
  section=$(cat <<EOF
$HEADING

\`scripts/bench-fs.sh\` runs the same workloads on a Fincrypt mount, on
gocryptfs and on cryfs, one after the other, each backing store on the same
ext4 disk (\`/var/tmp\`). Fincrypt runs with \`snapshot_interval = 0\`; the
other two with their defaults. Ratios are against gocryptfs and above 1 mean
faster than gocryptfs (for the untar time, gocryptfs time / other time).

Workloads, in this order on each filesystem:

1. Sequential write: \`fio --name=seqwrite --rw=write --bs=1M --size=1G
   --end_fsync=1 --ioengine=psync --numjobs=1\` into one file on a fresh mount,
   with fio's default buffer contents (one random buffer, lightly scrambled per
   write: partly compressible for Fincrypt; see the store sizes below).
2. Sequential read, cold: unmount, \`echo 3 > /proc/sys/vm/drop_caches\`,
   mount again, then \`fio --rw=read --bs=1M\` over the same 1 GiB file.
3. Random read: caches dropped again, \`fio --rw=randread --bs=4k --size=1G
   --runtime=20 --time_based\` on the same file (psync, one job).
4. Small files: Python creates 10,000 files of 4 KiB (fresh random bytes
   each) in one directory, \`sync\`, stats each, deletes each, \`sync\`;
   files/s over the three phases together.
5. Untar: \`tar -xf src.tar -C MNT/x && sync\`, timed; src.tar is ${tar_mib} MiB,
   ${tar_files} files: whole crates from the local cargo registry sources
   (name order, Windows import-library crates left out). The extracted tree is
   then checked with \`tar -d\` (untimed).

Run of $(date +%F): $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -n 1)),
$(awk '/^MemTotal:/ {printf "%.0f", $2 / 1048576}' /proc/meminfo) GiB, kernel $(uname -r); $(gocryptfs --version | cut -d';' -f1),
$(cryfs --version 2>/dev/null | head -n 1), $(fio --version); Fincrypt: $fc_version.
The machine is shared with other work, which moves single figures by tens of
per cent: the filesystems took turns for $ROUNDS rounds, each on a fresh store,
and the table shows each one's best round (every round is listed below it).

$table
EOF
)
  printf '%s\n' "$section" | python3 "$ROOT/scripts/lib/replace-section.py" "$DOCS" "$HEADING"
  log "wrote the section into $DOCS"
}

main() {
  [ "$(id -u)" -eq 0 ] || { echo "bench-fs: run as root (drops the page cache)" >&2; exit 1; }
  mkdir -p "$WORK"
  exec 9>"$WORK/.lock"
  flock -n 9 || { echo "bench-fs: another run is using $WORK" >&2; exit 1; }
  : >"$LOG"
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  install_tools
  build_fincrypt
  reset_workdir
  make_tarball
  local fs round   # both read by the functions below
  for round in $(seq "$ROUNDS"); do
    for fs in "${FS_LIST[@]}"; do bench_fs "$fs"; done
  done
  local table
  table=$(render_table)
  echo
  echo "$table"
  [ "$WRITE_DOCS" -eq 0 ] || write_docs "$table"
}

main "$@"
