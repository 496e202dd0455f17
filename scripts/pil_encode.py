"""Time PIL's JPEG encode (quality 90) of 512 x 512 images on one thread: the Python
baseline for hotpipe's encode stage. The inputs are the data folder's images fitted to
512 x 512 the way the peers fit them (bilinear, centre crop), held in memory.

Usage: pil_encode.py DATA_DIR [SECONDS]   prints: images/s
"""
import io, os, sys, time
from PIL import Image, ImageOps

indir = sys.argv[1]
secs = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
paths = sorted(os.path.join(indir, p) for p in os.listdir(indir) if p.endswith(".jpg"))
imgs = [ImageOps.fit(Image.open(p).convert("RGB"), (512, 512), Image.BILINEAR) for p in paths]
n, t = 0, time.perf_counter()
while n < len(imgs) or time.perf_counter() - t < secs:
    buf = io.BytesIO()
    imgs[n % len(imgs)].save(buf, format="JPEG", quality=90)
    n += 1
print(f"{n / (time.perf_counter() - t):.1f}")
