# shellcheck shell=bash
# Sourced by the face-crop agreement and benchmark scripts: make the venv able to run the
# Python peer (facenet-pytorch's MTCNN). facenet-pytorch 2.6.0 pins torch < 2.3, so it is
# installed without its dependencies next to torch 2.11.0; torchvision 0.26.0 is the
# release matching torch 2.11.0. Sets PEER_OK=1, or PEER_OK=0 with the reason printed.
PEER_OK=0
peer_ready() { "$HOTPIPE_PYTHON" -c "import facenet_pytorch, torchvision, requests, tqdm" 2>/dev/null; }
if peer_ready; then
  PEER_OK=1
else
  echo "[peer] installing facenet-pytorch 2.6.0 (--no-deps), torchvision 0.26.0, requests, tqdm into $HOTPIPE_VENV" >&2
  if timeout 600 "$HOTPIPE_PYTHON" -m pip install -q --no-deps "facenet-pytorch==2.6.0" "torchvision==0.26.0" >&2 \
     && timeout 300 "$HOTPIPE_PYTHON" -m pip install -q requests tqdm >&2 && peer_ready; then
    PEER_OK=1
  else
    echo "[peer] SKIP: cannot install the Python peer's packages (offline?); nothing compared" >&2
  fi
fi
