#!/usr/bin/env bash
# Runs ON the GPU machine (carried in .device/ by `scripts/prepare_device.sh f2p`): F2P at
# full size with random bf16 weights (scripts/f2p_full.py), 1024 x 1024, 2 faces at 40
# steps with CFG and 12 at 8 steps without: the pipeline alone in a loop, then the same
# through hotpipe's Python backend (face crop on the GPU, process --manifest), each with
# the GPU's utilisation sampled every 0.5 s; seconds per image, peak memory. About 5
# minutes of device time: one call,
#   run(command="bash .device/device_f2p.sh", carry=[".device"], timeout_s=420)
set -uo pipefail
cd "$(dirname "$0")"
export LD_LIBRARY_PATH="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
W=/tmp/f2p; rm -rf $W; mkdir -p $W
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# diffusers and transformers (the device's python3 has torch, torchvision, pillow, numpy).
python3 -m pip install -q --no-deps --no-index --target $W/site f2p-wheels/*.whl 2>&1 | tail -3
export PYTHONPATH=$W/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HOTPIPE_F2P_FIXTURE=$PWD/f2p-tiny
sample() { nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/util-$1.csv" & echo $!; }
util() { awk -F, '{ u += $1; n++; if ($2 > m) m = $2 } END { printf "GPU busy %.0f%% of %d samples, memory used up to %d MiB", u / n, n, m }' "$OUT/util-$1.csv"; }

# Twelve face photos and hotpipe's crops of them (the face crop on the GPU).
python3 make_data.py astronaut.png $W/data 24 7
cat > $W/crop.toml <<EOT
[face_crop]
weights = "$PWD/mtcnn"
device = "cuda:0"
margin = 0.05
[preprocess]
size = 1024
fit = "crop"
[encode]
format = "png"
EOT
bin/hotpipe process --quiet --config $W/crop.toml --out $W/crops $W/data >/dev/null 2>>"$OUT/hotpipe.log"
mkdir -p $W/faces $W/photos
for f in $(ls $W/crops | grep '\.png$' | head -12); do
  cp $W/crops/$f $W/faces/; cp $W/data/${f%.png}.jpg $W/photos/
done
echo "faces: $(ls $W/faces | wc -l)"

echo "== the pipeline alone"
s=$(sample alone)
timeout 200 python3 f2p_full.py alone $W/faces $OUT/alone.json 2>>"$OUT/alone.log" | tail -1
kill $s; echo "alone: $(util alone)"

echo "== through hotpipe (examples/f2p/pipeline.toml, the generator swapped for RandomF2P)"
sed -e "s|^weights = .*|weights = \"$PWD/mtcnn\"\ndevice = \"cuda:0\"|" \
    -e "s|^entry = .*|entry = \"$PWD/f2p_full.py:RandomF2P\"|" \
    -e "s|^python = .*|python = \"$(command -v python3)\"|" \
    -e "s|^models = .*|models = \"$PWD/f2p-tiny\"\nlibrary = \"diffusers\"|" \
    -e "s|^lora = .*||" -e "s|^height = .*|height = 1024|" -e "s|^width = .*|width = 1024|" \
    -e "s|^root = .*|root = \"$W/hf\"|" f2p.toml > $W/hp.toml
row() { echo "{\"image\": \"$1\", \"prompt\": \"a woman in a red coat walking in a park, full body\", \"seed\": 0, \"steps\": $2, \"cfg_scale\": $3}"; }
{
  row "$(ls $W/photos | head -1)" 2 4.0   # warm-up, as the loop's
  for f in $(ls $W/photos | head -2); do row "$f" 40 4.0; done
  for f in $(ls $W/photos); do row "$f" 8 1.0; done
} > $W/photos/jobs.jsonl
s=$(sample hotpipe)
timeout 230 bin/hotpipe process --json --config $W/hp.toml --out $W/hp --manifest $W/photos/jobs.jsonl \
  > "$OUT/hotpipe.json" 2>>"$OUT/hotpipe.log"
kill $s; echo "hotpipe: $(util hotpipe)"
python3 - "$OUT/alone.json" "$OUT/hotpipe.json" <<'EOT' | tee "$OUT/summary.txt"
import json, sys
a = json.load(open(sys.argv[1])); h = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
alone = a["warmup_s"] + sum(v["images"] * v["s_per_image"] for k, v in a.items() if isinstance(v, dict) and "s_per_image" in v)
print(f"alone: build {a['build_s']:.0f} s; " + "; ".join(f"{k}: {v['s_per_image']:.2f} s per image" for k, v in a.items() if isinstance(v, dict) and "s_per_image" in v) + f"; peak {a['peak_memory_gib']:.1f} GiB")
print(f"hotpipe: done {h['done']}, failed {h['failed']}, {h['elapsed_s']:.1f} s for the manifest (alone: {alone:.1f} s): {alone / h['elapsed_s']:.3f}x the loop")
EOT
