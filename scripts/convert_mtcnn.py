"""Convert facenet-pytorch's MTCNN weights into files libtorch (tch) can read.

facenet-pytorch 2.6.0 (MIT licence) ships P-, R- and O-Net as state dicts in PyTorch's
legacy pickle format, which libtorch's loader rejects ("Unrecognized data format"). This
script reads them straight out of the wheel (a zip: no facenet import, no torchvision)
with the venv's torch and saves each as a plain dict of tensors in the current format,
which `tch::Tensor::loadz_multi` reads.

Usage: convert_mtcnn.py WHEEL OUTDIR   (writes OUTDIR/{pnet,rnet,onet}.pt)
"""
import io
import os
import sys
import zipfile

import torch

wheel, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for net in ("pnet", "rnet", "onet"):
        data = z.read(f"facenet_pytorch/data/{net}.pt")
        # weights_only: these are plain tensors; refuse anything else in the pickle.
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        sd = {k: v.contiguous().float() for k, v in dict(sd).items()}
        tmp = os.path.join(out, f".{net}.pt.tmp")
        torch.save(sd, tmp)
        os.replace(tmp, os.path.join(out, f"{net}.pt"))
        print(f"{net}: {len(sd)} tensors -> {os.path.join(out, net + '.pt')}")
