"""The fused MLP of an :class:`~vitquant.runtime.fused.Int8Block`: ``fc1 -> GELU -> fc2`` on int8
kernels, with GELU and ``fc2``'s input quantization fused into ``fc1``'s epilogue (fixed grids),
one native row pass (per-token grids on both), or GELU in the epilogue and a quantize pass; the
residual is added in ``fc2``'s epilogue. See :mod:`vitquant.runtime.fused` for the block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitquant.runtime.dynamic import DynamicInt8Linear
from vitquant.runtime.modules import Int8Linear, linear_output

__all__ = ["Int8Mlp"]


class Int8Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` with GELU and fc2's input quantization fused into fc1."""

    def __init__(
        self,
        mlp: nn.Module,
        fc1: Int8Linear | DynamicInt8Linear,
        fc2: Int8Linear | DynamicInt8Linear,
        fc2_gamma: Tensor | None = None,
        *,
        float_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.float_dtype = float_dtype
        self.fc1, self.fc2 = fc1, fc2
        self.act = mlp.act
        self.norm = getattr(mlp, "norm", nn.Identity())
        approx = getattr(self.act, "approximate", None)
        self.fuse_gelu = (
            isinstance(self.act, nn.GELU)
            and approx in ("none", "tanh")
            and fc1.out_q is None
            and isinstance(self.norm, nn.Identity)
        )
        self.gelu_approx = str(approx)
        #: fc1's epilogue writes fc2's input codes (fixed grids only; else GELU in the epilogue
        #: and fc2 quantizes the float hidden activation)
        self.requant = self.fuse_gelu and not fc1.dynamic and not fc2.dynamic
        #: both per token, erf GELU: rows.row_epilogue_gelu_quant
        self.gelu_rows = self.fuse_gelu and fc1.dynamic and fc2.dynamic and approx == "none"
        self.fc2_scale: Tensor | None = None
        self.fc2_bias = fc2.bias
        if fc2_gamma is not None:
            self.fc2_scale = fc2.weight.scale * fc2_gamma
            self.fc2_bias = None if fc2.bias is None else fc2.bias * fc2_gamma

    def forward(
        self, x: Tensor, residual: Tensor | None = None, xq: Tensor | None = None
    ) -> Tensor:
        """MLP of ``x``; ``xq``: its codes if already quantized; ``residual``: added in the
        ``fc2`` epilogue."""
        fc1, fc2 = self.fc1, self.fc2
        if xq is None:
            xq = fc1.quantize_input(x)
        if self.requant:
            hq = fc1.forward_codes(
                xq, bias=fc1.bias, post="gelu", gelu_approximate=self.gelu_approx,
                out=fc2.act, out_dtype=fc2.dtype, out_div=fc2.in_div,
            )  # fmt: skip
        elif self.gelu_rows and (codes := fc1.gelu_codes(xq, fc2)) is not None:
            hq = codes  # fc1's epilogue, GELU and fc2's per-token quantization in one pass
        elif self.fuse_gelu:
            hidden = fc1.forward_codes(
                xq, bias=fc1.bias, post="gelu", gelu_approximate=self.gelu_approx
            )
            hq = fc2.quantize_input(hidden)
        else:
            hidden = fc1.float_from_codes(xq)
            hq = fc2.quantize_input(self.norm(self.act(hidden)))
        return linear_output(fc2, hq, self.fc2_bias, self.fc2_scale, residual, self.float_dtype)
