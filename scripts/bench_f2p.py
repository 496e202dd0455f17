"""Is the F2P generator ever kept waiting? hotpipe's end-to-end rate on a folder of face
photos against the same generator alone in a Python loop over already-cropped faces (the
ceiling: nothing but generation), and against the seed's loop (PIL load, facenet-pytorch
MTCNN crop, generate, save, one photo at a time). Same run, same photos, alternating,
medians of ROUNDS. Run it through scripts/bench_f2p.sh (the generator's venv).

    bench_f2p.py GENERATOR N ROUNDS WORK
      GENERATOR  tiny   the real DiffSynth pipeline on the tiny fixture (models/f2p-tiny)
                 fixed  a stand-in that takes a fixed 0.5 s per image and no CPU, the
                        shape of a GPU generator that dominates the cost

Every contender runs the examples/f2p class (or the stand-in) in its own process with one
torch thread for the generator, and each excludes its start-up: the loops time after one
warm-up image, hotpipe after its first photo is published. hotpipe's busy fraction is
the worker's busy time from /metrics over the timed wall time.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"prompt": "a woman in a red coat walking in a park, full body",
          "negative_prompt": "", "seed": 7, "steps": 2, "cfg_scale": 4.0}
# Small outputs: the tiny pipeline's cost is then mostly its 1024 px VAE encode.
OUT_HW = (512, 384)

FIXED = '''
import time
import numpy as np
from PIL import Image

class FixedCost:
    """A stand-in generator: `seconds` per image, no CPU (as a GPU generator looks from
    the host), the face resized to the output size."""
    inputs = "numpy"
    def __init__(self, device, options):
        self.s, self.h, self.w = float(options["seconds"]), int(options["height"]), int(options["width"])
    def output_shape(self, h, w, c):
        return (1, self.h, self.w, 3)
    def __call__(self, images, params):
        return np.stack([self.generate(x, p) for x, p in zip(images, params)])
    def generate(self, face, p):
        time.sleep(self.s)
        return np.asarray(Image.fromarray(np.ascontiguousarray(face[:, :, :3])).resize((self.w, self.h)))
'''


def generator(kind, work):
    """(entry file, class, options) of the generator all contenders run."""
    fixture = ROOT / "models/f2p-tiny"
    h, w = OUT_HW
    if kind == "tiny":
        return (ROOT / "examples/f2p/pipeline.py", "F2P",
                {"models": str(fixture), "lora": str(fixture / "lora/f2p-tiny.safetensors"),
                 "height": h, "width": w})
    path = work / "fixed_cost.py"
    path.write_text(FIXED)
    return path, "FixedCost", {"seconds": 0.5, "height": h, "width": w}


def load_class(entry):
    import importlib.util

    spec = importlib.util.spec_from_file_location("generator", entry)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the two Python contenders (run as `bench_f2p.py peer MODE ...`) ----

def peer(mode, entry, cls, options, inputs, out):
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    gen = getattr(load_class(entry), cls)("cpu", json.loads(options))
    paths = sorted(Path(inputs).iterdir())
    if mode == "ceiling":
        faces = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        gen(faces[0][None], [PARAMS])  # warm-up
        t = time.perf_counter()
        for face in faces:
            gen(face[None], [PARAMS])
        took = time.perf_counter() - t
    else:
        from facenet_pytorch import MTCNN

        # The seed's crop: facenet-pytorch's MTCNN, most confident face, a square
        # crop at 1024 px with a margin, one photo at a time.
        mtcnn = MTCNN(image_size=1024, margin=64, post_process=False, select_largest=False)
        os.makedirs(out, exist_ok=True)

        def one(p):
            face = mtcnn(Image.open(p).convert("RGB"))
            if face is None:
                return
            face = face.permute(1, 2, 0).clamp(0, 255).byte().numpy()
            y = gen(face[None], [PARAMS])[0]
            Image.fromarray(y).save(Path(out) / (p.stem + ".jpg"), quality=95)

        one(paths[0])  # warm-up
        t = time.perf_counter()
        for p in paths:
            one(p)
        took = time.perf_counter() - t
    print(json.dumps({"images": len(paths), "seconds": took}))


# ---- the driver ----

def hotpipe_config(work, entry, cls, options):
    """examples/f2p/pipeline.toml with the generator, paths and the device swapped."""
    text = (ROOT / "examples/f2p/pipeline.toml").read_text()
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    text = re.sub(r"\[model\.options\].*?\n\n", f"[model.options]\n{lines}\n\n", text, flags=re.S)
    for a, b in [
        ('"../../models/mtcnn"', json.dumps(str(ROOT / "models/mtcnn"))),
        ('"pipeline.py:F2P"', json.dumps(f"{entry}:{cls}")),
        ('"/opt/f2p/venv/bin/python"', json.dumps(sys.executable)),
        ('["cuda:0"]', '"cpu"'),
        ('root = "hotfolder"', f'root = {json.dumps(str(work / "hf"))}\nsettle_ms = 50\n\n'
                               '[metrics]\nlisten = "127.0.0.1:0"'),
    ]:
        assert a in text, a
        text = text.replace(a, b)
    cfg = work / "hotpipe.toml"
    cfg.write_text(text)
    return cfg


def busy(addr):
    text = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
    m = re.search(r'^hotpipe_model_worker_busy_seconds_total\{worker="0"\} (\S+)$', text, re.M)
    return float(m.group(1))


def run_hotpipe(cfg, photos, work):
    """Start the daemon (not timed), publish one warm-up photo, then drop every photo and
    time until all are published: (images/s, busy fraction)."""
    hf = work / "hf"
    shutil.rmtree(hf, ignore_errors=True)
    for sub in ("inbox", "work", "outbox", "done", "failed"):
        (hf / sub).mkdir(parents=True)
    log = open(work / "hotpipe.log", "w+")
    env = dict(os.environ, HOTPIPE_LOG="info", OMP_NUM_THREADS="1", NO_COLOR="1")
    daemon = subprocess.Popen([str(ROOT / "target/release/hotpipe"), "run", "--config", str(cfg)],
                              stderr=log, stdout=subprocess.DEVNULL, env=env)
    try:
        def logged():
            log.seek(0)
            return log.read()

        while "hot folder ready" not in logged():
            if daemon.poll() is not None:
                sys.exit(f"hotpipe exited:\n{logged()}")
            time.sleep(0.2)
        addr = re.search(r"status page on http://([^/\s]+)", logged()).group(1)

        def drop(name, data):
            for n, d in ((Path(name).stem + ".json", json.dumps(PARAMS).encode()), (name, data)):
                tmp = hf / "inbox" / f".{n}.part"
                tmp.write_bytes(d)
                tmp.rename(hf / "inbox" / n)

        def published():
            return sum(1 for n in os.listdir(hf / "done") if not n.endswith(".json"))

        drop("warmup" + photos[0].suffix, photos[0].read_bytes())
        while published() < 1:
            time.sleep(0.05)
        b0, t0 = busy(addr), time.perf_counter()
        for p in photos:
            drop(p.name, p.read_bytes())
        while published() < len(photos) + 1:
            if daemon.poll() is not None:
                sys.exit(f"hotpipe exited:\n{logged()}")
            time.sleep(0.02)
        took = time.perf_counter() - t0
        fraction = (busy(addr) - b0) / took
        failed = [n for n in os.listdir(hf / "failed") if n.endswith(".error.json")]
        if failed:
            sys.exit(f"hotpipe failed {failed}")
        return len(photos) / took, fraction
    finally:
        daemon.terminate()
        daemon.wait()


def run_peer(mode, gen, inputs, work):
    entry, cls, options = gen
    r = subprocess.run([sys.executable, __file__, "peer", mode, str(entry), cls, json.dumps(options),
                        str(inputs), str(work / f"{mode}_out")],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode != 0:
        sys.exit(f"{mode}: {r.stderr}")
    j = json.loads(r.stdout.strip().splitlines()[-1])
    return j["images"] / j["seconds"]


def face_photos(work, n):
    """N photos hotpipe's face crop finds a face in (make_data.py crops some faces away),
    and their 1024 px crops, for the ceiling."""
    bench = Path(os.environ["HOTPIPE_SHARED_BENCH"])
    data = work / "data"
    if not data.is_dir() or len(list(data.iterdir())) < n:
        shutil.rmtree(data, ignore_errors=True)
        subprocess.run([os.environ["HOTPIPE_PYTHON"], str(bench / "make_data.py"),
                        str(bench / "astronaut.png"), str(data), str(2 * n), "7"], check=True)
    crops = work / "crops_all"
    shutil.rmtree(crops, ignore_errors=True)
    subprocess.run([str(ROOT / "target/release/hotpipe"), "process", "--quiet", "--config",
                    str(ROOT / "pipeline.toml"), "--set", "preprocess.size=1024",
                    "--set", "face_crop.margin=0.05", "--out", str(crops), str(data)],
                   env=dict(os.environ, HOTPIPE_LOG="error"), stdout=subprocess.DEVNULL)
    found = sorted(p for p in crops.iterdir() if p.suffix == ".jpg")[:n]
    if len(found) < n:
        sys.exit(f"only {len(found)} of {2 * n} photos have a face")
    photos, faces = work / "photos", work / "crops"
    for d in (photos, faces):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    for c in found:
        shutil.copy(data / c.name, photos / c.name)
        shutil.copy(c, faces / c.name)
    return sorted(photos.iterdir()), faces


def main():
    kind, n, rounds, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    work.mkdir(parents=True, exist_ok=True)
    gen = generator(kind, work)
    photos, faces = face_photos(work, n)
    cfg = hotpipe_config(work, *gen)
    got = {"hotpipe": [], "busy": [], "ceiling": [], "seed": []}
    for r in range(rounds):
        rate, frac = run_hotpipe(cfg, photos, work)
        got["hotpipe"].append(rate)
        got["busy"].append(frac)
        got["ceiling"].append(run_peer("ceiling", gen, faces, work))
        got["seed"].append(run_peer("seed", gen, work / "photos", work))
        print(f"round {r + 1}: hotpipe {rate:.3f}/s (worker busy {frac:.1%}), "
              f"ceiling {got['ceiling'][-1]:.3f}/s, seed {got['seed'][-1]:.3f}/s", flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    print(json.dumps({"generator": kind, "photos": n, "rounds": rounds, **{f"{k}_median": v for k, v in med.items()},
                      "hotpipe_over_ceiling": med["hotpipe"] / med["ceiling"],
                      "hotpipe_over_seed": med["hotpipe"] / med["seed"], "runs": got}))


if __name__ == "__main__":
    if sys.argv[1] == "peer":
        peer(*sys.argv[2:8])
    else:
        main()
