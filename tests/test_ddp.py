"""DistributedDataParallel over every layer, without find_unused_parameters (issue 15).

Two CPU processes (gloo) each take half of a batch for two steps; every parameter must receive a
gradient (DDP raises on the second step otherwise) and the averaged gradients must equal those
of one process on the whole batch (the mean of the two halves' losses). float64 throughout.
"""
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rotp_triton as rt

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _sets(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 5, 6, generator=g, dtype=torch.float64)


def _images(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, 4, 4, generator=g, dtype=torch.float64)


def _fusion_input(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 2, 3, 6, generator=g, dtype=torch.float64)  # (G, M, N, D)


# id -> (layer factory, input factory); every factory is deterministic
CASES = {
    **{f"ROTPool-{m}": (lambda m=m: rt.ROTPool(6, method=m, num_iters=2), _sets)
       for m in ("sinkhorn", "badmm-e", "badmm-q")},
    **{f"ROTPool-{m}-a0": (lambda m=m: rt.ROTPool(6, method=m, num_iters=2, inner_iters=2,
                                                 learn_a0=True), _sets)
       for m in ("sinkhorn", "badmm-e", "badmm-q")},
    # which weights reach the output depends on T for Bregman ADMM (nn/weight_use.py)
    **{f"ROTPool-{m}-{v}-T{T}": (lambda m=m, v=v, T=T: rt.ROTPool(6, method=m, variant=v,
                                                                 num_iters=T), _sets)
       for m in ("sinkhorn", "badmm-e", "badmm-q") for v in ("exact", "paper") for T in (1, 3)},
    "ROTPool-attention": (lambda: rt.ROTPool(6, num_iters=2, p0="attention", q0="attention"),
                          _sets),
    "MixedROTPool": (lambda: rt.MixedROTPool(6, num_iters=2), _sets),
    "SetFusionROTPool": (lambda: rt.SetFusionROTPool(6, g=nn.Linear(6, 4), out_dim=4,
                                                     num_iters=2), _fusion_input),
    "GSPool": (lambda: rt.GSPool(6, 5, num_prototypes=3), _sets),
    "OTKPool": (lambda: rt.OTKPool(6, num_supports=3, heads=2), _sets),
    **{f"AdaptiveROTPool2d-{m}": (lambda m=m: rt.AdaptiveROTPool2d(6, num_iters=2, method=m),
                                  _images) for m in ("sinkhorn", "badmm-e")},
    **{f"ROTPool2d-{m}": (lambda m=m: rt.ROTPool2d(6, 2, num_iters=2, method=m), _images)
       for m in ("sinkhorn", "badmm-q")},
}


def _make(name):
    torch.manual_seed(0)
    make_layer, make_input = CASES[name]
    layer = make_layer().double()
    with torch.no_grad():  # move every parameter off its initial value (zeros for raw weights)
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer, make_input(1)


def _loss(y):
    return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum()


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for name in CASES:
            try:
                layer, x = _make(name)
                model = nn.parallel.DistributedDataParallel(layer)  # find_unused_parameters=False
                half = x.shape[0] // world
                xr = x[rank * half:(rank + 1) * half]
                _loss(model(xr)).backward()
                grads = {n: (None if p.grad is None else p.grad.clone())
                         for n, p in layer.named_parameters()}
                model.zero_grad()
                _loss(model(xr)).backward()  # DDP raises here if a parameter had no gradient
                results[name] = grads
            except Exception:  # noqa: BLE001 - reported by the parent
                results[name] = traceback.format_exc()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_gradients_equal_single_process(ddp_results, name):
    for r in range(2):
        assert not isinstance(ddp_results[r][name], str), ddp_results[r][name]
    layer, x = _make(name)
    half = x.shape[0] // 2
    loss = sum(_loss(layer(x[r * half:(r + 1) * half])) for r in range(2)) / 2
    loss.backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None, f"{n} receives no gradient"
        for r in range(2):
            g = ddp_results[r][name][n]
            assert g is not None, f"{n}: no gradient under DDP"
            assert torch.allclose(g, p.grad, rtol=1e-10, atol=1e-12), n
