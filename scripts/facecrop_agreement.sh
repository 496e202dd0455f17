#!/usr/bin/env bash
# Agreement of hotpipe's face crop with the Python peer (facenet-pytorch's MTCNN, the
# settings of ../shared/bench/mtcnn_peer.py: the most confident face).
#   scripts/facecrop_agreement.sh [N] [SEED]       (default: the reference set, 100 7)
# Makes the data with ../shared/bench/make_data.py, runs hotpipe with the default
# pipeline.toml (its sidecars hold the boxes) and the peer (scripts/mtcnn_peer_boxes.py),
# then scripts/facecrop_compare.py checks: a face found in the same images (at most 2%
# disagree) and IoU >= 0.9 on at least 95% of the common ones. Exit 1 when they fail.
# Skips (exit 0, reason printed) when the peer's packages cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
N="${1:-100}"; SEED="${2:-7}"
BENCH="$HOTPIPE_SHARED_BENCH"
WORK="${FACECROP_WORK:-${TMPDIR:-/tmp}/hotpipe-facecrop-$N-$SEED}"
source scripts/facecrop_peer_env.sh
[ "$PEER_OK" = 1 ] || exit 0
[ -f models/mtcnn/onet.pt ] && [ -x target/release/hotpipe ] || scripts/setup.sh
mkdir -p "$WORK"
if [ "$(ls "$WORK/data" 2>/dev/null | wc -l)" != "$N" ]; then
  rm -rf "$WORK/data"
  "$HOTPIPE_PYTHON" "$BENCH/make_data.py" "$BENCH/astronaut.png" "$WORK/data" "$N" "$SEED"
fi
rm -rf "$WORK/hotpipe"
HOTPIPE_LOG=error target/release/hotpipe process --quiet --config pipeline.toml --out "$WORK/hotpipe" "$WORK/data" >"$WORK/hotpipe.log" 2>&1 || true
[ -f "$WORK/peer.json" ] || "$HOTPIPE_PYTHON" scripts/mtcnn_peer_boxes.py "$WORK/data" "$WORK/peer.json"
"$HOTPIPE_PYTHON" scripts/facecrop_compare.py "$WORK/peer.json" "$WORK/hotpipe"
