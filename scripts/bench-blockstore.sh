#!/usr/bin/env bash
# Runs the block store benchmark and prints its figures as a Markdown table
# (the one in docs/PERFORMANCE.md). Pass --no-run to only re-read the last results.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--no-run" ]; then
  cargo bench -p fincrypt-blockstore --bench pipeline >&2
fi
python3 - <<'PY'
import json, pathlib
root = pathlib.Path("target/criterion")
rows = {}
for bench in root.glob("*/**/new/benchmark.json"):
    meta = json.loads(bench.read_text())
    est = json.loads((bench.parent / "estimates.json").read_text())
    secs = est["mean"]["point_estimate"] / 1e9
    nbytes = (meta.get("throughput") or {}).get("Bytes")
    rows[meta["full_id"]] = (secs, nbytes)
def mibs(id):
    s, n = rows[id]
    return n / s / 2**20
sha = mibs("pipeline/sha256/1-core")
print("| benchmark | throughput | vs SHA-256 (1 core) |")
print("| --- | ---: | ---: |")
order = ["pipeline/sha256/1-core",
         "pipeline/write-random/1-core", "pipeline/write-random/2-core",
         "pipeline/write-text/1-core", "pipeline/write-text/2-core",
         "pipeline/read-random/1-core"]
for id in order:
    if id in rows:
        print(f"| {id} | {mibs(id):,.0f} MiB/s | {mibs(id)/sha:.2f} |")
for id in sorted(k for k in rows if k.startswith("volume/")):
    s, n = rows[id]
    blocks = n / (1 << 20)
    print(f"| {id} | {mibs(id):,.0f} MiB/s, {blocks / s:,.0f} blocks/s | |")
w1, w2 = "pipeline/write-random/1-core", "pipeline/write-random/2-core"
if w1 in rows and w2 in rows:
    print(f"\nTwo cores over one (random data): {mibs(w2)/mibs(w1):.2f}x")
PY
