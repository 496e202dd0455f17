"""Compare hotpipe's face boxes (its JSON sidecars) with the peer's (mtcnn_peer_boxes.py).

Usage: facecrop_compare.py PEER.json HOTPIPE_OUTDIR [MAX_DISAGREE_PCT] [MIN_IOU] [MIN_IOU_PCT]
Prints the figures and exits 1 when the criteria fail: the two find a face in the same
images (at most MAX_DISAGREE_PCT %, default 2, disagree) and, on the images where both do,
IoU >= MIN_IOU (0.9) on at least MIN_IOU_PCT % (95) of them.
"""
import json
import os
import sys

peer = json.load(open(sys.argv[1]))
outdir = sys.argv[2]
max_dis = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
min_iou = float(sys.argv[4]) if len(sys.argv) > 4 else 0.9
min_pct = float(sys.argv[5]) if len(sys.argv) > 5 else 95.0


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


disagree, ious, low = [], [], []
for name, p in sorted(peer.items()):
    side = os.path.join(outdir, os.path.splitext(name)[0] + ".json")
    h = json.load(open(side))["face"] if os.path.exists(side) else None
    if (p is None) != (h is None):
        disagree.append(f"{name}: peer {'none' if p is None else 'face'}, hotpipe {'none' if h is None else 'face'}")
        continue
    if p is None:
        continue
    v = iou(p["box"], h["box"])
    ious.append(v)
    if v < min_iou:
        low.append(f"{name}: IoU {v:.3f} peer {[round(x) for x in p['box']]} hotpipe {[round(x) for x in h['box']]}")

n = len(peer)
both = len(ious)
dis_pct = 100.0 * len(disagree) / max(n, 1)
ok_pct = 100.0 * sum(v >= min_iou for v in ious) / max(both, 1)
s = sorted(ious)
print(f"images {n}: peer found {sum(v is not None for v in peer.values())}, both found {both}, "
      f"disagree {len(disagree)} ({dis_pct:.1f}%)")
if s:
    print(f"IoU on common faces: min {s[0]:.3f}, median {s[len(s) // 2]:.3f}, mean {sum(s) / len(s):.3f}; "
          f">= {min_iou}: {ok_pct:.1f}%")
for line in disagree + low:
    print("  " + line)
ok = dis_pct <= max_dis and ok_pct >= min_pct
print("agreement: " + ("PASS" if ok else "FAIL"))
sys.exit(0 if ok else 1)
