#!/usr/bin/env bash
# Runs ON the GPU machine (carried in .device/): CUDA tests, then W1 (400 images, model
# 48 8, 512, batch 8) with hotpipe fp32/fp16/bf16 and the Python peers in the same call,
# alternating, then the face-crop job (100 images) against mtcnn_peer.py on the GPU, and
# the stage telemetry last. Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")"
export LD_LIBRARY_PATH="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# The cuda:: tests (the Python backend's among them: its worker runs under python3).
export HOTPIPE_PYTHON="$(command -v python3)"
[ -x bin/it-tests ] && bin/it-tests cuda:: --include-ignored --nocapture 2>&1 | tail -20 | tee "$OUT/cuda-tests.txt"
W=/tmp/w1; mkdir -p $W
python3 make_data.py astronaut.png $W/D400 400 7
python3 make_model.py $W/m.pt 48 8 >/dev/null
cat > $W/w1.toml <<EOT
[model]
path = "$W/m.pt"
device = "cuda:0"
max_batch = 8
batch_timeout_ms = 5
[preprocess]
size = 512
[encode]
format = "jpeg"
quality = 90
[pipeline]
decode_threads = 12
fit_threads = 2
encode_threads = 4
EOT
# The same model on the Python backend (issue 14: within 10% of the TorchScript backend).
sed -e "s|^path = .*|backend = \"python\"\nentry = \"$PWD/w1_pipeline.py:W1\"\npython = \"$HOTPIPE_PYTHON\"|" \
    -e "s|^\[preprocess\]|[model.options]\nweights = \"$W/m.pt\"\n[preprocess]|" $W/w1.toml > $W/w1_py.toml
run_py() { rm -rf $W/o_py; bin/hotpipe process --quiet --config $W/w1_py.toml --out $W/o_py $W/D400 2>>"$OUT/hotpipe.log" | head -1; }
run_hp() { rm -rf $W/o_$1; bin/hotpipe process --quiet --config $W/w1.toml --set model.precision=$1 --out $W/o_$1 $W/D400 2>>"$OUT/hotpipe.log" | head -1; }
run_peer() { rm -rf $W/p; python3 peers.py $W/m.pt $W/D400 $W/p cuda $1 16 8 512 2>>"$OUT/peers.log"; }
for r in 1 2; do
  for p in fp32 bf16 fp16; do echo "round $r hotpipe_$p: $(run_hp $p)"; done
  echo "round $r hotpipe_python: $(run_py)"
  for v in model_only dataloader model_only_bf16 model_only_fp16 gpu_codec; do echo "round $r $(run_peer $v)"; done
done 2>&1 | tee "$OUT/w1.txt"
HOTPIPE_LOG=info bin/hotpipe process --config $W/w1.toml --out $W/o_tel $W/D400 2>&1 | grep -A12 "^stage  " | tee "$OUT/telemetry.txt"

# Face crop on the GPU (issue 5: >= 10x the peer): the default job, same 100 images.
python3 make_data.py astronaut.png $W/F100 100 7
face=(--config pipeline.toml --set face_crop.device=cuda:0 --set "face_crop.weights=$PWD/mtcnn")
rm -rf /tmp/site; python3 -m pip install -q --no-deps --no-index --target /tmp/site wheels/*.whl 2>>"$OUT/peers.log"
for r in 1 2; do
  rm -rf $W/fo; echo "round $r hotpipe_face: $(bin/hotpipe process --quiet "${face[@]}" --out $W/fo $W/F100 2>>"$OUT/hotpipe.log" | grep -E '^done ')"
  rm -rf $W/fp; echo "round $r $(PYTHONPATH=/tmp/site python3 mtcnn_peer.py $W/F100 $W/fp cuda 512 64 2>>"$OUT/peers.log" | grep '^peer=')"
done 2>&1 | tee "$OUT/face.txt"
