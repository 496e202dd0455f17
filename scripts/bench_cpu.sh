#!/usr/bin/env bash
# CPU stages against Python, in one run, alternating, medians of RUNS (default 3):
#   - read+decode+fit images/s: `hotpipe bench` (2 decode threads, DCT-scaled JPEG) vs
#     `peers.py ... decode_only 2 8 512` (2 DataLoader workers, PIL), per core;
#   - hotpipe read+decode+fit on one thread for each decode.dct_scaling: off (every pixel),
#     auto (the default: keeps 2x the output) and fast (keeps 1x, as the old rule did);
#     and full against auto at a 256 x 256 output, where auto scales the larger photos;
#   - JPEG encode (quality 90, 512 x 512) images/s on one thread: hotpipe (libjpeg-turbo)
#     vs PIL (scripts/pil_encode.py).
# Usage: scripts/bench_cpu.sh [WORKDIR] [RUNS]   (WORKDIR keeps the data between runs)
# Needs the bench fixtures ($HOTPIPE_SHARED_BENCH, see env.sh) and the venv (setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
WORK="${1:-${TMPDIR:-/tmp}/hotpipe-bench-cpu}"
RUNS="${2:-3}"
SHARED="$HOTPIPE_SHARED_BENCH"
mkdir -p "$WORK"
[ -d "$WORK/D" ] || "$HOTPIPE_PYTHON" "$SHARED/make_data.py" "$SHARED/astronaut.png" "$WORK/D" 100 7 >/dev/null
[ -f "$WORK/m.pt" ] || "$HOTPIPE_PYTHON" "$SHARED/make_model.py" "$WORK/m.pt" 8 2 >/dev/null
cargo build --release --quiet
# No model: the bench measures the CPU stages only (the peer's model is loaded but unused).
cat > "$WORK/cpu.toml" <<TOML
[preprocess]
size = 512
fit = "crop"
filter = "bilinear"
[encode]
format = "jpeg"
quality = 90
[pipeline]
decode_threads = 2
encode_threads = 1
TOML
cores=$(nproc)
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
: > "$WORK/hp_df"; : > "$WORK/hp_df1"; : > "$WORK/hp_df1full"; : > "$WORK/hp_df1fast"; : > "$WORK/hp256full"; : > "$WORK/hp256auto"; : > "$WORK/peer_df"
: > "$WORK/hp_enc"; : > "$WORK/pil_enc"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for r in $(seq "$RUNS"); do
  # The report's stages by key: decode_fit is the one with the config's 2 decode threads.
  target/release/hotpipe bench --config "$WORK/cpu.toml" --stages-only --seconds 2 --json "$WORK/D" \
    | "$HOTPIPE_PYTHON" -c 'import json, sys
j = json.load(sys.stdin)
for key, file in [("decode_fit", "hp_df"), ("decode_fit_scaled", "hp_df1"),
                  ("decode_fit_full", "hp_df1full"), ("encode", "hp_enc")]:
    with open(sys.argv[1] + "/" + file, "a") as f:
        print("%.1f" % j[key]["images_per_s"], file=f)' "$WORK"
  target/release/hotpipe bench --config "$WORK/cpu.toml" --set decode.dct_scaling=fast --stages-only --seconds 2 --json "$WORK/D" \
    | "$HOTPIPE_PYTHON" -c 'import json, sys
print("%.1f" % json.load(sys.stdin)["decode_fit_scaled"]["images_per_s"])' >> "$WORK/hp_df1fast"
  target/release/hotpipe bench --config "$WORK/cpu.toml" --set preprocess.size=256 --stages-only --seconds 2 --json "$WORK/D" \
    | "$HOTPIPE_PYTHON" -c 'import json, sys
j = json.load(sys.stdin)
for key, file in [("decode_fit_full", "hp256full"), ("decode_fit_scaled", "hp256auto")]:
    with open(sys.argv[1] + "/" + file, "a") as f:
        print("%.1f" % j[key]["images_per_s"], file=f)' "$WORK"
  rm -rf "$WORK/peer_out"
  "$HOTPIPE_PYTHON" "$SHARED/peers.py" "$WORK/m.pt" "$WORK/D" "$WORK/peer_out" cpu decode_only 2 8 512 \
    | sed -n 's/.*images_per_s=\([0-9.]*\).*/\1/p' >> "$WORK/peer_df"
  "$HOTPIPE_PYTHON" scripts/pil_encode.py "$WORK/D" 2 >> "$WORK/pil_enc"
  echo "run $r: hotpipe d+f(2) $(tail -1 "$WORK/hp_df"), peer $(tail -1 "$WORK/peer_df"), encode $(tail -1 "$WORK/hp_enc") vs PIL $(tail -1 "$WORK/pil_enc")" >&2
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
hp=$(median < "$WORK/hp_df"); peer=$(median < "$WORK/peer_df")
hp1=$(median < "$WORK/hp_df1"); hp1f=$(median < "$WORK/hp_df1full"); hp1x=$(median < "$WORK/hp_df1fast")
h256f=$(median < "$WORK/hp256full"); h256a=$(median < "$WORK/hp256auto")
he=$(median < "$WORK/hp_enc"); pe=$(median < "$WORK/pil_enc")
awk -v hp="$hp" -v peer="$peer" -v hp1="$hp1" -v hp1f="$hp1f" -v hp1x="$hp1x" -v h256f="$h256f" -v h256a="$h256a" -v he="$he" -v pe="$pe" -v c="$cores" 'BEGIN {
  printf "| measure (median of runs) | hotpipe | Python | ratio |\n| --- | ---: | ---: | ---: |\n"
  printf "| read+decode+fit, 2 workers, images/s | %.1f | %.1f | %.2fx |\n", hp, peer, hp/peer
  printf "| same, per core (%d cores) | %.1f | %.1f | %.2fx |\n", c, hp/c, peer/c, hp/peer
  printf "| hotpipe read+decode+fit, 1 thread: full decode / DCT auto | %.1f / %.1f | | %.2fx |\n", hp1f, hp1, hp1/hp1f
  printf "| same: DCT fast (keeps 1x) / DCT auto | %.1f / %.1f | | %.2fx |\n", hp1x, hp1, hp1/hp1x
  printf "| same at 256 x 256: full decode / DCT auto | %.1f / %.1f | | %.2fx |\n", h256f, h256a, h256a/h256f
  printf "| JPEG encode q90 512x512, 1 thread, images/s | %.1f | %.1f | %.2fx |\n", he, pe, he/pe
}'
