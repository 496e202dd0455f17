"""W1 benchmark driver: hotpipe against every Python peer, same data, same model, one run.

Runs each contender as its own process, alternating them in rounds (these machines are
noisy: a slow minute hits every contender alike), and reports per contender the median
images/s and the peak RSS of the process tree (from wait4's rusage, the same way for all).

Usage: bench_w1.py HOTPIPE SHARED_BENCH WORKDIR DEVICE MODEL_C MODEL_L [ROUNDS] [BATCH] [WORKERS] [N]
Prints a Markdown table; writes WORKDIR/results.json.
"""
import json, os, re, resource, statistics, subprocess, sys, time

hotpipe, bench, work, device, c, l = sys.argv[1:7]
rounds = int(sys.argv[7]) if len(sys.argv) > 7 else 3
batch = int(sys.argv[8]) if len(sys.argv) > 8 else (8 if device.startswith("cuda") else 4)
workers = int(sys.argv[9]) if len(sys.argv) > 9 else os.cpu_count()
n_images = int(sys.argv[10]) if len(sys.argv) > 10 else 100
py = sys.executable
os.makedirs(work, exist_ok=True)
data = os.path.join(work, f"D{n_images}")
model = os.path.join(work, f"m_{c}_{l}.pt")
if not os.path.isdir(data):
    subprocess.run([py, os.path.join(bench, "make_data.py"), os.path.join(bench, "astronaut.png"), data, str(n_images), "7"], check=True)
if not os.path.isfile(model):
    subprocess.run([py, os.path.join(bench, "make_model.py"), model, c, l], check=True, stdout=subprocess.DEVNULL)
cfg = os.path.join(work, "bench.toml")
with open(cfg, "w") as f:
    f.write(f"""[model]
path = "{model}"
device = "{device}"
max_batch = {batch}
batch_timeout_ms = 20
[preprocess]
size = 512
fit = "crop"
filter = "bilinear"
[encode]
format = "jpeg"
quality = 90
""")

peers = ["model_only", "naive", "seed", "dataloader", "decode_only"]
# HOTPIPE_BASELINE=/path/to/an/older/hotpipe runs that binary too, alternating with this
# one in every round (before/after figures for a change, same data, same run); it must
# have `process --json`.
baseline = os.environ.get("HOTPIPE_BASELINE")
ours = ["hotpipe"] + (["baseline"] if baseline else [])
# HOTPIPE_W1_PYTHON=1 adds hotpipe on its Python backend: the same model written again in
# eager PyTorch (scripts/w1_pipeline.py) with the TorchScript file's weights, as many
# intra-op threads as the TorchScript backend's default infer_threads.
configs = {"hotpipe": cfg, "baseline": cfg}
if os.environ.get("HOTPIPE_W1_PYTHON") == "1":
    ours.append("hotpipe_python")
    configs["hotpipe_python"] = os.path.join(work, "bench_python.toml")
    here = os.path.dirname(os.path.abspath(__file__))
    with open(configs["hotpipe_python"], "w") as f:
        f.write(f"""[model]
backend = "python"
entry = "{here}/w1_pipeline.py:W1"
python = "{py}"
device = "{device}"
max_batch = {batch}
batch_timeout_ms = 20
[model.options]
weights = "{model}"
threads = {os.cpu_count()}
[preprocess]
size = 512
fit = "crop"
filter = "bilinear"
[encode]
format = "jpeg"
quality = 90
""")
if device.startswith("cuda"):
    peers += ["gpu_codec", "model_only_fp16", "model_only_bf16"]

