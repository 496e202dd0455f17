# shellcheck shell=bash
# Sourced by the other scripts: where the PyTorch venv lives and how cargo finds libtorch.
# The venv sits outside the checkout (a cache) so that a fresh clone, and CI, reuse the
# 4.7 GB PyTorch install when the machine already has it.
HOTPIPE_CACHE="${HOTPIPE_CACHE:-$HOME/.cache/hotpipe}"
HOTPIPE_TORCH_VERSION="2.11.0"
# The nats-server cluster mode is tested against (scripts/setup.sh installs it).
HOTPIPE_NATS_VERSION="2.15.1"
HOTPIPE_VENV="${HOTPIPE_VENV:-$HOTPIPE_CACHE/venv-torch$HOTPIPE_TORCH_VERSION}"
# The F2P generator's own venv (scripts/setup_f2p.sh; examples/f2p/requirements.txt).
HOTPIPE_F2P_VENV="${HOTPIPE_F2P_VENV:-$HOTPIPE_CACHE/venv-f2p}"
HOTPIPE_F2P_PYTHON="$HOTPIPE_F2P_VENV/bin/python"
export HOTPIPE_CACHE HOTPIPE_VENV HOTPIPE_TORCH_VERSION HOTPIPE_NATS_VERSION
export HOTPIPE_F2P_VENV HOTPIPE_F2P_PYTHON
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

# Install Debian packages: as root directly, else through sudo; with neither, say what
# to run as root and fail (a bare "sudo: command not found" explains nothing).
hp_apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      printf 'missing Debian packages: %s\nrun as root: apt-get update && apt-get install -y %s\n(or install sudo and run this again)\n' "$*" "$*" >&2
      return 1
    fi
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
