#!/usr/bin/env bash
# Is the F2P generator ever kept waiting? hotpipe (examples/f2p's config and class, on the
# CPU) against the generator alone over already-cropped faces (the ceiling) and against
# the seed's loop (PIL, facenet-pytorch MTCNN, generate, save), same photos, alternating,
# medians of ROUNDS; hotpipe's worker busy fraction from /metrics. See scripts/bench_f2p.py.
#   scripts/bench_f2p.sh [GENERATOR] [N] [ROUNDS]   (default: fixed 40 3; or tiny 8 3)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
GEN="${1:-fixed}"; N="${2:-40}"; ROUNDS="${3:-3}"
[ -x target/release/hotpipe ] && [ -f models/mtcnn/onet.pt ] || scripts/setup.sh
[ -x "$HOTPIPE_F2P_PYTHON" ] && [ -f models/f2p-tiny/diffsynth/model_configs.json ] || scripts/setup_f2p.sh
# The seed's crop: facenet-pytorch 2.6.0 (it pins torch < 2.3, so without its
# dependencies; the generator's venv has torchvision, requests and tqdm).
"$HOTPIPE_F2P_PYTHON" -c "import facenet_pytorch" 2>/dev/null \
  || "$HOTPIPE_F2P_PYTHON" -m pip install -q --no-deps "facenet-pytorch==2.6.0"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
PYTHONPATH="$PWD/models/f2p-tiny/diffsynth" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  DIFFSYNTH_SKIP_DOWNLOAD=True \
  "$HOTPIPE_F2P_PYTHON" scripts/bench_f2p.py "$GEN" "$N" "$ROUNDS" "${TMPDIR:-/tmp}/hotpipe-f2p-$GEN-$N"
