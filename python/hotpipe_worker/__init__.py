"""hotpipe's Python model backend, the worker side: `[model] backend = "python"`.

One worker process serves one model instance on one device, for the daemon's life, the way
Triton's Python backend runs a stub process per model instance. hotpipe starts it as
`python -m hotpipe_worker` (one per configured device), with the user's pipeline named by
`entry` (`path/to/pipeline.py:ClassName`), restarts it when it dies, and kills it when a
batch overruns `batch_timeout_s`.

Data path: pixels never cross the pipe. hotpipe hands the worker one shared memory file
(a memfd, inherited as file descriptor 3: it has no name, so nothing is left behind when
either side dies) holding the pipeline's batch slots, which hotpipe's fit workers resize
into, and the output slots, which the encoders read from; the worker maps it once and
reads and writes numpy views of it in place. On CUDA the mapping is page-locked
(`cudaHostRegister`), so copies to and from the GPU are DMA (`hotpipe_worker.pinned_bytes`
says how much took). Only small control frames
cross the pipes: stdin (from hotpipe) and the original stdout (to hotpipe), each frame a
little-endian u32 length and that many bytes of UTF-8 JSON. The user's own `print` goes
to stderr, which hotpipe passes on to its log, so it cannot corrupt the protocol.

The user's class (a complete example: examples/f2p/pipeline.py, and the README's
"Python pipelines"):

    class Pipeline:
        inputs = "numpy"     # or "torch": images as a uint8 tensor on `device`
        def __init__(self, device: str, options: dict): ...   # once per worker
        def output_shape(self, height, width, channels):
            return (k, out_height, out_width, out_channels)   # per input; C' 1, 3 or 4
        def describe(self):   # optional: what `hotpipe check` shows and each sidecar keeps
            return {"library": "diffsynth", "version": "2.1.12", ...}   # JSON values
        def __call__(self, images, params):
            # images: N x H x W x C uint8 (RGB, or RGBA with decode.alpha = "keep"): a
            # view of shared memory, valid during the call (copy what you keep);
            # params: N dicts, one per image in batch order, as [params] declares them.
            return ...  # N*K x H' x W' x C' uint8 (numpy, or a torch tensor anywhere),
                        # rows i*K .. i*K+K for image i

An exception raised for a batch runs it again one image at a time, so the image that
causes it fails alone, with the exception's last line. An out-of-memory error
(`torch.cuda.OutOfMemoryError`) halves the batch instead, down to single images, and later
batches run in chunks of the size that fitted (growing back after 64 clean batches); one
image alone out of memory is retried later by the hot folder.

Frames, hotpipe -> worker:
    {"op": "hello", "entry": ..., "device": ..., "options": {...},
     "input": [slots, max_batch, H, W, C]}      input slots from offset 0
    {"op": "map", "bytes": total, "outputs": offset, "slots": n}   this worker's outputs
    {"op": "batch", "id": n, "in": slot, "out": slot, "start": row, "rows": N,
     "params": [...]}                           rows start..start+N of both slots
    {"op": "stop"}
worker -> hotpipe:
    {"op": "ready", "output": [K, H', W', C'], "about": {...}}   what describe() said
    {"op": "done", "id": n, "errors": [null | {"error": "...", "oom": bool}, ...]}
    {"op": "fatal", "error": "last lines of the traceback"}
"""

import faulthandler
import importlib.util
import json
import mmap
import os
import signal
import struct
import sys
import traceback

try:
    import numpy as np
except ImportError as _e:  # told to hotpipe by main(), which needs only the standard library
    np, _NUMPY_MISSING = None, _e

_LEN = struct.Struct("<I")
MAX_FRAME = 16 << 20
SHM_FD = 3
# How many bytes of the shared slots are page-locked for the GPU (0: none, or not on
# CUDA); a pipeline may read it (`import hotpipe_worker`) to check its copies are DMA.
pinned_bytes = 0


