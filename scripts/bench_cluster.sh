#!/usr/bin/env bash
# Cluster mode throughput (issue 15): the same model-bound job through single-host
# `hotpipe run` and through a collect node with 1, 2 and 3 workers on one nats-server,
# all on this machine, the contenders alternating in each round; medians of ROUNDS.
#   scripts/bench_cluster.sh [N_IMAGES=120] [ROUNDS=3] [MODE=model]
# MODE=model: the W1 bench model (48 channels, 8 layers) at 256 px, model-bound; each
# worker gets one libtorch thread (infer_threads = 1), so on a machine with C cores the
# workers scale until C. MODE=light: 128 px inputs through a tiny model at 64 px, single
# host against one worker: what the cluster path costs per item.
# Prints images/s per contender, the ratios, and the per-item difference.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
n="${1:-120}"; rounds="${2:-3}"; mode="${3:-model}"
bin="$PWD/target/release/hotpipe"
[ -x "$bin" ] || cargo build --release --locked --quiet
w="$(mktemp -d /work/bench-cluster.XXXX 2>/dev/null || mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$w"' EXIT
"$HOTPIPE_PYTHON" "$HOTPIPE_SHARED_BENCH/make_data.py" "$HOTPIPE_SHARED_BENCH/astronaut.png" "$w/data" "$n" 7 >/dev/null
if [ "$mode" = light ]; then
  "$HOTPIPE_PYTHON" - "$w/data" <<'PY'
import glob, sys
from PIL import Image
for p in glob.glob(sys.argv[1] + "/*.jpg"):
    im = Image.open(p); im.thumbnail((128, 128)); im.save(p, quality=90)
PY
  "$HOTPIPE_PYTHON" "$HOTPIPE_SHARED_BENCH/make_model.py" "$w/m.pt" 8 2 >/dev/null
  size=64; contenders="single 1"
else
  "$HOTPIPE_PYTHON" "$HOTPIPE_SHARED_BENCH/make_model.py" "$w/m.pt" 48 8 >/dev/null
  size=256; contenders="single 1 2 3"
fi
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
nats-server -js -a 127.0.0.1 -p "$port" -sd "$w/nats" >/dev/null 2>&1 &
sleep 1
config() { # config FILE ROOT [CLUSTER_NAME]
  cat > "$1" <<TOML
[model]
path = "$w/m.pt"
device = "cpu"
max_batch = 4
[preprocess]
size = $size
[encode]
format = "jpeg"
[pipeline]
infer_threads = 1
decode_threads = 1
fit_threads = 1
encode_threads = 1
[hotfolder]
root = "$2"
settle_ms = 0
[metrics]
listen = "off"
TOML
  if [ -n "${3:-}" ]; then
    printf '[cluster]\nurl = "nats://127.0.0.1:%s"\nname = "%s"\n' "$port" "$3" >> "$1"
  fi
}
# run_one CONTENDER ROUND -> images/s on stdout
run_one() {
  local c="$1" r="$2" root="$w/hf-$1-$2" cfg="$w/$1-$2.toml" pids=()
  if [ "$c" = single ]; then config "$cfg" "$root"; else config "$cfg" "$root" "b${c}r$r"; "$bin" cluster init -c "$cfg" >/dev/null; fi
  HOTPIPE_LOG=warn "$bin" run -c "$cfg" 2>>"$w/log" & pids+=($!)
  if [ "$c" != single ]; then
    for _ in $(seq "$c"); do HOTPIPE_LOG=warn "$bin" run --role worker -c "$cfg" 2>>"$w/log" & pids+=($!); done
  fi
  until [ -d "$root/inbox" ]; do sleep 0.05; done
  sleep 3   # models loaded
  local t0; t0="$(date +%s.%N)"
  cp "$w/data"/*.jpg "$root/inbox/"
  until [ "$(ls "$root/done" | wc -l)" -ge "$n" ]; do sleep 0.05; done
  local t1; t1="$(date +%s.%N)"
  kill -TERM "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  python3 -c "print(f'{$n/($t1-$t0):.2f}')"
}
declare -A res
for r in $(seq "$rounds"); do
  for c in $contenders; do
    v="$(run_one "$c" "$r")"; res[$c]+="$v "
    echo "round $r: $c -> $v images/s" >&2
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
s="$(echo "${res[single]}" | median)"
printf '| contender | images/s (median of %s) | vs single-host run |\n| --- | --- | --- |\n' "$rounds"
for c in $contenders; do
  m="$(echo "${res[$c]}" | median)"
  name="$c"; [ "$c" = single ] && name="single-host run" || name="cluster, $c worker(s)"
  printf '| %s | %s | %sx |\n' "$name" "$m" "$(python3 -c "print(f'{$m/$s:.2f}')")"
done
m1="$(echo "${res[1]}" | median)"
python3 -c "print(f'per-item cost of the cluster path: {1000/$m1 - 1000/$s:.1f} ms (one worker against single host, medians)')"
