#!/usr/bin/env bash
# Set up what is missing, then start hotpipe on the default pipeline.toml.
# Until the hot-folder daemon lands this processes ./inbox into ./outbox once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p inbox outbox
exec target/release/hotpipe process --config pipeline.toml --out outbox inbox "$@"
