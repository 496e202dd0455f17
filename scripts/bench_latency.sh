#!/usr/bin/env bash
# Hot-folder latency: time from a rename into inbox/ to the output's appearance in
# outbox/, one file at a time at idle, against the model's own time per batch (the
# daemon's infer-stage mean from /metrics). Target: p50 <= model time + 30 ms.
#   scripts/bench_latency.sh [N_FILES (default 100)] [CONFIG]
# CONFIG defaults to the demo job (models/restore.pt on the CPU, size 512, max_batch 8,
# batch_timeout_ms 10, JPEG q90): the inputs are synthetic, with no face for the default
# face-crop job to find. A config's job must succeed on them (a file that lands in
# failed/ stops the run with its reason).
# Files are written into a staging folder on the same filesystem first and left to age
# past settle_ms, as a producer that writes under a temporary name and renames when done
# would; so the measured time is claim + read + decode + fit + infer + encode + durable
# publish + the move to done/, not the settle wait.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
n="${1:-100}"
[ -x target/release/hotpipe ] || scripts/setup.sh
work="$(mktemp -d "${TMPDIR:-/tmp}/hotpipe-bench.XXXXXX")"
pid=""
trap 'if [ -n "$pid" ]; then kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; fi; rm -rf "$work"' EXIT
if [ -n "${2:-}" ]; then
  config="$(realpath "$2")"
else
  config="$work/demo.toml"
  printf '[model]\npath = "%s"\ndevice = "cpu"\nmax_batch = 8\nbatch_timeout_ms = 10\n[preprocess]\nsize = 512\n[encode]\nformat = "jpeg"\nquality = 90\n[hotfolder]\nroot = "hf"\n' \
    "$PWD/models/restore.pt" > "$config"
fi
# The config as given, with the hot folder moved to the scratch root and the listener on a
# free port (its relative paths stay relative to its own folder).
port="$("$HOTPIPE_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
addr="127.0.0.1:$port"
target/release/hotpipe run --config "$config" --set "hotfolder.root=$work/hf" \
  --set "metrics.listen=$addr" 2> "$work/log" &
pid=$!
for _ in $(seq 300); do grep -q "hot folder ready" "$work/log" && break; sleep 0.1; done
grep -q "hot folder ready" "$work/log" || { cat "$work/log"; exit 1; }
"$HOTPIPE_PYTHON" - "$work" "$n" "$addr" <<'PY'
import os, sys, time, urllib.request, statistics, re
from PIL import Image
import numpy as np
work, n, addr = sys.argv[1], int(sys.argv[2]), sys.argv[3]
hf, stage = os.path.join(work, "hf"), os.path.join(work, "hf", "stage")
os.makedirs(stage, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(n):
    # A 1024x768 photo-like picture: smooth gradients plus mild noise.
    y, x = np.mgrid[0:768, 0:1024]
    img = np.stack([(x * 255 / 1024), (y * 255 / 768), ((x + y + i * 7) % 256)], -1)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(stage, f"lat{i:04d}.jpg"), quality=90)
time.sleep(1.2)  # older than the default settle_ms
def metrics():
    return urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
def infer_sum_count(m):
    s = float(re.search(r'hotpipe_stage_seconds_sum\{stage="infer"\} (\S+)', m).group(1))
    c = float(re.search(r'hotpipe_stage_seconds_count\{stage="infer"\} (\S+)', m).group(1))
    return s, c
# One warm-up file (first inference allocates), not counted.
def one(name):
    src, dst = os.path.join(stage, name), os.path.join(hf, "inbox", name)
    out = os.path.join(hf, "outbox", name)  # same stem; the demo config encodes JPEG
    failed = os.path.join(hf, "failed", name + ".error.json")
    t0 = time.perf_counter()
    os.rename(src, dst)
    while not os.path.exists(out):
        if os.path.exists(failed):
            sys.exit(f"{name} failed (this config's job does not succeed on the synthetic inputs): {open(failed).read()}")
        time.sleep(0.0005)
    return (time.perf_counter() - t0) * 1000
one("lat0000.jpg"); time.sleep(0.3)
s0, c0 = infer_sum_count(metrics())
lat = []
for i in range(1, n):
    lat.append(one(f"lat{i:04d}.jpg"))
    time.sleep(0.25)  # idle between files
m1 = metrics()
s1, c1 = infer_sum_count(m1)
stages = {}
for st in ["read", "decode", "fit", "infer", "encode", "publish"]:
    s = float(re.search(rf'hotpipe_stage_seconds_sum\{{stage="{st}"\}} (\S+)', m1).group(1))
    c = float(re.search(rf'hotpipe_stage_seconds_count\{{stage="{st}"\}} (\S+)', m1).group(1))
    stages[st] = s / max(c, 1) * 1000
model_ms = (s1 - s0) / max(c1 - c0, 1) * 1000
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))]
print(f"files: {len(lat)} (1024x768 JPEG), one at a time at idle")
print(f"| metric | ms |\n|---|---|")
print(f"| rename -> output p50 | {p(0.5):.1f} |")
print(f"| rename -> output p90 | {p(0.9):.1f} |")
print(f"| rename -> output p99 | {p(0.99):.1f} |")
print(f"| rename -> output min / max | {lat[0]:.1f} / {lat[-1]:.1f} |")
print(f"| model (infer stage, mean per batch) | {model_ms:.1f} |")
print(f"| p50 - model | {p(0.5) - model_ms:.1f} (target <= 30) |")
print("stage means over the run (ms per item or batch): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
PY
kill -TERM $pid; wait $pid
