"""LSQ and LSQ+: quantizers whose step size (and offset) are learned by gradient descent.

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020, arXiv 1902.08153):
``x_hat = clamp(round(x / s), Q_N, Q_P) · s`` with a straight-through ``round`` and the step's
gradient multiplied by ``g = 1 / sqrt(N · Q_P)`` (``N`` elements share the step).
LSQ+ (Bhalgat et al., CVPRW 2020, arXiv 2004.09576) adds a learnable offset for asymmetric
(unsigned) activations such as GELU outputs; here the offset is an integer zero point ``z``
(``x_hat = (clamp(round(x / s + z), Q_N, Q_P) - z) · s``, ``z`` rounded with a straight-through
estimator), which is exactly what ``torch._fake_quantize_learnable_per_tensor_affine`` computes and
what export needs (an integer zero point).

Scales are per tensor, per channel, per head or per group (the base class's granularities) and are
initialised by calibration before training:

* ``finish_calibration("mse")``: per-row grid search of the clipping range minimising the
  quantization MSE (:func:`~vitquant.quant.primitives.mse_search_rows`) over the observed values
  (weights: all of them; activations: a bounded, strided sample per scale);
* ``finish_calibration("lsq")``: LSQ's statistics ``s = 2·mean|x| / sqrt(Q_P)``;
* ``"max" | "percentile" | "entropy"``: the shared histogram calibrators of the base class.

``scale`` (and, for LSQ+, ``zero_point``) are ``nn.Parameter``\\ s under the same state-dict names
as the base class's buffers, so a trained LSQ model loads into fixed-range quantizers for export.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vitquant.quant import primitives as P
from vitquant.quant.quantizers.base import QUANTIZERS, Quantizer, _rows, _unrows, gran_kind

__all__ = ["LSQQuantizer", "LSQPlusQuantizer"]

#: values kept per scale (row) for the MSE initialisation of activations
MAX_SAMPLES_PER_ROW = 1 << 16
_PARAMS = ("scale", "zero_point")


@QUANTIZERS.register("lsq")
class LSQQuantizer(Quantizer):
    """Learned-step-size fake quantizer (LSQ; LSQ+ when asymmetric).

    Args:
        bits, signed, symmetric, narrow, granularity, role: as :class:`Quantizer`.
        learn_zero_point: learn the zero point (LSQ+ offset); default: when not ``symmetric``.
        learn_scale: learn the step size (``False`` keeps the calibrated one fixed).

    Example:
        >>> q = LSQQuantizer(4, granularity=PerChannel(0), role="weight")
        >>> q.calibrate_tensor(linear.weight, "mse")   # MSE-fitted initial step per channel
        >>> w_hat = q(linear.weight)                   # differentiable in weight and step
    """

    kind = "uniform"
    method = "lsq"

    def __init__(
        self,
        bits: int = 8,
        *,
        learn_zero_point: bool | None = None,
        learn_scale: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(bits, **kw)
        self.learn_zero_point = (
            (not self.symmetric) if learn_zero_point is None else bool(learn_zero_point)
        )
        self.learn_scale = bool(learn_scale)
        self.scale = nn.Parameter(torch.empty(0), requires_grad=self.learn_scale)
        if self.learn_zero_point:
            self.zero_point = nn.Parameter(torch.empty(0))
        self._abs_sum: Tensor | None = None
        self._count = 0
        self._samples: list[Tensor] = []
        self._kept = 0

    # --- parameters that stand in for the base class's buffers ------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        params = self.__dict__.get("_parameters")
        if (
            name in _PARAMS
            and params is not None
            and isinstance(params.get(name), nn.Parameter)
            and isinstance(value, Tensor)
            and not isinstance(value, nn.Parameter)
        ):
            params[name].data = value.detach().to(params[name].device, torch.float32)
            return
        super().__setattr__(name, value)

    # --- forward ----------------------------------------------------------------------------
    def grad_factor(self, x: Tensor) -> float:
        """LSQ's ``1 / sqrt(N · Q_P)`` with ``N`` the elements of ``x`` sharing one scale."""
        return P.lsq_grad_factor(x.numel() // max(1, self.scale.numel()), self.qmax)

    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The learnable step (gradient scaled by :meth:`grad_factor`) and zero point (rounded,
        straight-through) broadcast against ``x``. Without gradients (inference, export) the
        scaling, which only changes gradients, is skipped: the forward then does not read the
        batch size, so ``torch.export`` keeps the batch axis dynamic."""
        if not torch.is_grad_enabled():
            return self.expanded(self.scale, x), self.expanded(self._zero_point(None), x)
        g = self.grad_factor(x)
        s = self.expanded(P.grad_scale(self.scale, g), x)
        z = self._zero_point(g)
        return s, self.expanded(z, x)

    def _codes(self, x: Tensor, s: Tensor, z: Tensor, training_step: bool = False) -> Tensor:
        # as primitives.fake_quant_ste: round_ste(x / s + z), differentiable in x, s and z
        return torch.clamp(P.round_ste(x / s + z), self.qmin, self.qmax)

    def _zero_point(self, g: float | None) -> Tensor:
        """The zero point, its gradient scaled by ``g`` (None: no gradient scaling)."""
        if not self.learn_zero_point:
            return self.zero_point
        z = self.zero_point if g is None else P.grad_scale(self.zero_point, g)
        # round and clamp in the forward pass only (as torch's learnable fake-quant ops)
        return z + (torch.clamp(torch.round(z), self.qmin, self.qmax) - z).detach()

    # --- calibration (initialisation) -------------------------------------------------------
    def _collect_method(self, method: str) -> str:
        if method in ("mse", "lsq"):
            return "max"
        return super()._collect_method(method)

    def start_calibration(self, method: str = "max", num_bins: int = 2048) -> None:
        super().start_calibration(method, num_bins)
        self._abs_sum, self._count, self._samples, self._kept = None, 0, [], 0

    def observe(self, x: Tensor) -> None:
        super().observe(x)
        rows = _rows(x.detach().float(), self.granularity)
        s = rows.abs().sum(dim=1)
        self._abs_sum = s if self._abs_sum is None else self._abs_sum + s
        self._count += rows.shape[1]
        if self._kept < MAX_SAMPLES_PER_ROW:
            step = max(1, rows.shape[1] // (MAX_SAMPLES_PER_ROW // 8))
            keep = rows[:, ::step][:, : MAX_SAMPLES_PER_ROW - self._kept]
            self._samples.append(keep.cpu())
            self._kept += keep.shape[1]

    def finish_calibration(self, method: str = "max", **kw: Any) -> None:
        """Initialises the step (and zero point): ``"mse"``, ``"lsq"`` or a base calibrator."""
        if method not in ("mse", "lsq") or not self.has_statistics:
            super().finish_calibration(method, **kw)
            self._clear_stats()
            return
        self.calibrating = False
        ref = torch.empty(self._ref_shape, device="meta")  # type: ignore[arg-type]
        if method == "lsq":
            abs_sum = self._abs_sum
            count = torch.tensor(float(self._count), device=abs_sum.device)
            if kw.get("reduce", True) and dist.is_available() and dist.is_initialized():
                dist.all_reduce(abs_sum)
                dist.all_reduce(count)
            mean_abs = abs_sum / count
            if self.symmetric:
                scale = torch.clamp(2 * mean_abs / self.qmax**0.5, min=1e-8)
                zp = torch.zeros_like(scale)
            else:
                rows = torch.cat(self._samples, dim=1)
                scale, zp = P.qparams_from_minmax(rows.amin(1), rows.amax(1), self.bits)
        else:
            rows = torch.cat(self._samples, dim=1)
            scale, zp = P.mse_search_rows(rows, self.qmin, self.qmax, self.symmetric)
        dev = self.scale.device
        self.set_qparams(
            _unrows(scale, ref, self.granularity).to(dev),
            _unrows(zp, ref, self.granularity).to(dev),
        )
        self._calibrator = None
        self._min = self._max = None
        self._clear_stats()

    def _clear_stats(self) -> None:
        self._abs_sum, self._count, self._samples, self._kept = None, 0, [], 0

    def set_qparams(self, scale: Tensor, zero_point: Tensor, granularity: Any = None) -> None:
        if gran_kind(self.granularity) == "head" and self._ref_shape is not None:
            self.channels = int(self._ref_shape[self.granularity.axis])
        super().set_qparams(scale, zero_point, granularity)

    # --- state ------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        state["method"] = self.method
        state["learn_zero_point"] = self.learn_zero_point
        return state

    def extra_repr(self) -> str:
        return f"{self.method}, " + super().extra_repr()


@QUANTIZERS.register("lsq+")
class LSQPlusQuantizer(LSQQuantizer):
    """LSQ+: asymmetric LSQ with a learnable zero point (offset) on an unsigned grid.

    Meant for activations that are not centred on zero (post-GELU, post-softmax).
    """

    method = "lsq+"

    def __init__(self, bits: int = 8, **kw: Any) -> None:
        kw["symmetric"] = False
        kw.setdefault("learn_zero_point", True)
        super().__init__(bits, **kw)
