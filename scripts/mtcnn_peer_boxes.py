"""The peer's faces as JSON, for scripts/facecrop_agreement.sh.

Runs facenet-pytorch's MTCNN with the settings of ../shared/bench/mtcnn_peer.py
(thresholds, min_face_size 20, factor 0.709, select_largest=False: the most confident face)
on every *.jpg in INDIR and writes {"name.jpg": {"box": [x0, y0, x1, y1], "score": p,
"width": w, "height": h} or null} to OUT.json. Usage: mtcnn_peer_boxes.py INDIR OUT.json
"""
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from facenet_pytorch import MTCNN

indir, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(os.cpu_count() or 1)
m = MTCNN(image_size=512, margin=64, post_process=False, select_largest=False, device="cpu")
res = {}
t = time.perf_counter()
for name in sorted(p for p in os.listdir(indir) if p.endswith(".jpg")):
    img = Image.open(os.path.join(indir, name)).convert("RGB")
    boxes, probs = m.detect(img)
    if boxes is None:
        res[name] = None
        continue
    i = int(np.argmax(probs))  # what MTCNN.forward's "probability" selection keeps
    res[name] = {
        "box": [float(v) for v in boxes[i]],
        "score": float(probs[i]),
        "width": img.size[0],
        "height": img.size[1],
    }
with open(out, "w") as f:
    json.dump(res, f, indent=1)
found = sum(v is not None for v in res.values())
print(f"peer: {len(res)} images, {found} with a face, {time.perf_counter() - t:.1f} s", file=sys.stderr)
