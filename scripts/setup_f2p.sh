#!/usr/bin/env bash
# Set up what is missing for the F2P generator (examples/f2p/): its own Python venv,
# separate from hotpipe's as it is on a GPU host, and the tiny-weights fixture the tests
# run it on.
#   - $HOTPIPE_F2P_VENV ($HOTPIPE_CACHE/venv-f2p): examples/f2p/requirements.txt, every
#     package pinned (torch 2.11.0, DiffSynth-Studio 2.1.12, diffusers 0.42.1, ...; about
#     5 GB, once per machine: pip's cache already holds torch after scripts/setup.sh)
#   - models/f2p-tiny: Qwen-Image-Edit at toy sizes with random weights, and a tiny LoRA
#     (scripts/f2p_tiny/make.py; 0.8 MB, byte-reproducible; `--no-fixture` skips it)
# Idempotent: each is made again only when its inputs changed. On a GPU host:
#   HOTPIPE_F2P_VENV=/opt/f2p/venv scripts/setup_f2p.sh --no-fixture
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

log() { printf '[setup_f2p] %s\n' "$*" >&2; }
fixture=1
[ "${1:-}" = "--no-fixture" ] && fixture=0

command -v python3 >/dev/null 2>&1 && python3 -c 'import ensurepip, venv' 2>/dev/null \
  || hp_apt_install python3 python3-venv

req=examples/f2p/requirements.txt
want="$(sha256sum "$req" | cut -d' ' -f1)"
stamp="$HOTPIPE_F2P_VENV/.hotpipe-requirements.sha256"
if [ ! -x "$HOTPIPE_F2P_PYTHON" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing $req into $HOTPIPE_F2P_VENV (about 5 GB, once per machine)"
  rm -rf "$HOTPIPE_F2P_VENV"
  mkdir -p "$(dirname "$HOTPIPE_F2P_VENV")"
  python3 -m venv "$HOTPIPE_F2P_VENV"
  "$HOTPIPE_F2P_PYTHON" -m pip install -q --upgrade pip
  "$HOTPIPE_F2P_PYTHON" -m pip install -q -r "$req"
  echo "$want" > "$stamp"
fi

if [ "$fixture" = 1 ]; then
  out=models/f2p-tiny
  want="$(cat "$req" scripts/f2p_tiny/*.py | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$out/.inputs.sha256" 2>/dev/null)" != "$want" ]; then
    log "building the tiny Qwen-Image-Edit fixture $out"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$HOTPIPE_F2P_PYTHON" scripts/f2p_tiny/make.py "$out" >&2
    echo "$want" > "$out/.inputs.sha256"
  fi
fi
log "ready: $HOTPIPE_F2P_PYTHON"
