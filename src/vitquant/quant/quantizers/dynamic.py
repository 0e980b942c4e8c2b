"""Per-token dynamic activation quantizer: one scale per token, computed from each input.

The activation format of LLM.int8() / ZeroQuant (Yao et al., 2022, arXiv 2206.01861) and of
SmoothQuant's O3 setting (Xiao et al., 2023, arXiv 2211.10438), and torchao's
``int8_dynamic_activation_int8_weight``: each token (row along the last axis) gets its own
grid, ``scale = clip * max|row| / qmax`` (symmetric) or the unsigned grid over
``clip * [min(row, 0), max(row, 0)]`` (asymmetric), computed at run time by
:func:`~vitquant.quant.primitives.token_qparams`. A token whose values are far larger than the
rest's (ViTs' massive-activation tokens) thus gets a grid of its own instead of stretching
everyone's. The row scale factors out of a Linear's product, so the GEMM stays an integer GEMM
(``y[m, n] = s_m * w_n * sum_k x_q[m, k] w_q[n, k]``, :class:`~vitquant.runtime.dynamic.
DynamicInt8Linear`); it does not factor out of ``attn·v`` (whose contracted axis is the
tokens), so presets put it on Linear inputs only.

The only calibrated state is the clip ratio ``clip`` in ``(0, 1]``, held in the ``scale`` buffer
(shape ``[]``): ``1`` after ``"max"`` calibration, otherwise the ratio of least quantization MSE
over the observed rows (a per-token grid has no histogram to take a percentile of).
:class:`~vitquant.quant.QParams` reports ``kind="dynamic"`` with ``scale`` = the clip ratio, so
code that expects fixed scales (``kind == "uniform"``) never mistakes it for one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vitquant.errors import ConfigError
from vitquant.quant import primitives as P
from vitquant.quant.granularity import PerTensor
from vitquant.quant.quantizers.base import QUANTIZERS, gran_kind
from vitquant.quant.quantizers.uniform import UniformQuantizer

__all__ = ["DynamicQuantizer", "CLIP_RATIOS"]

#: clip ratios tried by non-``max`` calibration (1 first: ties keep the full range)
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5

_MAX_ROWS = 8192  # observed rows kept for the clip search
_ROWS_PER_CALL = 512


@QUANTIZERS.register("dynamic")
class DynamicQuantizer(UniformQuantizer):
    """Fake quantization with per-token scales computed from the input (straight-through
    gradient inside each row's range, as :class:`UniformQuantizer`).

    Args:
        bits, signed, symmetric, narrow: as :class:`~vitquant.quant.Quantizer` (asymmetric grids
            are unsigned with a zero point per token).
        granularity: must be per tensor (the one clip ratio); the scales are per token.
        role: ``"activation"`` (weights have fixed ranges: use a per-channel quantizer).

    Example:
        >>> q = DynamicQuantizer(8)
        >>> q.calibrate_tensor(x, "max")          # clip = 1: no calibration data needed really
        >>> x_hat = q(x)                          # one grid per row of x
    """

    kind = "dynamic"

    def __init__(
        self,
        bits: int = 8,
        *,
        signed: bool = True,
        symmetric: bool = True,
        narrow: bool = False,
        granularity: Any = None,
        role: str = "activation",
    ) -> None:
        if role == "weight":
            raise ConfigError(
                "dynamic (per-token) scales are for activations; weights take a per-channel "
                "uniform quantizer"
            )
        if granularity is not None and gran_kind(granularity) != "tensor":
            raise ConfigError(
                "a dynamic quantizer computes one scale per token; its granularity must be "
                f"'tensor' (the clip ratio), not {gran_kind(granularity)!r}"
            )
        super().__init__(
            bits, signed=signed, symmetric=symmetric, narrow=narrow, granularity=PerTensor(),
            role=role,
        )  # fmt: skip
        self._rows: list[Tensor] = []
        self._kept = 0

    @property
    def clip(self) -> float:
        """The calibrated clip ratio (ConfigError before calibration)."""
        if not self.is_calibrated:
            raise ConfigError(f"quantizer {self.name or '<unnamed>'} was never calibrated")
        return float(self.scale.reshape(()))

    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, z = P.token_qparams(
            x, self.bits, self.signed, self.symmetric, self.narrow, self.scale.detach()
        )
        return s.to(x.device), z.to(x.device)

    # --- calibration: the clip ratio ---------------------------------------------------------
    def start_calibration(self, method: str = "max", num_bins: int = 2048) -> None:
        self._rows, self._kept = [], 0
        self._ref_shape = None
        self.calibrating = True

    def observe(self, x: Tensor) -> None:
        x = x.detach()
        self._check_finite(x)
        self._ref_shape = x.shape
        rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        if self._kept >= _MAX_ROWS:
            return
        step = max(1, rows.shape[0] // _ROWS_PER_CALL)  # evenly spaced: deterministic
        keep = rows[::step][: _MAX_ROWS - self._kept].float().cpu()
        self._rows.append(keep)
        self._kept += keep.shape[0]

    def finish_calibration(self, method: str = "max", **kw: Any) -> None:
        """Sets the clip ratio: 1 for ``"max"``, else the one of least MSE on the observed rows."""
        self.calibrating = False
        if not self.has_statistics:
            return
        clip = 1.0
        if method != "max" and self._rows:
            widths = {r.shape[-1] for r in self._rows}
            if len(widths) == 1:
                clip = self._search(torch.cat(self._rows))
        self._rows, self._kept = [], 0
        self.set_clip(clip)

    def _search(self, rows: Tensor) -> float:
        best, best_err = 1.0, float("inf")
        for r in CLIP_RATIOS:
            s, z = P.token_qparams(rows, self.bits, self.signed, self.symmetric, self.narrow, r)
            q = torch.clamp(torch.round(rows / s) + z, self.qmin, self.qmax)
            err = float(((q - z) * s - rows).pow(2).mean())
            if err < best_err:
                best, best_err = r, err
        return best

    def set_clip(self, clip: float) -> None:
        """Sets the clip ratio directly (``0 < clip <= 1``)."""
        c = float(clip)
        if not 0.0 < c <= 1.0:
            raise ConfigError(f"clip={clip} must be in (0, 1]")
        dev = self.scale.device
        self.scale = torch.tensor(c, device=dev)
        self.amax = torch.tensor(c, device=dev)
        self.zero_point = torch.zeros((), device=dev)
        self.amin = torch.empty(0, device=dev)

    def set_range(self, amax: Tensor, amin: Tensor | None = None) -> None:
        raise ConfigError(
            f"quantizer {self.name or '<unnamed>'} has per-token dynamic scales, no fixed range "
            "(set_clip() sets its clip ratio)"
        )

    def set_qparams(self, scale: Tensor, zero_point: Tensor, granularity: Any = None) -> None:
        self.set_range(scale)

    def reset(self) -> None:
        super().reset()
        self._rows, self._kept = [], 0

    def range_summary(self) -> str:
        if not self.is_calibrated:
            return "-"
        return f"per token, clip={self.clip:.3g}"

    def extra_repr(self) -> str:
        return super().extra_repr().replace("tensor", "per-token dynamic", 1)
