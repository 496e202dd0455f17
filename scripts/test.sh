#!/usr/bin/env bash
# Set up what is missing, then run the whole test suite: formatting, clippy, and every
# unit and integration test (CPU; tests that need CUDA say so and skip).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The F2P generator's own venv and the tiny Qwen-Image-Edit fixture (tests/it/f2p.rs).
scripts/setup_f2p.sh
source scripts/env.sh
# What only the tests need: headless Chromium for the status page's test.
if ! command -v chromium >/dev/null 2>&1; then
  echo "[test] installing chromium (the status page is tested in a real browser)" >&2
  hp_apt_install chromium
fi
# ICC profiles for the colour tests (tests/it/colour_corpus.py reads them from
# /usr/share/color/icc): colord-data (CC0) and Ghostscript's libgs-common (AGPL-3+).
need_icc=()
[ -f /usr/share/color/icc/colord/AdobeRGB1998.icc ] || need_icc+=(colord-data)
[ -f /usr/share/color/icc/ghostscript/default_cmyk.icc ] || need_icc+=(libgs-common)
if [ ${#need_icc[@]} -gt 0 ]; then
  echo "[test] installing ${need_icc[*]} (ICC profiles for the colour tests)" >&2
  hp_apt_install "${need_icc[@]}"
fi
# A test whose fixture is missing fails here instead of skipping (CUDA tests still skip:
# CI has no GPU).
export HOTPIPE_TEST_STRICT=1
cargo fmt --all -- --check
# With and without the test-only fault points, so both forms of src/vocab/fault.rs stay
# clean (the suite needs them; the service's binary must not have them).
cargo clippy --release --all-targets --locked --features fault-injection -- -D warnings
cargo clippy --release --lib --bins --locked -- -D warnings
cargo test --release --locked --features fault-injection
# The binary `scripts/run.sh` and the service run is built without fault points; prove
# it holds none (their rule table is read from HOTPIPE_FAULTS).
cargo build --release --locked
if grep -q HOTPIPE_FAULTS target/release/hotpipe; then
  echo "error: target/release/hotpipe contains fault-injection code" >&2
  exit 1
fi
