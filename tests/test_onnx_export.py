"""ONNX export (``torch.onnx.export(..., dynamo=True)``, the torch path on CPU) with dynamic
shapes: onnxruntime's output equals the layer's, at the exported shape and at others. A host
sync or an op without an ONNX translation on the torch path fails here."""
import pytest
import torch
from torch import nn
from torch.export import Dim

import rotp_triton as rt

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = rt.ROTPool2d(8, 3, stride=2, padding=1, method="sinkhorn", num_iters=2)
        self.head = nn.Sequential(rt.AdaptiveROTPool2d(8, 1, flatten=True, num_iters=2),
                                  nn.Linear(8, 4))

    def forward(self, x):
        return self.head(torch.relu(self.pool(self.conv(x))))


b, h, w, n = Dim("b"), Dim("h", min=2), Dim("w", min=2), Dim("n")
CASES = {  # layer, exported input shape, its dynamic dims, other shapes run
    "ROTPool2d": (lambda: rt.ROTPool2d(8, 2, num_iters=2), (2, 8, 6, 6),
                  {0: b, 2: h, 3: w}, [(3, 8, 8, 10), (1, 8, 5, 7)]),
    "AdaptiveROTPool2d": (lambda: rt.AdaptiveROTPool2d(8, (2, 3), method="badmm-q",
                                                       num_iters=2),
                          (2, 8, 6, 6), {0: b}, [(3, 8, 6, 6)]),
    "ROTPool": (lambda: rt.ROTPool(8, q0="attention", num_iters=2), (3, 5, 8), {0: b, 1: n},
                [(4, 7, 8)]),
    "OTKPool": (lambda: rt.OTKPool(8, num_supports=2), (3, 5, 8), {0: b}, [(4, 5, 8)]),
    "GSPool": (lambda: rt.GSPool(8, num_prototypes=3, num_iters=10), (3, 5, 8), {0: b},
               [(4, 5, 8)]),  # (exported, the Newton solve runs all num_iters: no early exit)
    "CNN": (_CNN, (2, 3, 8, 8), {0: b}, [(1, 3, 8, 8)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_export_runs_in_onnxruntime(name, tmp_path):
    make, shape, dims, others = CASES[name]
    layer = make().eval()
    program = torch.onnx.export(layer, (torch.randn(*shape),), dynamic_shapes=(dims,),
                                dynamo=True)
    path = str(tmp_path / "layer.onnx")
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    for s in [shape, *others]:
        x = torch.randn(*s)
        (out,) = session.run(None, {inp.name: x.numpy()})
        with torch.no_grad():
            ref = layer(x)
        torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-5, atol=1e-6)
