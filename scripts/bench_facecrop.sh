#!/usr/bin/env bash
# Face crop speed: hotpipe (the default pipeline.toml: the face crop job) against the
# Python peer ../shared/bench/mtcnn_peer.py (facenet-pytorch's MTCNN, one image at a time,
# 512 px crops with a 64 px margin), same data, same run, alternating, median of ROUNDS.
#   scripts/bench_facecrop.sh [N] [ROUNDS] [DEVICE]     (default: 100 3 cpu)
# HOTPIPE_BASELINE=/path/to/an/older/hotpipe also runs that binary in every round,
# alternating, for before/after figures of a change (a build with `--set` and `--json`).
# Both figures exclude start-up (loading, warm-up): the peer times its loop after one
# warm-up image; hotpipe's is its summary's wall time from the first image fed to the
# last outcome (the script also prints hotpipe's whole-process wall time).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
N="${1:-100}"; ROUNDS="${2:-3}"; DEVICE="${3:-cpu}"
BENCH="$HOTPIPE_SHARED_BENCH"
WORK="${FACECROP_WORK:-${TMPDIR:-/tmp}/hotpipe-facecrop-$N-7}"
source scripts/facecrop_peer_env.sh
[ -f models/mtcnn/onet.pt ] && [ -x target/release/hotpipe ] || scripts/setup.sh
mkdir -p "$WORK"
if [ "$(ls "$WORK/data" 2>/dev/null | wc -l)" != "$N" ]; then
  rm -rf "$WORK/data"
  "$HOTPIPE_PYTHON" "$BENCH/make_data.py" "$BENCH/astronaut.png" "$WORK/data" "$N" 7
fi
# The default config as it is, but for the detector's device (its relative weights path
# is resolved against pipeline.toml's folder, this checkout).
hp_args=(process --quiet --json --config pipeline.toml --set "face_crop.device=$DEVICE"
  --out "$WORK/hp_out" "$WORK/data")
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
hp=(); peer=(); hrss=(); prss=(); base=()
# `process --json`'s summary from stdin (other lines are skipped):
# "IMAGES_PER_S done D, failed F, S s", or "nan no summary" when there was none.
hp_summary() {
  "$HOTPIPE_PYTHON" -c 'import json, sys
j = next((json.loads(l) for l in sys.stdin if l.startswith("{")), None)
if j is None:
    print("nan no summary")
else:
    print("%.4f done %d, failed %d, %.2f s" % (j["total"] / max(j["elapsed_s"], 1e-9),
                                             j["done"], j["failed"], j["elapsed_s"]))'
}
# One timed `hotpipe process` run of binary $1: prints images/s.
hp_rate() {
  rm -rf "$WORK/hp_out"
  # Exit 1 when some photo has no face (on_no_face = "fail"): still a timed run.
  { HOTPIPE_LOG=error "$1" "${hp_args[@]}" || true; } | hp_summary | cut -d' ' -f1
}
for r in $(seq "$ROUNDS"); do
  if [ -n "${HOTPIPE_BASELINE:-}" ]; then
    base+=("$(hp_rate "$HOTPIPE_BASELINE")")
    echo "round $r baseline: images/s ${base[-1]}"
  fi
  rm -rf "$WORK/hp_out"
  t0=$(date +%s.%N)
  # Run through Python only to read the child's peak RSS (wait4's rusage), as the peer
  # reports its own.
  out=$(HOTPIPE_LOG=error "$HOTPIPE_PYTHON" -c "import resource, subprocess, sys
subprocess.run(sys.argv[1:])
print('rss_mib=%.0f' % (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))" \
    target/release/hotpipe "${hp_args[@]}")
  t1=$(date +%s.%N)
  summary=$(echo "$out" | hp_summary)
  rate="${summary%% *}"; line="${summary#* }"
  hrss+=("$(echo "$out" | sed -nE 's/^rss_mib=([0-9]+)/\1/p')")
  hp+=("$rate")
  echo "round $r hotpipe: $line; images/s $rate; peak RSS ${hrss[-1]} MiB; process wall $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s"
  if [ "$PEER_OK" = 1 ]; then
    rm -rf "$WORK/peer_out"
    pl=$("$HOTPIPE_PYTHON" "$BENCH/mtcnn_peer.py" "$WORK/data" "$WORK/peer_out" "$DEVICE" 512 64 2>/dev/null | grep '^peer=')
    # The peer prints images/s with one decimal (0.1 on 2 cores): use its seconds.
    peer+=("$(echo "$pl" | sed -E 's/.*seconds=([0-9.]+).*/\1/' | awk -v n="$N" '{ print n / $1 }')")
    prss+=("$(echo "$pl" | sed -E 's/.*peak_rss_mib=([0-9]+).*/\1/')")
    echo "round $r peer:    $pl"
  fi
done
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
hm=$(median "${hp[@]}")
echo "hotpipe images/s: ${hp[*]} -> median $hm"
if [ -n "${HOTPIPE_BASELINE:-}" ]; then
  bm=$(median "${base[@]}")
  echo "baseline images/s: ${base[*]} -> median $bm; hotpipe / baseline: $(awk -v a="$hm" -v b="$bm" 'BEGIN { printf "%.3f", a / b }')"
fi
if [ "$PEER_OK" = 1 ]; then
  pm=$(median "${peer[@]}")
  echo "peer images/s:    ${peer[*]} -> median $pm"
  echo "ratio hotpipe / peer: $(awk -v a="$hm" -v b="$pm" 'BEGIN { printf "%.2f", a / b }')"
  echo "peak RSS MiB, highest of the rounds: hotpipe $(printf '%s\n' "${hrss[@]}" | sort -g | tail -1), peer $(printf '%s\n' "${prss[@]}" | sort -g | tail -1)"
fi
