#!/usr/bin/env bash
# Prepare .device/ for a run on the lent GPU machine (see ../shared/gpu/README.md): the
# release binary, the integration-test binary (for its cuda:: tests), the shared bench
# scripts and the device script.
# Then, from the session's device tool, one call:
#   run(command="bash .device/device_w1.sh", carry=[".device"], timeout_s=540)
# `scripts/prepare_device.sh f2p` prepares the full-size F2P timing run instead (the carry
# holds 64 MiB, too little for both):
#   run(command="bash .device/device_f2p.sh", carry=[".device"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
if [ "${1:-}" = f2p ]; then
  [ -f models/f2p-tiny/diffsynth/model_configs.json ] || scripts/setup_f2p.sh
  cargo build --release --locked --quiet
  rm -rf .device && mkdir -p .device/bin .device/share/hotpipe/python .device/f2p-wheels
  cp target/release/hotpipe .device/bin/ && strip .device/bin/hotpipe
  cp -r python/hotpipe_worker .device/share/hotpipe/python/
  cp -r models/mtcnn .device/mtcnn
  cp -r models/f2p-tiny .device/f2p-tiny
  cp "$HOTPIPE_SHARED_BENCH"/make_data.py "$HOTPIPE_SHARED_BENCH"/astronaut.png .device/
  cp examples/f2p/pipeline.py scripts/f2p_full.py scripts/device_f2p.sh .device/
  cp examples/f2p/pipeline.toml .device/f2p.toml
  # diffusers and what it imports (the device's python3 has torch, torchvision, pillow,
  # numpy), at the versions of examples/f2p/requirements.txt, for whichever Python 3 it is.
  want="diffusers transformers tokenizers safetensors huggingface_hub regex PyYAML packaging
    filelock fsspec tqdm requests urllib3 idna certifi charset-normalizer importlib_metadata
    zipp typing_extensions httpx2 httpcore2 anyio h11 truststore"
  pins=$(for p in $want; do grep -i "^$p==" examples/f2p/requirements.txt; done)
  for v in 3.10 3.11 3.12 3.13; do
    # shellcheck disable=SC2086
    "$HOTPIPE_PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
      -d .device/f2p-wheels $pins || echo "[prepare] no wheels for Python $v" >&2
  done
  du -sh .device
  exit 0
fi
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
