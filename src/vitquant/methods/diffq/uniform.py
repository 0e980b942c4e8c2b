"""Classic uniform min-max quantization of whole tensors, :class:`UniformQuantizer`.

The baseline of DiffQ (Défossez et al., 2021, arXiv 2104.09987): every quantized parameter is
mapped onto ``2^bits`` evenly spaced levels between its minimum and maximum. With ``qat=True``
the training forward uses the quantized weights with a straight-through gradient
(``w + (Q(w) - w).detach()``), which is the QAT baseline of the paper (``run.py -b BITS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.methods.diffq.base import BaseQuantizer, QuantizedParam
from vitquant.methods.diffq.state import read_bytes
from vitquant.quant.bitpack import pack, packed_nbytes, unpack
from vitquant.quant.primitives import check_bits, minmax_dequantize, minmax_levels

__all__ = ["UniformQuantizer"]


class UniformQuantizer(BaseQuantizer):
    """Per-tensor min-max quantization over a fixed number of bits.

    Args:
        model: model to quantize.
        bits: bits per weight, an integer in 1..16.
        min_size: parameters of at most this many MB stay in float.
        float16: store the float parameters in float16.
        qat: quantization-aware training: the training forward sees the quantized weights
            (straight-through gradient); otherwise training is plain float training.
        exclude: ``fnmatch`` patterns of parameters to keep in float.
        detect_bound: quantize a shared parameter once.
    """

    method = "uniform"

    def __init__(
        self,
        model: nn.Module,
        bits: int = 8,
        min_size: float = 0.01,
        float16: bool = False,
        qat: bool = False,
        exclude: Sequence[str] = (),
        detect_bound: bool = True,
    ) -> None:
        self.bits = check_bits(bits, 1, 16, "bits")
        self.qat = bool(qat)
        self._init_kwargs = {"bits": self.bits, "qat": self.qat}
        super().__init__(model, min_size, float16, exclude, detect_bound)

    def _train_weight(self, qp: QuantizedParam) -> Tensor | None:
        if not self.qat:
            return None
        with torch.no_grad():
            q = self._unquantize_param(qp, self._quantize_param(qp, qp.param.detach()))
        return qp.param + (q.view_as(qp.param) - qp.param).detach()

    def _quantize_param(self, qp: QuantizedParam, weight: Tensor) -> dict[str, Any]:
        mn, mx = float(weight.min()), float(weight.max())
        levels = minmax_levels(weight, mn, mx, self.bits)
        dtype = torch.uint8 if self.bits <= 8 else torch.int16 if self.bits <= 15 else torch.int32
        return {"range": [mn, mx], "bits": self.bits, "levels": levels.to(dtype)}

    def _unquantize_param(self, qp: QuantizedParam, q: dict[str, Any]) -> Tensor:
        mn, mx = q["range"]
        return minmax_dequantize(q["levels"], mn, mx, int(q["bits"]))

    def _pack_param(self, qp: QuantizedParam, q: dict[str, Any]) -> tuple[dict, list[Tensor]]:
        bits = int(q["bits"])
        return {"range": q["range"], "bits": bits}, [pack(q["levels"].to(torch.int32), bits)]

    def _unpack_param(self, qp: QuantizedParam, entry: dict, data: Tensor | None) -> dict:
        bits, numel = int(entry["bits"]), qp.param.numel()
        raw = read_bytes(data, int(entry["offset"]), packed_nbytes(numel, bits), qp.full_name)
        levels = unpack(raw, bits, numel).view(qp.param.shape).to(qp.param.device)
        return {"range": entry["range"], "bits": bits, "levels": levels}

    def _param_size_bits(self, qp: QuantizedParam, exact: bool) -> float:
        return float(self.bits * qp.param.numel() + 2 * 32)  # levels + (min, max)
