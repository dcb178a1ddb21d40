"""Multi-instance learning on digit bags: every pooling side by side (issue 7).

A CPU-sized version of the paper's Table 1 (Xu & Cheng, TPAMI 2023) on data that ships with
scikit-learn. Bags are built from the 8x8 ``load_digits`` images the way Ilse et al. (ICML 2018)
built MNIST-bags: a bag is positive iff it contains the target digit (default 9); bag sizes are
drawn from N(mean, std) (default 10 ± 2), rounded and clipped to >= 2; each bag is drawn
uniformly from the image pool and kept or rejected until half of the bags are positive.

Cross-validation without leaking images: the images are split into K stratified folds first and
every bag is drawn from the images of one fold only, so a test bag never shares an image with a
training bag. Fold k's bags are the test set of run k; the bags of the other folds train it.

Backbone (AttentionDeepMIL-style, scaled to 8x8 inputs): a per-instance CNN
conv3x3(1->20)-ReLU-maxpool2-conv3x3(20->50)-ReLU-maxpool2-Linear(200->64)-ReLU, a pooling of the
bag's 64-d instance features, and a linear classifier with a logistic loss. Every pooling of a
fold starts from the same backbone weights (the backbone is built first, under the fold's seed).

Accuracy is that of the model after the last epoch (no model selection on the test fold).

    python bench/mil_digits.py                      # full table, <= 20 min on 2 CPU cores
    python bench/mil_digits.py --quick              # seconds-long smoke run
    python bench/mil_digits.py --poolings mean,rotp-be-exact --folds 2 --epochs 2
    python bench/mil_digits.py --list               # the pooling names

Outputs (``--out``, default ``bench/results``): ``mil_digits.md`` (the table), ``mil_digits.json``
(config, per-fold accuracies, times) and ``mil_digits.png`` (accuracy per pooling).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

from rotp_triton.nn.rot_pool import ROTPool  # noqa: E402

FEATURES = 64        # instance feature size D
ATTENTION_DIM = 32   # hidden size of the attention poolings
ROT_ITERS = 4        # T, unrolled ROT modules (the paper's default)


# --------------------------------------------------------------------------------------------
# data: digit bags
# --------------------------------------------------------------------------------------------
@dataclass
class Bags:
    """The bags of one fold: instances of bag b are ``images[index == b]``."""
    images: Tensor   # (N_total, 1, 8, 8) float32 in [0, 1]
    index: Tensor    # (N_total,) bag id per instance, grouped (bag 0's rows first, ...)
    labels: Tensor   # (B,) float32 in {0, 1}
    sizes: Tensor    # (B,) instances per bag
    source: Tensor   # (N_total,) index of each instance in sklearn's load_digits()

    @property
    def num_bags(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, bag_ids: np.ndarray) -> "Bags":
        starts = torch.cumsum(self.sizes, 0) - self.sizes
        rows = torch.cat([torch.arange(int(starts[b]), int(starts[b] + self.sizes[b]))
                          for b in bag_ids]) if len(bag_ids) else torch.zeros(0, dtype=torch.long)
        sizes = self.sizes[torch.as_tensor(bag_ids, dtype=torch.long)]
        index = torch.repeat_interleave(torch.arange(len(bag_ids)), sizes)
        return Bags(self.images[rows], index, self.labels[torch.as_tensor(bag_ids)], sizes,
                    self.source[rows])


def concat_bags(parts: List[Bags]) -> Bags:
    sizes = torch.cat([p.sizes for p in parts])
    return Bags(torch.cat([p.images for p in parts]),
                torch.repeat_interleave(torch.arange(int(sizes.numel())), sizes),
                torch.cat([p.labels for p in parts]), sizes, torch.cat([p.source for p in parts]))


def draw_bags(images: np.ndarray, digits: np.ndarray, source: np.ndarray, num_bags: int,
              target: int, mean_size: float, std_size: float,
              rng: np.random.Generator) -> Bags:
    """``num_bags`` bags (half positive) from one pool of images, Ilse et al.'s recipe.

    images (M, 8, 8), digits (M,) their classes, source (M,) their indices in the dataset."""
    want = np.array([1] * (num_bags // 2) + [0] * (num_bags - num_bags // 2))
    rng.shuffle(want)
    rows, sizes, labels = [], [], []
    for label in want:
        for _ in range(10000):  # rejection: redraw until the bag has the wanted label
            n = max(2, int(round(rng.normal(mean_size, std_size))))
            n = min(n, len(images))
            pick = rng.choice(len(images), size=n, replace=False)
            if int((digits[pick] == target).any()) == label:
                break
        else:  # pragma: no cover - only with a pool that lacks (or only has) the target
            raise RuntimeError(f"could not draw a bag with label {label} from this image pool")
        rows.append(pick)
        sizes.append(n)
        labels.append(label)
    rows = np.concatenate(rows)
    sizes_t = torch.tensor(sizes)
    return Bags(torch.from_numpy(images[rows]).float()[:, None],
                torch.repeat_interleave(torch.arange(num_bags), sizes_t),
                torch.tensor(labels, dtype=torch.float32), sizes_t,
                torch.from_numpy(source[rows]).long())


def make_fold_bags(folds: int, bags_per_fold: int, target: int, mean_size: float,
                   std_size: float, seed: int) -> List[Bags]:
    """Split the digits images into stratified folds and draw each fold's bags from its own."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)  # (1797, 8, 8), pixel values 0..16
    digits = data.target
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    rng = np.random.default_rng(seed)
    out = []
    for _, idx in skf.split(images, digits):
        out.append(draw_bags(images[idx], digits[idx], idx, bags_per_fold, target, mean_size,
                             std_size, rng))
    return out