def read_frame(stream):
    """The next frame's JSON object, or None when hotpipe closed the pipe."""
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"control frame of {n} bytes (at most {MAX_FRAME})")
    body = stream.read(n)
    if len(body) < n:
        return None
    return json.loads(body)


def write_frame(stream, obj):
    body = json.dumps(obj).encode()
    stream.write(_LEN.pack(len(body)) + body)
    stream.flush()


def load_entry(entry):
    """`path/to/file.py:ClassName` to the class."""
    path, sep, name = entry.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"entry {entry!r}: expected path/to/pipeline.py:ClassName")
    spec = importlib.util.spec_from_file_location("hotpipe_user_pipeline", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def last_lines(exc, n=3):
    lines = traceback.format_exception_only(type(exc), exc)
    return "".join(lines[-n:]).strip()


def is_oom(exc):
    """A device out of memory, as torch raises it (`torch.cuda.OutOfMemoryError`, or an
    older torch's RuntimeError saying so)."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)


class Worker:
    # After this many clean batches a limit learned from an out-of-memory error doubles
    # again (a transient shortage must not cap the batch for the daemon's life).
    REGROW_AFTER = 64

    def __init__(self, hello):
        self.slots, self.max_batch, self.h, self.w, self.c = hello["input"]
        self.slot_bytes = self.max_batch * self.h * self.w * self.c
        self.device = hello.get("device", "cpu")
        cls = load_entry(hello["entry"])
        self.pipeline = cls(self.device, hello.get("options") or {})
        self.k, self.oh, self.ow, self.oc = (
            int(v) for v in self.pipeline.output_shape(self.h, self.w, self.c)
        )
        self.out_row = self.k * self.oh * self.ow * self.oc
        self.about = describe(cls, self.pipeline)
        self.torch = getattr(self.pipeline, "inputs", "numpy") == "torch"
        self.limit = self.max_batch
        self.clean = 0
        self.shm = None

    def map(self, msg):
        self.shm = mmap.mmap(SHM_FD, msg["bytes"])
        view = lambda at, n, shape: np.frombuffer(self.shm, np.uint8, n, at).reshape(shape)
        self.inputs = [
            view(s * self.slot_bytes, self.slot_bytes, (self.max_batch, self.h, self.w, self.c))
            for s in range(self.slots)
        ]
        out_bytes = self.max_batch * self.out_row
        self.outputs = [
            view(
                msg["outputs"] + s * out_bytes,
                out_bytes,
                (self.max_batch * self.k, self.oh, self.ow, self.oc),
            )
            for s in range(msg["slots"])
        ]
        if self.device.startswith("cuda"):
            self._pin(msg["bytes"])

    def _pin(self, nbytes):
        """Page-lock the shared slots, so the copies to and from the GPU are DMA (no
        staging copy through a driver buffer)."""
        import ctypes

        import torch

        global pinned_bytes
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.shm))
        err = torch.cuda.cudart().cudaHostRegister(addr, nbytes, 0)
        if int(err) != 0:
            print(f"hotpipe_worker: cudaHostRegister failed ({err}); copies are not DMA",
                  file=sys.stderr)
            return
        # torch asks the driver, so this proves the registration took.
        if torch.from_numpy(self.inputs[0]).is_pinned():
            pinned_bytes = nbytes

    def _input(self, x):
        if not self.torch:
            return x
        import torch

        t = torch.from_numpy(x)
        return t.to(self.device, non_blocking=True) if self.device != "cpu" else t

    def run(self, slot, out_slot, start, rows, params):
        """Run rows `start..start+rows` of input slot `slot` into the same rows of output
        slot `out_slot`; one error (None, or {"error": last line, "oom": bool}) per row."""
        x = self.inputs[slot]
        out = self.outputs[out_slot]
        errors = []
        s = start
        while s < start + rows:
            n = min(self.limit, start + rows - s)
            errors += self._range(x, out, s, n, params[s - start : s - start + n])
            s += n
        if self.limit < self.max_batch:
            self.clean += 1
            if self.clean >= self.REGROW_AFTER:
                self.limit, self.clean = min(self.limit * 2, self.max_batch), 0
        return errors

    def _range(self, x, out, s, n, params):
        try:
            self._store(out, s, n, self.pipeline(self._input(x[s : s + n]), params))
            return [None] * n
        except Exception as e:
            if n == 1:
                return [{"error": last_lines(e), "oom": is_oom(e)}]
            if is_oom(e):
                # As the TorchScript backend: halve, remember the size that fits.
                self.limit, self.clean = max(1, min(self.limit, n // 2)), 0
                print(f"hotpipe_worker: out of memory for {n} images; running {self.limit} at a time",
                      file=sys.stderr)
                _empty_cache()
                half = n // 2
                return self._range(x, out, s, half, params[:half]) + self._range(
                    x, out, s + half, n - half, params[half:]
                )
            # One image's exception fails that image alone: run them one at a time.
            return [self._range(x, out, s + i, 1, params[i : i + 1])[0] for i in range(n)]

    def _store(self, out, first, rows, y):
        if hasattr(y, "detach"):  # a torch tensor, maybe on the GPU
            y = y.detach().cpu().numpy()
        y = np.asarray(y)
        want = (rows * self.k, self.oh, self.ow, self.oc)
        if y.shape != want or y.dtype != np.uint8:
            raise ValueError(
                f"the pipeline returned {y.dtype} {list(y.shape)}; expected uint8 {list(want)} "
                f"(output_shape says {self.k} per image of {self.oh} x {self.ow} x {self.oc})"
            )
        out[first * self.k : (first + rows) * self.k] = y


def describe(cls, pipeline):
    """The class's own `describe()` (which library, version, weights), with the class's
    name; checked to be JSON here, where a mistake can name the class."""
    about = {"class": f"{cls.__module__}.{cls.__qualname__}".removeprefix("hotpipe_user_pipeline.")}
    if hasattr(pipeline, "describe"):
        extra = pipeline.describe()
        if not isinstance(extra, dict):
            raise TypeError(f"{about['class']}.describe() returned {type(extra).__name__}, not a dict")
        json.dumps(extra)  # raises TypeError naming the value that is not JSON
        about.update(extra)
    return about


def _empty_cache():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def main():
    ctrl_in = os.fdopen(os.dup(0), "rb", buffering=0)
    ctrl_out = os.fdopen(os.dup(1), "wb")
    # The user's prints go to stderr (hotpipe's log), never into the protocol.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # A hung batch: hotpipe sends SIGUSR1 before the kill, and every thread's Python
    # stack goes to stderr (its log), from the signal handler in C, so even a thread
    # stuck inside an extension with the GIL held is shown.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    hello = read_frame(ctrl_in)
    if hello is None or hello.get("op") != "hello":
        return 2
    if np is None:
        write_frame(ctrl_out, {"op": "fatal", "error": (
            f"{sys.executable} has no numpy ({_NUMPY_MISSING}): [model] python must name the "
            "interpreter of a venv with numpy and the pipeline's own packages "
            "(scripts/setup.sh's, or examples/f2p's scripts/setup_f2p.sh)")})
        return 1
    try:
        worker = Worker(hello)
    except BaseException as e:  # noqa: B036 - reported, then the worker exits
        tb = traceback.format_exc().strip().splitlines()
        write_frame(ctrl_out, {"op": "fatal", "error": "\n".join(tb[-4:]) or repr(e)})
        return 1
    write_frame(
        ctrl_out,
        {"op": "ready", "output": [worker.k, worker.oh, worker.ow, worker.oc], "about": worker.about},
    )
    while True:
        msg = read_frame(ctrl_in)
        if msg is None or msg["op"] == "stop":
            return 0
        if msg["op"] == "map":
            worker.map(msg)
        elif msg["op"] == "batch":
            errors = worker.run(msg["in"], msg["out"], msg["start"], msg["rows"], msg["params"])
            write_frame(ctrl_out, {"op": "done", "id": msg["id"], "errors": errors})
