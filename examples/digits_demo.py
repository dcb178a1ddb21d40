"""Demo: ROT pooling in a small CNN on scikit-learn's digits, against average and max pooling.

Trains the same small CNN several times, changing only its pooling layers:

* global pooling of the last conv features (``AdaptiveROTPool2d`` against
  ``nn.AdaptiveAvgPool2d``, global max, ``GSPool`` and ``OTKPool``), with 2×2 max pooling inside;
* local 2×2 pooling (``ROTPool2d`` against ``nn.AvgPool2d``), with global average pooling.

It prints a table of test accuracy and time per epoch, and saves a figure of the learned plans
P* of the global ROT pooling for a few test images (like Fig. 10 of Xu & Cheng, TPAMI 2023).

The images are scikit-learn's bundled 8×8 digits (1797 images, no download). They are used at
their native size: conv (8×8) -> 2×2 pooling -> conv (4×4) -> global pooling over the 16
positions. One 2×2 pooling stage leaves 4×4 maps, enough for a global pooling with a plan worth
looking at, so the images are not upsampled (upsampling to 16×16 would add a second pooling
stage at 4× the compute, which the 3-minute CPU budget does not allow).

    python examples/digits_demo.py               # ~1 minute on 2 CPU cores (see below)
    python examples/digits_demo.py --quick       # a seconds-long smoke run
    python examples/digits_demo.py --out plans.png --epochs 10

On a machine with a GPU it runs there, and the ROT layers use the Triton kernels.

Measured on 2 shared CPU cores (torch 2.13, OMP_NUM_THREADS=1): 27 s of CPU time; 58 s wall
at load average ~4, 2 min 46 s at load average ~8 (other jobs running). ``--quick``: ~10 s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import rotp_triton as rt  # noqa: E402

C1, C2 = 16, 32     # channels of the two conv blocks

# The ROT layers: Bregman ADMM (entropic), exact variant, T = 4 unrolled modules. The weights
# start at the functional defaults (α1 = α2 = α3 = ρ = 1) rather than the modules' near-mean
# default (α1 = ρ = 100): a layer trained from scratch here has no pretrained mean pooling to
# stay close to, and from α1 = 1 the plans move away from uniform within a few epochs.
# scale=None: the weights in the features' own units (as when the README's results were measured;
# global_plans below re-solves the layer's problem with rt.rot_pool on the raw features)
ROT_KW = dict(method="badmm-e", variant="exact", num_iters=4, a1=1.0, rho=1.0, scale=None)


# --------------------------------------------------------------------------------------------
# poolings
# --------------------------------------------------------------------------------------------
class GlobalPool(nn.Module):
    """(B, C, H, W) -> (B, out_dim) by one of the global poolings."""

    def __init__(self, kind: str, channels: int):
        super().__init__()
        self.kind = kind
        self.out_dim = channels
        if kind == "avg":
            self.pool = nn.AdaptiveAvgPool2d(1)
        elif kind == "max":
            self.pool = nn.AdaptiveMaxPool2d(1)
        elif kind == "rot":
            self.pool = rt.AdaptiveROTPool2d(channels, output_size=1, **ROT_KW)
        elif kind == "gsp":
            self.pool = rt.GSPool(channels, channels, num_prototypes=16, mass=0.3, gamma=5.0)
        elif kind == "otk":
            self.pool = rt.OTKPool(channels, num_supports=4, eps=0.1, num_iters=10)
            self.out_dim = 4 * channels
        else:
            raise ValueError(kind)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x).flatten(1)


def local_pool(kind: str, channels: int) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(2)
    if kind == "avg":
        return nn.AvgPool2d(2)
    if kind == "rot":
        return rt.ROTPool2d(channels, kernel_size=2, **ROT_KW)
    raise ValueError(kind)


class DigitsCNN(nn.Module):
    """conv3x3(1->16)-BN-ReLU [8×8] -> local 2×2 pool [4×4] -> conv3x3(16->32)-BN-ReLU [4×4]
    -> global pool -> linear(10)."""

    def __init__(self, local: str, global_: str):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, C1, 3, padding=1), nn.BatchNorm2d(C1), nn.ReLU())
        self.local = local_pool(local, C1)
        self.block2 = nn.Sequential(nn.Conv2d(C1, C2, 3, padding=1), nn.BatchNorm2d(C2),
                                    nn.ReLU())
        self.glob = GlobalPool(global_, C2)
        self.fc = nn.Linear(self.glob.out_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        """The last conv features, (B, C2, 4, 4): the input of the global pooling."""
        return self.block2(self.local(self.block1(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.glob(self.features(x)))


# (name, local pooling, global pooling)
RUNS: List[Tuple[str, str, str]] = [
    ("max 2×2 + global avg", "max", "avg"),
    ("max 2×2 + global max", "max", "max"),
    ("max 2×2 + global ROT", "max", "rot"),
    ("max 2×2 + global GSP", "max", "gsp"),
    ("max 2×2 + global OTK", "max", "otk"),
    ("avg 2×2 + global avg", "avg", "avg"),
    ("ROT 2×2 + global avg", "rot", "avg"),
]
QUICK_RUNS = [RUNS[0], RUNS[2], RUNS[6]]


# --------------------------------------------------------------------------------------------
# data, training
# --------------------------------------------------------------------------------------------
def load_data(seed: int, train_limit: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]                     # (1797, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, stratify=d.target,
                                          random_state=seed)
    if train_limit:
        xtr, ytr = xtr[:train_limit], ytr[:train_limit]
    mean, std = xtr.mean(), xtr.std()
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    return (t((xtr - mean) / std), t(ytr).long(), t((xte - mean) / std), t(yte).long(),
            t(xte))


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def train_run(name: str, local: str, global_: str, data, args, device, tag: str):
    xtr, ytr, xte, yte, _ = [t.to(device) for t in data]
    torch.manual_seed(args.seed)   # same conv initialisation in every run
    model = DigitsCNN(local, global_).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    epoch_times, acc = [], float("nan")
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(xtr), generator=gen).to(device)
        loss_sum = 0.0
        for i in range(0, len(xtr), args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_times.append(time.perf_counter() - t0)
        acc = evaluate(model, xte, yte)
        print(f"{tag} {name:22s} epoch {epoch + 1:2d}/{args.epochs}  loss "
              f"{loss_sum / len(xtr):.3f}  test acc {acc:.3f}  ({epoch_times[-1]:.1f} s)",
              file=sys.stderr, flush=True)
    return model, dict(name=name, acc=acc, epoch_s=float(np.mean(epoch_times)),
                       total_s=float(np.sum(epoch_times)))


# --------------------------------------------------------------------------------------------
# the plan figure
# --------------------------------------------------------------------------------------------
def global_plans(model: DigitsCNN, x: Tensor) -> Tuple[Tensor, Tensor, float]:
    """The plans P* of the model's global ROT pooling for images x.

    ``AdaptiveROTPool2d(output_size=1)`` pools each image as the set
    ``x.flatten(2).transpose(1, 2)``; ``rot_pool`` with the layer's current weights and
    ``return_plan=True`` solves the same problem and returns its plan.

    Returns ``P`` (B, H·W, C) - each image's plan, rows = positions, columns = channels, total
    mass 1 -, the features (B, C, H, W) it pools, and the largest difference between the
    pooling by this plan and the layer's own output (the two must agree).
    """
    pool = model.glob.pool
    model.eval()
    with torch.no_grad():
        f = model.features(x)                                               # [B, C, H, W]
        sets = f.flatten(2).transpose(1, 2)                                 # [B, HW, C]
        y, plan = rt.rot_pool(sets, method=pool.method, variant=pool.variant,
                              num_iters=pool.num_iters, inner_iters=pool.inner_iters,
                              return_plan=True, **pool.weights())
        diff = float((y - pool(f).flatten(1)).abs().max())
    return plan, f, diff


def save_plan_figure(model: DigitsCNN, raw: Tensor, x: Tensor, y: Tensor, path: str,
                     num: int = 4) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    # one test image of each of the first `num` digit classes
    pick = [int((y == c).nonzero()[0]) for c in range(num)]
    plan, feat, diff = global_plans(model, x[pick])
    plan, feat = plan.cpu(), feat.cpu()
    print(f"plan check: max |pooling by P* - layer output| = {diff:.1e}", file=sys.stderr)
    B, N, C = plan.shape
    H, W = feat.shape[2:]
    fig, axes = plt.subplots(num, 3, figsize=(9.0, 2.1 * num),
                             gridspec_kw=dict(width_ratios=[1, 3.2, 1]))
    for r in range(num):
        ax = axes[r, 0]
        ax.imshow(raw[pick[r], 0].numpy(), cmap="gray_r")
        ax.set_title(f"digit {int(y[pick[r]])}", fontsize=9)
        ax.axis("off")
        # N·C·P: 1 everywhere is the uniform plan (mean pooling); log scale, the learned plans
        # are sharp (a few entries carry most of the mass, as in max pooling)
        ax = axes[r, 1]
        scaled = (plan[r] * N * C).T.numpy()
        im = ax.imshow(scaled, aspect="auto", cmap="viridis",
                       norm=LogNorm(vmin=max(scaled.min(), 1e-3), vmax=max(scaled.max(), 1.0)))
        ax.set_xlabel("position n (4×4 grid, row-major)", fontsize=8)
        ax.set_ylabel("channel d", fontsize=8)
        ax.set_title("learned plan P* × N·D (log scale; 1 = uniform plan)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
        # where the pooling looks: the plan's mass per position, on the 4×4 grid
        ax = axes[r, 2]
        im = ax.imshow(plan[r].sum(1).reshape(H, W).numpy() * N, cmap="magma")
        ax.set_title("P* 1_D per position\n(×N: 1 = uniform)", fontsize=8)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Global ROT pooling (B-E, exact, T = 4) of the last conv features", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_plans.png", help="where to save the plan figure")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 configurations, 1 epoch, 256 training images")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    t_start = time.perf_counter()
    data = load_data(args.seed, train_limit=256 if args.quick else 0)
    runs = QUICK_RUNS if args.quick else RUNS
    print(f"digits: {len(data[0])} train / {len(data[2])} test images (8×8); "
          f"{len(runs)} configurations × {args.epochs} epochs on {device}",
          file=sys.stderr, flush=True)
    results: List[dict] = []
    rot_model = None
    for i, (name, local, global_) in enumerate(runs):
        model, r = train_run(name, local, global_, data, args, device, f"[{i + 1}/{len(runs)}]")
        results.append(r)
        if global_ == "rot":
            rot_model = model

    print("\n| pooling (local + global) | test accuracy | s / epoch |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['acc']:.3f} | {r['epoch_s']:.2f} |")

    if rot_model is not None:
        _, _, xte, yte, raw = data
        out_dir = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        save_plan_figure(rot_model, raw, xte.to(device), yte, args.out)
        print(f"\nlearned plans of the global ROT pooling: {args.out}")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