def run(cmd):
    """Run cmd, return (stdout, peak RSS MiB of the process and its children)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    wall = time.perf_counter() - t
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode not in (0,):
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}): {err[-2000:]}")
    return out, wall, ru.ru_maxrss / 1024

results = {k: [] for k in ours + peers}
for r in range(rounds):
    for who in ours + peers:
        out_dir = os.path.join(work, f"out_{who}_{r}")
        subprocess.run(["rm", "-rf", out_dir])
        if who in ours:
            # A child process of its own so its RSS is measured alone: run through a
            # tiny wrapper that reports the grandchild's peak RSS.
            cmd = [py, "-c", (
                "import resource,subprocess,sys;"
                "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
                "print(p.stdout);print(p.stderr[-3000:],file=sys.stderr);"
                "print('rss_mib=%.0f'%(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024));"
                "sys.exit(p.returncode if p.returncode!=1 else 0)"),
                baseline if who == "baseline" else hotpipe,
                "process", "--quiet", "--json", "--config", configs[who], "--out", out_dir, data]
            out, wall, _ = run(cmd)
            # The wrapper prints hotpipe's stdout (one JSON object) and then its own line.
            summary = next(json.loads(line) for line in out.splitlines() if line.startswith("{"))
            rss = float(re.search(r"rss_mib=(\d+)", out).group(1))
            ips = float(summary["images_per_s"])
        else:
            cmd = [py, "-c", (
                "import resource,subprocess,sys;"
                "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
                "print(p.stdout);print(p.stderr[-3000:],file=sys.stderr);"
                "print('rss_mib=%.0f'%(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024));"
                "sys.exit(p.returncode)"),
                py, os.path.join(bench, "peers.py"), model, data, out_dir, device, who, str(workers), str(batch), "512"]
            out, wall, _ = run(cmd)
            m = re.search(r"images_per_s=([\d.]+) peak_rss_mib=(\d+)", out)
            ips = float(m.group(1))
            # The peer reports its own process and largest child; the wrapper's figure
            # is the largest process in its tree, the same measure as for hotpipe.
            rss = max(float(m.group(2)), float(re.search(r"rss_mib=(\d+)", out).group(1)))
        results[who].append({"images_per_s": ips, "rss_mib": rss, "wall_s": wall})
        print(f"round {r} {who}: {ips:.1f} images/s, peak RSS {rss:.0f} MiB", file=sys.stderr, flush=True)

with open(os.path.join(work, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in results.items()}
rss = {k: max(x["rss_mib"] for x in v) for k, v in results.items()}
best_peer = max((k for k in peers if k not in ("model_only", "decode_only") and not k.startswith("model_only")), key=lambda k: med[k])
print(f"\nmodel {c} {l}, device {device}, batch {batch}, workers {workers}, {n_images} images, {rounds} rounds (median)\n")
print("| contender | images/s (median) | runs | peak RSS MiB | hotpipe / this |")
print("| --- | ---: | --- | ---: | ---: |")
for k in ours + peers:
    runs = ", ".join(f"{x['images_per_s']:.1f}" for x in results[k])
    print(f"| {k} | {med[k]:.1f} | {runs} | {rss[k]:.0f} | {med['hotpipe'] / med[k]:.2f}x |")
print(f"\nbest full-pipeline peer: {best_peer}; hotpipe / best = {med['hotpipe'] / med[best_peer]:.2f}x; "
      f"hotpipe / model_only = {med['hotpipe'] / med['model_only']:.2f}x; "
      f"hotpipe RSS / naive RSS = {rss['hotpipe'] / rss['naive']:.2f}")
if baseline:
    print(f"hotpipe / baseline ({baseline}) = {med['hotpipe'] / med['baseline']:.3f}x")
if "hotpipe_python" in med:
    print(f"Python backend / TorchScript backend = {med['hotpipe_python'] / med['hotpipe']:.3f}x")
if "hotpipe_python" in med:
    # The same model, so the same pictures: the largest pixel difference between the two
    # backends' outputs (float rounding between eager and TorchScript kernels may move a
    # value by one before JPEG; more means the reimplementation is not the same model).
    import numpy as np
    from PIL import Image
    a_dir, b_dir = (os.path.join(work, f"out_{w}_0") for w in ("hotpipe", "hotpipe_python"))
    names = sorted(os.listdir(a_dir))
    same = sum(open(os.path.join(a_dir, n), "rb").read() == open(os.path.join(b_dir, n), "rb").read() for n in names)
    worst = max(
        int(np.abs(np.asarray(Image.open(os.path.join(a_dir, n)), np.int16)
                   - np.asarray(Image.open(os.path.join(b_dir, n)), np.int16)).max())
        for n in names)
    print(f"outputs: {same} of {len(names)} byte-identical between the backends; largest pixel difference {worst}")
