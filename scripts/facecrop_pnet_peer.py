"""Time facenet-pytorch's MTCNN on copies of at most 1024 px (what hotpipe detects on): the
whole detect, and its P-Net over the pyramid alone. Usage: facecrop_pnet_peer.py FOLDER
(needs the face-crop peer packages: scripts/facecrop_peer_env.sh installs them)."""
import sys, torch, time, glob, numpy as np
from PIL import Image
from facenet_pytorch import MTCNN
from facenet_pytorch.models.utils.detect_face import imresample
m = MTCNN(device="cpu")
paths = sorted(glob.glob(sys.argv[1] + "/*.jpg"))
tot=0; totp=0
for p in paths:
    im = Image.open(p).convert("RGB")
    w,h = im.size; s = min(1.0, 1024/max(w,h))
    im = im.resize((int(w*s), int(h*s)))
    t=time.perf_counter(); m.detect(im); tot += time.perf_counter()-t
    # P-Net only
    imgs = torch.as_tensor(np.uint8(np.array(im))[None]).permute(0,3,1,2).float()
    hh, ww = imgs.shape[2:4]; minl = min(hh,ww)*12/20; sc=12/20; scales=[]
    while minl >= 12: scales.append(sc); sc*=0.709; minl*=0.709
    t=time.perf_counter()
    with torch.no_grad():
        for sc in scales:
            x = imresample(imgs, (int(hh*sc+1), int(ww*sc+1)))
            x = (x-127.5)*0.0078125
            m.pnet(x)
    totp += time.perf_counter()-t
print(f"threads {torch.get_num_threads()}: detect {1000*tot/len(paths):.1f} ms/img, pnet only {1000*totp/len(paths):.1f} ms/img at <=1024 px")
