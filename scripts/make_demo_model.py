"""Write the demo TorchScript model the default set-up uses: a small residual conv net
(seeded weights, not trained) with hotpipe's contract, N,3,H,W float in [0,1] -> same.
Usage: make_demo_model.py OUT.pt [CHANNELS] [LAYERS]
"""
import sys, torch
from torch import nn

class Restore(nn.Module):
    def __init__(self, c: int, n: int):
        super().__init__()
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()) for _ in range(n)])
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        return (x + 0.1 * torch.tanh(self.out(self.body(self.inp(x))))).clamp(0, 1)

torch.manual_seed(0)
c = int(sys.argv[2]) if len(sys.argv) > 2 else 8
n = int(sys.argv[3]) if len(sys.argv) > 3 else 2
torch.jit.script(Restore(c, n).eval()).save(sys.argv[1])
print(f"model {sys.argv[1]}: channels={c} layers={n}")
