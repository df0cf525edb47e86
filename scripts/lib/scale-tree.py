"""Writes the data set of scripts/bench-scale.sh: FILES files of TOTAL bytes in
all in nested directories under OUT, the same bytes for the same arguments;
prints a JSON summary (sizes, depth, a digest of every path and content).

    python3 scripts/lib/scale-tree.py OUT FILES TOTAL SEED
"""
import hashlib, json, os, random, sys

out, files, total, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(f"fincrypt-bench-scale/{seed}")
# Directories: a random tree, each new one under an earlier one (biased to the
# shallow ones), about 25 files a directory.
ndirs = max(1, files // 25)
dirs, depth = [""], [0]
for k in range(1, ndirs):
    p = int(k * rng.random() ** 2)
    dirs.append(f"{dirs[p]}/d{k:05d}" if dirs[p] else f"d{k:05d}")
    depth.append(depth[p] + 1)
# Sizes: log-normal (sigma 2: most files a few KiB, a long tail of MiBs),
# scaled so that they add up to the total exactly.
w = [rng.lognormvariate(0.0, 2.0) for _ in range(files)]
scale = total / sum(w)
sizes = [int(x * scale) for x in w]
sizes[max(range(files), key=sizes.__getitem__)] += total - sum(sizes)
where = [rng.randrange(ndirs) for _ in range(files)]
# A third of the files are text-like (32 symbols: zstd takes them to about
# 5/8), the rest random bytes that do not compress. Every file differs.
texty = [rng.random() < 1 / 3 for _ in range(files)]
letters = b"etaoinshrdlucmfwypvbgkjqxz" + b" " * 5 + b"\n"
table = bytes(letters[i % len(letters)] for i in range(256))
for d in dirs[1:]:
    os.makedirs(os.path.join(out, d), exist_ok=True)
digest = hashlib.sha256()
for i in range(files):
    data = random.Random(f"{seed}/{i}").randbytes(sizes[i])
    if texty[i]:
        data = data.translate(table)
    path = os.path.join(dirs[where[i]], f"f{i:06d}." + ("txt" if texty[i] else "bin"))
    with open(os.path.join(out, path), "wb") as f:
        f.write(data)
    digest.update(f"{path}\0{sizes[i]}\0".encode())
    digest.update(hashlib.sha256(data).digest())
s = sorted(sizes)
q = lambda f: s[min(files - 1, int(f * files))]
print(json.dumps({"files": files, "dirs": ndirs, "bytes": sum(sizes), "max_depth": max(depth),
                  "median": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": s[-1],
                  "text_files": sum(texty), "sha256": digest.hexdigest()[:16]}))
