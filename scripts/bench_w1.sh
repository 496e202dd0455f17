#!/usr/bin/env bash
# W1 benchmark on this machine: hotpipe vs every Python peer, same data and model, one run,
# alternating, medians. Usage: scripts/bench_w1.sh [CHANNELS LAYERS [ROUNDS [BATCH [WORKERS]]]]
# (defaults: the light model 8 2, then run again with 16 4 for the model-bound case).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
[ -x target/release/hotpipe ] || scripts/setup.sh
BENCH="$HOTPIPE_SHARED_BENCH"
WORK="${HOTPIPE_BENCH_DIR:-/tmp/hotpipe-bench}"
DEVICE="${HOTPIPE_DEVICE:-cpu}"
"$HOTPIPE_PYTHON" scripts/bench_w1.py "$PWD/target/release/hotpipe" "$BENCH" "$WORK" "$DEVICE" "${1:-8}" "${2:-2}" "${3:-3}" "${4:-4}" "${5:-$(nproc)}"
