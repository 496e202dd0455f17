# shellcheck shell=bash
# Sourced by the other scripts: where the PyTorch venv lives and how cargo finds libtorch.
# The venv sits outside the checkout (a cache) so that a fresh clone, and CI, reuse the
# 4.7 GB PyTorch install when the machine already has it.
HOTPIPE_CACHE="${HOTPIPE_CACHE:-$HOME/.cache/hotpipe}"
HOTPIPE_TORCH_VERSION="2.11.0"
HOTPIPE_VENV="${HOTPIPE_VENV:-$HOTPIPE_CACHE/venv-torch$HOTPIPE_TORCH_VERSION}"
export HOTPIPE_CACHE HOTPIPE_VENV HOTPIPE_TORCH_VERSION
export VIRTUAL_ENV="$HOTPIPE_VENV"
export PATH="$HOTPIPE_VENV/bin:$HOME/.cargo/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# Tests and benchmarks find the venv's interpreter (torch, pillow, numpy) through this.
export HOTPIPE_PYTHON="$HOTPIPE_VENV/bin/python"
# The reference data generator, bench model and Python peers: ../shared/bench beside the
# checkout when it is there, else the vendored copy in tests/data/bench.
if [ -z "${HOTPIPE_SHARED_BENCH:-}" ]; then
  _hp_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [ -f "$_hp_root/../shared/bench/peers.py" ]; then
    HOTPIPE_SHARED_BENCH="$(cd "$_hp_root/../shared/bench" && pwd)"
  else
    HOTPIPE_SHARED_BENCH="$_hp_root/tests/data/bench"
  fi
  unset _hp_root
fi
export HOTPIPE_SHARED_BENCH
