#!/usr/bin/env bash
# Prepare .device/ for a run on the lent GPU machine (see ../shared/gpu/README.md): the
# release binary, the CUDA test binary, the shared bench scripts and the device script.
# Then, from the session's device tool, one call:
#   run(command="bash .device/device_w1.sh", carry=[".device"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
cargo build --release --quiet
test_bin=$(cargo test --release --no-run --test cuda --message-format=json 2>/dev/null \
  | "$HOTPIPE_PYTHON" -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and "cuda" in m["target"]["name"]: print(m["executable"])' | tail -1)
rm -rf .device && mkdir -p .device
cp target/release/hotpipe .device/
[ -n "$test_bin" ] && cp "$test_bin" .device/cuda-tests
cp "$HOTPIPE_SHARED_BENCH"/*.py "$HOTPIPE_SHARED_BENCH"/astronaut.png .device/
cp scripts/device_w1.sh scripts/bench_w1.py scripts/make_demo_model.py .device/
du -sh .device
