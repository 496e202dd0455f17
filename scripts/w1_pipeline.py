"""The W1 model as a Python pipeline: ../shared/bench/make_model.py's `Restore`, written
again here in eager PyTorch and given the weights of the TorchScript file the benchmark
made, so hotpipe's Python backend and its TorchScript backend run the same model on the
same data (`HOTPIPE_W1_PYTHON=1 scripts/bench_w1.sh`).

Options: `weights` (the TorchScript file), `threads` (intra-op threads: the TorchScript
backend's `infer_threads`, so both get the same share of the machine).
"""
import torch
from torch import nn


class Restore(nn.Module):
    """make_model.py's residual conv net, layer for layer (the state dict's keys match)."""

    def __init__(self, c, n):
        super().__init__()
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()) for _ in range(n)]
        )
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        return (x + 0.1 * torch.tanh(self.out(self.body(self.inp(x))))).clamp(0, 1)


class W1:
    inputs = "torch"

    def __init__(self, device, options):
        if "threads" in options:
            torch.set_num_threads(int(options["threads"]))
        state = torch.jit.load(options["weights"], map_location="cpu").state_dict()
        channels = state["inp.weight"].shape[0]
        layers = len({k.split(".")[1] for k in state if k.startswith("body.")})
        self.model = Restore(channels, layers)
        self.model.load_state_dict(state)
        self.model.eval().to(device)

    def output_shape(self, h, w, c):
        return (1, h, w, 3)

    @torch.inference_mode()
    def __call__(self, images, params):
        # As the TorchScript backend: uint8 NHWC -> float NCHW in [0, 1], and back.
        x = images.permute(0, 3, 1, 2).float().div(255)
        y = self.model(x)
        return y.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
