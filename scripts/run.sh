#!/usr/bin/env bash
# Set up what is missing, then start the hot-folder daemon on the default pipeline.toml:
# drop images into ./hotfolder/inbox, results appear in ./hotfolder/outbox (Ctrl-C stops).
# Extra arguments go to `hotpipe run` (e.g. --config other.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec target/release/hotpipe run --config pipeline.toml "$@"