# --------------------------------------------------------------------------------------------
# poolings: each maps (h (N_total, D), index (N_total,), num_bags) -> (num_bags, out_dim)
# --------------------------------------------------------------------------------------------
def segment_softmax(score: Tensor, index: Tensor, num_bags: int) -> Tensor:
    """Softmax of ``score`` (N_total,) within each bag."""
    top = score.new_full((num_bags,), -math.inf).scatter_reduce(0, index, score, "amax",
                                                                include_self=True)
    e = torch.exp(score - top[index])
    return e / e.new_zeros(num_bags).index_add_(0, index, e)[index]


class SumPool(nn.Module):
    def __init__(self, dim: int, mean: bool):
        super().__init__()
        self.mean, self.out_dim = mean, dim

    def forward(self, h, index, num_bags):
        s = h.new_zeros(num_bags, h.shape[1]).index_add_(0, index, h)
        if self.mean:
            s = s / torch.bincount(index, minlength=num_bags).clamp_min(1)[:, None].to(h.dtype)
        return s


class MaxPool(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, h, index, num_bags):
        out = h.new_full((num_bags, h.shape[1]), -math.inf)
        return out.scatter_reduce(0, index[:, None].expand_as(h), h, "amax", include_self=True)


class AttentionPool(nn.Module):
    """Ilse et al.'s attention: a_n ∝ exp(wᵀ tanh(V h_n)) (gated: wᵀ (tanh(V h_n) ⊙ sigm(U h_n)));
    output Σ_n a_n h_n."""

    def __init__(self, dim: int, hidden: int, gated: bool):
        super().__init__()
        self.out_dim = dim
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden) if gated else None
        self.w = nn.Linear(hidden, 1)

    def forward(self, h, index, num_bags):
        z = torch.tanh(self.V(h))
        if self.U is not None:
            z = z * torch.sigmoid(self.U(h))
        a = segment_softmax(self.w(z).squeeze(-1), index, num_bags)         # [N_total]
        return h.new_zeros(num_bags, h.shape[1]).index_add_(0, index, a[:, None] * h)


class ROTPoolAdapter(nn.Module):
    def __init__(self, dim: int, **kw):
        super().__init__()
        self.out_dim = dim
        self.pool = ROTPool(dim, **kw)

    def forward(self, h, index, num_bags):
        return self.pool(h, index=index, dim_size=num_bags)


