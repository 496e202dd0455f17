#!/usr/bin/env bash
# Set up what is missing, then run the whole test suite: formatting, clippy, and every
# unit and integration test (CPU; tests that need CUDA say so and skip).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
# A test whose fixture is missing fails here instead of skipping (CUDA tests still skip:
# CI has no GPU).
export HOTPIPE_TEST_STRICT=1
cargo fmt --all -- --check
cargo clippy --release --all-targets --locked -- -D warnings
cargo test --release --locked
