#!/usr/bin/env bash
# Prepare .device/ for a run on the lent GPU machine (see ../shared/gpu/README.md): the
# release binary, the integration-test binary (for its cuda:: tests), the shared bench
# scripts and the device script.
# Then, from the session's device tool, one call:
#   run(command="bash .device/device_w1.sh", carry=[".device"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
# The test target requires the test-only fault points, and building it builds
# target/release/hotpipe with them too: the plain build (no fault points) comes after.
test_bin=$(cargo test --release --no-run --features fault-injection --test it \
  --message-format=json 2>/dev/null \
  | "$HOTPIPE_PYTHON" -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"] == "it": print(m["executable"])' | tail -1)
cargo build --release --quiet
# The binaries in bin/ beside share/hotpipe/python, as installed: both find the Python
# backend's worker module there.
rm -rf .device && mkdir -p .device/bin .device/share/hotpipe/python
cp target/release/hotpipe .device/bin/
[ -n "$test_bin" ] && cp "$test_bin" .device/bin/it-tests
cp -r python/hotpipe_worker .device/share/hotpipe/python/
cp "$HOTPIPE_SHARED_BENCH"/*.py "$HOTPIPE_SHARED_BENCH"/astronaut.png .device/
# The carry limit is 64 MiB: the release profile keeps debug info (about 120 MiB a binary).
strip .device/bin/hotpipe
[ -f .device/bin/it-tests ] && strip .device/bin/it-tests
# The face-crop job on the GPU: its weights, the default config, and the Python peer's
# pure-Python wheels (the device has torch and torchvision but no network).
[ -f models/mtcnn/onet.pt ] || scripts/setup.sh
cp -r models/mtcnn .device/mtcnn
cp pipeline.toml .device/
mkdir -p .device/wheels
"$HOTPIPE_PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .device/wheels \
  "facenet-pytorch==2.6.0" requests tqdm urllib3 idna certifi \
  || echo "[prepare] cannot fetch the peer's wheels; the device run skips the face-crop peer" >&2
"$HOTPIPE_PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3 \
  --implementation py --abi none --platform any -d .device/wheels charset-normalizer 2>/dev/null \
  || true
cp scripts/device_w1.sh scripts/bench_w1.py scripts/w1_pipeline.py .device/
du -sh .device