class GSPAdapter(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        from rotp_triton.nn.gsp import GSPool
        self.out_dim = dim
        # fewer prototypes than the ImageNet default of 64: 10 digit classes, 64-d features
        self.pool = GSPool(dim, dim, num_prototypes=16, mass=0.3, gamma=5.0)

    def forward(self, h, index, num_bags):
        return self.pool(h, index=index, dim_size=num_bags)


class OTKAdapter(nn.Module):
    SUPPORTS = 4

    def __init__(self, dim: int):
        super().__init__()
        from rotp_triton.nn.otk import OTKPool
        self.out_dim = dim * self.SUPPORTS
        self.pool = OTKPool(dim, num_supports=self.SUPPORTS, heads=1, eps=0.1, num_iters=10)

    def forward(self, h, index, num_bags):
        return self.pool(h, index=index, dim_size=num_bags).flatten(1)   # [B, p * D]


# ROTP initialisations of the learnable weights (α1, α2, α3, ρ; α0 when learned):
#   "mean":  the ROTPool default, α1 = ρ = 100, α2 = α3 = 1 (α0 = 0.1): a new layer pools
#            close to the mean (a safe drop-in);
#   "paper": the official code's style, every weight softplus(0) = ln 2 ≈ 0.69 (its raw
#            parameters are 0.1·randn, i.e. softplus ≈ 0.69 ± 0.03; we use the mean): a new
#            layer starts far from the mean, with a sharp plan.
ROT_INITS = {
    "mean": {},
    "paper": dict(a1=math.log(2.0), a2=math.log(2.0), a3=math.log(2.0), rho=math.log(2.0)),
}
PAPER_A0 = math.log(2.0)


def rot_spec(method: str, variant: str, learn_a0: bool, init: str) -> dict:
    kw = dict(method=method, variant=variant, num_iters=ROT_ITERS, per_iter_params=True,
              **ROT_INITS[init])
    if learn_a0:
        kw["learn_a0"] = True
        if init == "paper":
            kw["a0"] = PAPER_A0
    return kw


@dataclass
class PoolingSpec:
    key: str          # command-line name
    label: str        # table row
    build: Callable[[int, str], nn.Module]   # (dim, rot_init) -> module
    is_rot: bool = False


def pooling_specs() -> List[PoolingSpec]:
    specs = [
        PoolingSpec("add", "Add", lambda d, _: SumPool(d, mean=False)),
        PoolingSpec("mean", "Mean", lambda d, _: SumPool(d, mean=True)),
        PoolingSpec("max", "Max", lambda d, _: MaxPool(d)),
        PoolingSpec("attention", "Attention", lambda d, _: AttentionPool(d, ATTENTION_DIM, False)),
        PoolingSpec("gated", "Gated attention",
                    lambda d, _: AttentionPool(d, ATTENTION_DIM, True)),
    ]
    short = {"sinkhorn": "s", "badmm-e": "be", "badmm-q": "bq"}
    pretty = {"sinkhorn": "S", "badmm-e": "B-E", "badmm-q": "B-Q"}
    for learn_a0 in (False, True):
        for method in ("sinkhorn", "badmm-e", "badmm-q"):
            for variant in ("exact", "paper"):
                key = f"rotp-{short[method]}-{variant}" + ("-a0" if learn_a0 else "")
                label = (f"ROTP-{pretty[method]} ({variant}, "
                         f"{'learned α0' if learn_a0 else 'α0 = 0'})")
                specs.append(PoolingSpec(
                    key, label,
                    (lambda m, v, l: lambda d, init: ROTPoolAdapter(d, **rot_spec(m, v, l, init)))(
                        method, variant, learn_a0), is_rot=True))
    specs.append(PoolingSpec("gsp", "GSP", lambda d, _: GSPAdapter(d)))
    specs.append(PoolingSpec("otk", "OTK", lambda d, _: OTKAdapter(d)))
    return specs


# --------------------------------------------------------------------------------------------
# model and training
# --------------------------------------------------------------------------------------------
class MILNet(nn.Module):
    """Instance CNN -> pooling over each bag -> linear classifier (one logit per bag)."""

    def __init__(self, pooling: Callable[[int], nn.Module]):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 20, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # [N, 20, 4, 4]
            nn.Conv2d(20, 50, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # [N, 50, 2, 2]
            nn.Flatten(), nn.Linear(200, FEATURES), nn.ReLU(),             # [N, 64]
        )
        self.pool = pooling(FEATURES)
        self.classifier = nn.Linear(self.pool.out_dim, 1)

    def forward(self, images: Tensor, index: Tensor, num_bags: int) -> Tensor:
        h = self.features(images)                                          # [N_total, D]
        return self.classifier(self.pool(h, index, num_bags)).squeeze(-1)  # [B] logits


def batches(bags: Bags, batch_size: int, rng: Optional[np.random.Generator]):
    order = np.arange(bags.num_bags)
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield bags.subset(order[i:i + batch_size])


def accuracy(model: MILNet, bags: Bags, device, batch_size: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for b in batches(bags, batch_size, None):
            logits = model(b.images.to(device), b.index.to(device), b.num_bags)
            correct += int(((logits > 0).float().cpu() == b.labels).sum())
    return correct / bags.num_bags


def train_one(spec: PoolingSpec, train: Bags, test: Bags, args, fold: int, device) -> dict:
    torch.manual_seed(args.seed * 1000 + fold)   # same backbone init for every pooling of a fold
    model = MILNet(lambda d: spec.build(d, args.rot_init)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                           weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed * 1000 + fold)
    t0, c0 = time.perf_counter(), time.process_time()
    loss_sum = float("nan")
    for epoch in range(args.epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        for b in batches(train, args.batch_size, rng):
            logits = model(b.images.to(device), b.index.to(device), b.num_bags)
            loss = F.binary_cross_entropy_with_logits(logits, b.labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * b.num_bags
            seen += b.num_bags
        loss_sum /= max(seen, 1)
        if args.verbose:
            print(f"    epoch {epoch + 1}/{args.epochs} train loss {loss_sum:.4f}",
                  file=sys.stderr, flush=True)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    acc = accuracy(model, test, device, args.batch_size)
    return dict(acc=acc, seconds=seconds, cpu_seconds=cpu_seconds, final_train_loss=loss_sum,
                finite=bool(math.isfinite(loss_sum)))


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
TABLE_HEAD = "| Pooling | Accuracy | Wall s / fold | CPU s / fold |"


def table_row(r: dict) -> str:
    return (f"| {r['label']} | {r['mean']:.3f} ± {r['std']:.3f} | {r['seconds_per_fold']:.1f} | "
            f"{r['cpu_seconds_per_fold']:.1f} |")


def write_outputs(results: List[dict], config: dict, out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"mil_digits.{ext}") for ext in ("md", "json", "png")}
    with open(paths["json"], "w") as f:
        json.dump(dict(config=config, results=results), f, indent=2)

    lines = [
        "# MIL on digit bags (scikit-learn digits, target digit "
        f"{config['target']})",
        "",
        f"{config['folds']}-fold cross-validation, {config['bags_per_fold']} bags per fold "
        f"(half positive), bag size N({config['mean_size']}, {config['std_size']}) clipped to "
        f">= 2, {config['epochs']} epochs, Adam lr {config['lr']}, batch {config['batch_size']} "
        f"bags, seed {config['seed']}, ROTP T = {ROT_ITERS}, ROTP init "
        f"\"{config['rot_init']}\". Accuracy of the last epoch on the held-out fold "
        "(mean ± std over folds). Time: training seconds per fold, wall clock and CPU time of "
        "the process (the machine may have been shared: CPU time is what an idle machine "
        "would take with one thread).",
        "",
        f"Machine: {config['machine']}; torch {config['torch']}; device {config['device']}; "
        f"total wall time {config['total_seconds']:.0f} s, CPU time "
        f"{config['total_cpu_seconds']:.0f} s.",
        "",
        TABLE_HEAD,
        "|---|---|---|---|",
    ]
    lines += [table_row(r) for r in results]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.32 * len(results) + 1.2))
    y = np.arange(len(results))[::-1]
    means = [r["mean"] for r in results]
    stds = [r["std"] for r in results]
    colors = ["tab:orange" if r["key"].startswith("rotp") else "tab:blue" for r in results]
    ax.barh(y, means, xerr=stds, color=colors, alpha=0.85, capsize=2)
    for yi, r in zip(y, results):
        ax.scatter(r["accs"], [yi] * len(r["accs"]), s=6, color="k", zorder=3)
    ax.set_yticks(y)
    ax.set_yticklabels([r["label"] for r in results], fontsize=8)
    lo = min([min(r["accs"]) for r in results] + [0.5])
    ax.set_xlim(max(0.0, lo - 0.05), 1.0)
    ax.set_xlabel(f"test accuracy ({config['folds']}-fold CV; bars: mean ± std, dots: folds)")
    ax.set_title(f"MIL on digit bags (target {config['target']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--poolings", default="all",
                   help="comma-separated pooling names (see --list), or 'all'")
    p.add_argument("--list", action="store_true", help="list the pooling names and exit")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--bags-per-fold", type=int, default=50)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8, help="bags per optimisation step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--target", type=int, default=9)
    p.add_argument("--mean-size", type=float, default=10.0)
    p.add_argument("--std-size", type=float, default=2.0)
    p.add_argument("--rot-init", choices=sorted(ROT_INITS), default="paper",
                   help="initial ROTP weights (see ROT_INITS in this file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke configuration: 2 folds, 1 epoch, 12 bags per fold, and "
                        "(unless --poolings is given) mean, attention, rotp-be-exact")
    p.add_argument("--verbose", action="store_true", help="a line per epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.folds, args.epochs, args.bags_per_fold = 2, 1, 12
        if args.poolings == "all":
            args.poolings = "mean,attention,rotp-be-exact"
    if args.folds < 2:
        p.error("--folds must be >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = pooling_specs()
    by_key = {s.key: s for s in specs}
    if args.list:
        for s in specs:
            print(f"{s.key:22s} {s.label}")
        return 0
    if args.poolings == "all":
        chosen = specs
    else:
        keys = [k.strip() for k in args.poolings.split(",") if k.strip()]
        unknown = [k for k in keys if k not in by_key]
        if unknown:
            print(f"unknown pooling(s) {unknown}; choose from {list(by_key)}", file=sys.stderr)
            return 2
        chosen = [by_key[k] for k in keys]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    t_start, c_start = time.perf_counter(), time.process_time()
    fold_bags = make_fold_bags(args.folds, args.bags_per_fold, args.target, args.mean_size,
                               args.std_size, args.seed)
    print(f"{args.folds} folds x {args.bags_per_fold} bags, "
          f"{sum(int(b.sizes.sum()) for b in fold_bags)} instances; "
          f"{len(chosen)} poolings; device {device}", file=sys.stderr, flush=True)
    results = []
    for i, spec in enumerate(chosen):
        accs, secs, cpus, finite = [], [], [], True
        for k in range(args.folds):
            train = concat_bags([fold_bags[j] for j in range(args.folds) if j != k])
            r = train_one(spec, train, fold_bags[k], args, k, device)
            accs.append(r["acc"])
            secs.append(r["seconds"])
            cpus.append(r["cpu_seconds"])
            finite &= r["finite"]
            print(f"[{i + 1}/{len(chosen)}] {spec.label:34s} fold {k + 1}/{args.folds}: "
                  f"acc {r['acc']:.3f}  ({r['seconds']:.1f} s, cpu {r['cpu_seconds']:.1f} s)",
                  file=sys.stderr, flush=True)
        results.append(dict(key=spec.key, label=spec.label, accs=accs,
                            mean=float(np.mean(accs)), std=float(np.std(accs)),
                            seconds_per_fold=float(np.mean(secs)),
                            cpu_seconds_per_fold=float(np.mean(cpus)), finite_loss=finite))
    total, total_cpu = time.perf_counter() - t_start, time.process_time() - c_start
    config = dict(folds=args.folds, bags_per_fold=args.bags_per_fold, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                  target=args.target, mean_size=args.mean_size, std_size=args.std_size,
                  rot_init=args.rot_init, rot_iters=ROT_ITERS, seed=args.seed,
                  quick=args.quick, device=str(device), torch=torch.__version__,
                  threads=torch.get_num_threads(),
                  machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                  total_seconds=total, total_cpu_seconds=total_cpu)
    paths = write_outputs(results, config, args.out)
    print("\n" + TABLE_HEAD + "\n|---|---|---|---|")
    for r in results:
        print(table_row(r))
    print(f"\ntotal {total:.0f} s; wrote {paths['md']}, {paths['json']}, {paths['png']}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
