"""``ROTSelectAdaptivePool2d``: ROT pooling behind timm's ``SelectAdaptivePool2d`` interface, as
installed by :func:`rotp_triton.replace_avgpool` (``surgery.py``, ``surgery_fx.py``)."""
from __future__ import annotations

from torch import Tensor, nn

from .image import AdaptiveROTPool2d


class ROTSelectAdaptivePool2d(nn.Module):
    """ROT pooling in place of timm's ``SelectAdaptivePool2d``: same attributes and methods
    timm's heads use (``pool_type``, ``flatten``, ``input_fmt``, ``is_identity()``,
    ``feat_mult()``), NCHW or NHWC input, ``(B, C)`` when flattening else ``(B, C, 1, 1)``."""

    def __init__(self, channels: int, flatten: bool = True, input_fmt: str = "NCHW", **rot_kwargs):
        super().__init__()
        if input_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"input_fmt must be 'NCHW' or 'NHWC', got {input_fmt!r}")
        self.pool_type, self.input_fmt = "rot", input_fmt
        self.pool = AdaptiveROTPool2d(channels, 1, flatten=flatten, **rot_kwargs)
        self.flatten = nn.Flatten(1) if flatten else nn.Identity()

    def is_identity(self) -> bool:
        return False

    def feat_mult(self) -> int:
        return 1

    def forward(self, x: Tensor) -> Tensor:
        if self.input_fmt == "NHWC":
            x = x.permute(0, 3, 1, 2)                                    # [B, C, H, W] view
        return self.pool(x)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(input_fmt={self.input_fmt!r}, "
                f"flatten={self.pool.flatten}, pool={self.pool!r})")
