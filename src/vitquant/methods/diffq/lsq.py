"""Learnt step size quantization of weights, :class:`LSQ` (DiffQ's LSQ baseline).

Follows Esser et al. (2020), "Learned Step Size Quantization", arXiv 1902.08153, as DiffQ's
package applies it (Défossez et al., 2021, arXiv 2104.09987): weight-only, one learnt scalar step
``s`` per tensor initialised to ``2·mean|w| / sqrt(2^(b-1))``, a symmetric signed grid, and the
gradient of ``s`` scaled by ``1 / sqrt(numel · Qp)``. The rounding and gradient tricks come from
:mod:`vitquant.quant.primitives` (``grad_scale``, ``round_ste``, ``quantize``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.methods.diffq.base import BaseQuantizer, QuantizedParam
from vitquant.methods.diffq.state import read_bytes
from vitquant.quant.bitpack import pack_signed, packed_nbytes, unpack_signed
from vitquant.quant.primitives import check_bits, grad_scale, qrange, quantize, round_ste

__all__ = ["LSQ"]

_MIN_STEP = 1e-8


class LSQ(BaseQuantizer):
    """Weight-only LSQ with one learnt step per quantized tensor.

    Args:
        model: model to quantize; a step parameter ``<name>_lsq`` is added next to every
            quantized parameter (create the optimizer first, then :meth:`setup_optimizer`; the
            steps use the optimizer's own learning rate and weight decay unless overridden).
        bits: bits per weight, an integer in 2..16.
        min_size: parameters of at most this many MB stay in float.
        float16: store the float parameters in float16.
        suffix: attribute suffix of the step parameters.
        exclude: ``fnmatch`` patterns of parameters to keep in float.
        detect_bound: quantize a shared parameter once, with one step.
    """

    method = "lsq"

    def __init__(
        self,
        model: nn.Module,
        bits: int = 8,
        min_size: float = 0.01,
        float16: bool = False,
        suffix: str = "_lsq",
        exclude: Sequence[str] = (),
        detect_bound: bool = True,
    ) -> None:
        self.bits = check_bits(bits, 2, 16, "bits")
        self.qmin, self.qmax = qrange(self.bits, signed=True)
        self.suffix = suffix
        self._init_kwargs = {"bits": self.bits, "suffix": suffix}
        self._check_fresh(model)
        super().__init__(model, min_size, float16, exclude, detect_bound)

    def _make_extra(self, qp: QuantizedParam) -> nn.Parameter:
        step = 2 * qp.param.detach().float().abs().mean() / (2 ** (self.bits - 1)) ** 0.5
        return nn.Parameter(step.clamp(min=_MIN_STEP))

    def _step(self, qp: QuantizedParam) -> Tensor:
        assert qp.extra is not None
        # a zero tensor would get a zero step (0/0 in the reference); keep the step positive
        step = qp.extra.clamp(min=_MIN_STEP)
        return grad_scale(step, 1 / (qp.param.numel() * self.qmax) ** 0.5)

    def _train_weight(self, qp: QuantizedParam) -> Tensor:
        if not self._optimizer_setup:
            raise ConfigError(
                "call quantizer.setup_optimizer(optimizer) (or quantizer.no_optimizer()) "
                "before training with LSQ"
            )
        step = self._step(qp)
        # clip before rounding, as the LSQ paper (and DiffQ) do: values within half a step
        # beyond the grid get the clipped gradient (fake_quant_ste rounds first, as torch does)
        return round_ste(torch.clamp(qp.param / step, self.qmin, self.qmax)) * step

    def _quantize_param(self, qp: QuantizedParam, weight: Tensor) -> dict[str, Any]:
        step = self._step(qp).detach()
        index = quantize(weight, step, 0, self.qmin, self.qmax)
        dtype = torch.int16 if self.bits <= 15 else torch.int32
        assert qp.extra is not None
        scale = float(qp.extra.detach().clamp(min=_MIN_STEP))  # the reference's raw step
        return {"scale": scale, "bits": self.bits, "index": index.to(dtype)}

    def _unquantize_param(self, qp: QuantizedParam, q: dict[str, Any]) -> Tensor:
        return q["index"].float() * float(q["scale"])

    def _pack_param(self, qp: QuantizedParam, q: dict[str, Any]) -> tuple[dict, list[Tensor]]:
        bits = int(q["bits"])
        entry = {"scale": float(q["scale"]), "bits": bits}
        return entry, [pack_signed(q["index"].to(torch.int32), bits)]

    def _unpack_param(self, qp: QuantizedParam, entry: dict, data: Tensor | None) -> dict:
        bits, numel = int(entry["bits"]), qp.param.numel()
        raw = read_bytes(data, int(entry["offset"]), packed_nbytes(numel, bits), qp.full_name)
        index = unpack_signed(raw, bits, numel).view(qp.param.shape).to(qp.param.device)
        return {"scale": entry["scale"], "bits": bits, "index": index}

    def _param_size_bits(self, qp: QuantizedParam, exact: bool) -> float:
        return float(self.bits * qp.param.numel() + 32)  # indices + the step
