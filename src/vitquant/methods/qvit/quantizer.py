"""Q-ViT's activation quantizer: LSQ with a learnable zero point on a grid whose sign follows
the data.

Li et al., "Q-ViT: Accurate and Fully Quantized Low-bit Vision Transformer" (NeurIPS 2022,
arXiv 2210.06707), ``Quant.py:ActQ``: ``x_q = (round(clamp(x/α + round(z), Q_N, Q_P)) − z)·α``
with a learnable step ``α`` (per input feature, or per head for q, k, v and attention) and a
learnable zero point ``z``. The grid is signed unless the data seen at initialisation is
non-negative (the released code fixes the sign on the first training batch; here on the
calibration batches). Gradient scaling and the MSE / statistics initialisation are LSQ's
(:class:`~vitquant.methods.lsq.quantizer.LSQQuantizer`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vitquant.methods.lsq.quantizer import LSQQuantizer
from vitquant.quant.quantizers.base import QUANTIZERS

__all__ = ["QViTQuantizer"]


@QUANTIZERS.register("qvit")
class QViTQuantizer(LSQQuantizer):
    """LSQ with a learnable zero point; signed grid unless the calibration data is non-negative.

    Args:
        bits: bit width.
        auto_sign: choose the grid's sign from the calibration data (activations only).
        **kw: as :class:`LSQQuantizer` (``symmetric`` is forced: the zero point starts at 0 and
            is learned, on the signed or unsigned grid).
    """

    method = "qvit"

    def __init__(self, bits: int = 4, *, auto_sign: bool = True, **kw: Any) -> None:
        kw["symmetric"] = True
        kw["learn_zero_point"] = True
        super().__init__(bits, **kw)
        self.auto_sign = bool(auto_sign) and self.role != "weight"
        self._seen_min: Tensor | None = None

    def start_calibration(self, method: str = "max", num_bins: int = 2048) -> None:
        super().start_calibration(method, num_bins)
        self._seen_min = None

    def observe(self, x: Tensor) -> None:
        mn = x.detach().amin().float()
        self._seen_min = mn if self._seen_min is None else torch.minimum(self._seen_min, mn)
        super().observe(x)

    def finish_calibration(self, method: str = "max", **kw: Any) -> None:
        if self.auto_sign and self._seen_min is not None:
            self.signed = bool(self._seen_min < 0)
        self._seen_min = None
        super().finish_calibration(method, **kw)
