"""DiffQ: differentiable quantization with pseudo quantization noise, :class:`DiffQuantizer`.

Follows Défossez, Adi and Synnaeve (2021), "Differentiable Model Compression via Pseudo
Quantization Noise", arXiv 2104.09987, and the behaviour of its reference package ``diffq``:

* every group of ``group_size`` weights gets a learnt bit width ``b = min + sigmoid(l)·(max-min)``
  (``param="bits"``) or a learnt noise level in log space (``param="noise"``);
* in ``model.train()`` each weight becomes ``w + Δ/2·N(0, 1)`` (or ``+ Δ·U[-½, ½]``) with
  ``Δ = (max(w) - min(w)) / (2^b - 1)`` over the whole tensor: differentiable in ``w`` and ``b``;
* in ``model.eval()`` and in the saved state the bits are rounded and the weights truly quantized
  on a min-max grid of the tensor;
* :meth:`DiffQuantizer.model_size` is a differentiable size in MB: train with
  ``loss + penalty * quantizer.model_size()``.

Fixed relative to the reference: groups that reach 15 (or 16) bits are packed (the reference
drops them), ``group_size=0`` states restore, a float ``min_bits`` packs (the bit map is stored
relative to the smallest rounded width), constant tensors quantize to themselves instead of NaN,
and the state is plain data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import CheckpointError, ConfigError
from vitquant.methods.diffq.base import BaseQuantizer, QuantizedParam
from vitquant.methods.diffq.state import read_bytes
from vitquant.quant.bitpack import pack, packed_nbytes, unpack
from vitquant.quant.primitives import minmax_dequantize, minmax_levels

__all__ = ["DiffQuantizer"]

_TOP_BITS = 16  # rounded bit widths are clamped to 1..16 (the reference clamps to 15)


def _levels_dtype(top_bits: int) -> torch.dtype:
    return torch.uint8 if top_bits <= 8 else torch.int16 if top_bits <= 15 else torch.int32


class DiffQuantizer(BaseQuantizer):
    """Learns the number of bits of every group of weights by pseudo quantization noise.

    Args:
        model: model to quantize (any ``nn.Module``); a logit parameter ``<name>_diffq`` is added
            next to every quantized parameter, so create the main optimizer first and then call
            :meth:`setup_optimizer`.
        min_size: parameters of at most this many MB stay in float.
        float16: store the float parameters in float16.
        group_size: weights sharing one bit width; must divide every quantized parameter
            (``0``: one width per tensor).
        min_bits: lowest bit width.
        max_bits: highest bit width (at most 16).
        param: ``"bits"`` (sigmoid between the widths) or ``"noise"`` (sigmoid in log-noise).
        noise: ``"gaussian"`` (``Δ/2·N(0,1)``, the default) or ``"uniform"`` (``Δ·U[-½,½]``).
        init_bits: initial bit width, strictly between ``min_bits`` and ``max_bits``.
        extra_bits: added to the learnt width before rounding for true quantization.
        suffix: attribute suffix of the logit parameters.
        exclude: ``fnmatch`` patterns of parameters to keep in float.
        detect_bound: quantize a shared parameter once, with one set of bits.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> quantizer = DiffQuantizer(model, min_size=0, group_size=8)
        >>> quantizer.setup_optimizer(opt, lr=1e-3)
        >>> loss = model(torch.randn(2, 64)).square().mean() + 1e-2 * quantizer.model_size()
    """

    method = "diffq"
    _optimizer_defaults = {"lr": 1e-3, "weight_decay": 0.0}

    def __init__(
        self,
        model: nn.Module,
        min_size: float = 0.01,
        float16: bool = False,
        group_size: int = 1,
        min_bits: float = 2,
        max_bits: float = 15,
        param: str = "bits",
        noise: str = "gaussian",
        init_bits: float = 8,
        extra_bits: float = 0,
        suffix: str = "_diffq",
        exclude: Sequence[str] = (),
        detect_bound: bool = True,
    ) -> None:
        if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 0:
            raise ConfigError(f"group_size={group_size!r} must be an integer >= 0")
        if not 1 <= min_bits < max_bits <= _TOP_BITS:
            raise ConfigError(
                f"min_bits={min_bits} and max_bits={max_bits} must satisfy "
                f"1 <= min_bits < max_bits <= {_TOP_BITS}"
            )
        if not min_bits < init_bits < max_bits:
            raise ConfigError(
                f"init_bits={init_bits} must be strictly between min_bits={min_bits} "
                f"and max_bits={max_bits}"
            )
        if param not in ("bits", "noise"):
            raise ConfigError(f"param={param!r} must be 'bits' or 'noise'")
        if noise not in ("gaussian", "uniform"):
            raise ConfigError(f"noise={noise!r} must be 'gaussian' or 'uniform'")
        self.group_size = int(group_size)
        self.min_bits = min_bits
        self.max_bits = max_bits
        self.param = param
        self.noise = noise
        self.init_bits = init_bits
        self.extra_bits = extra_bits
        self.suffix = suffix
        self._min_noise = 1 / (2**max_bits - 1)
        self._max_noise = 1 / (2**min_bits - 1)
        self._init_kwargs = {
            "group_size": self.group_size,
            "min_bits": min_bits,
            "max_bits": max_bits,
            "param": param,
            "noise": noise,
            "init_bits": init_bits,
            "extra_bits": extra_bits,
            "suffix": suffix,
        }
        self._check_fresh(model)
        super().__init__(model, min_size, float16, exclude, detect_bound)

    # ------------------------------------------------------------------ bits
    def _get_bits(self, logit: Tensor) -> Tensor:
        t = torch.sigmoid(logit)
        if self.param == "noise":
            log_noise = t * math.log(self._min_noise) + (1 - t) * math.log(self._max_noise)
            return torch.log2(1 + 1 / torch.exp(log_noise))
        return self.max_bits * t + (1 - t) * self.min_bits

    def _rounded_bits(self, qp: QuantizedParam) -> Tensor:
        assert qp.extra is not None
        bits = self.extra_bits + self._get_bits(qp.extra.detach())
        return bits.round().clamp(1, _TOP_BITS).to(torch.uint8)

    def _group(self, qp: QuantizedParam) -> int:
        return self.group_size or qp.param.numel()

    def _make_extra(self, qp: QuantizedParam) -> nn.Parameter:
        numel = qp.param.numel()
        if self.group_size and numel % self.group_size:
            raise ConfigError(
                f"group_size={self.group_size} does not divide {qp.full_name} "
                f"({numel} weights): exclude it or pick another group_size"
            )
        if self.param == "noise":
            log_init = math.log(1 / (2**self.init_bits - 1))
            lo, hi = math.log(self._max_noise), math.log(self._min_noise)
            t = (log_init - lo) / (hi - lo)
        else:
            t = (self.init_bits - self.min_bits) / (self.max_bits - self.min_bits)
        logit = torch.logit(torch.tensor(float(t)))
        groups = numel // self.group_size if self.group_size else 1
        return nn.Parameter(torch.full((groups,), float(logit), device=qp.param.device))

    def get_bits(self) -> dict[str, Tensor]:
        """The rounded bit width of every group, by parameter name (what eval and export use)."""
        return {qp.full_name: self._rounded_bits(qp) for qp in self._first}

    def bits_per_weight(self) -> float:
        """Average rounded bit width over all quantized weights."""
        total = count = 0
        for qp in self._first:
            total += int(self._rounded_bits(qp).long().sum()) * self._group(qp)
            count += qp.param.numel()
        return total / count if count else 0.0

    def check_unused(self) -> None:
        """Zeroes the logit gradients of parameters that got no gradient (unused layers)."""
        for qp in self._first:
            grad = qp.param.grad
            if (grad is None or not grad.any()) and qp.extra is not None:
                if qp.extra.grad is not None:
                    qp.extra.grad.zero_()

    # ------------------------------------------------------------------ hooks
    def _train_weight(self, qp: QuantizedParam) -> Tensor:
        if not self._optimizer_setup:
            raise ConfigError(
                "call quantizer.setup_optimizer(optimizer) (or quantizer.no_optimizer()) "
                "before training with DiffQ"
            )
        assert qp.extra is not None
        bits = self._get_bits(qp.extra)[:, None]
        p = qp.param.view(-1, self._group(qp))
        span = p.max() - p.min()
        unit = 1 / (2**bits - 1)
        if self.noise == "uniform":
            source = torch.rand_like(p) - 0.5
        else:
            source = torch.randn_like(p) / 2
        return (p + span * unit * source).view_as(qp.param)

    def _quantize_param(self, qp: QuantizedParam, weight: Tensor) -> dict[str, Any]:
        bits = self._rounded_bits(qp)
        p = weight.reshape(-1, self._group(qp))
        mn, mx = float(p.min()), float(p.max())
        levels = minmax_levels(p, mn, mx, bits[:, None])
        dtype = _levels_dtype(int(bits.max()))
        return {"range": [mn, mx], "bits": bits, "levels": levels.to(dtype)}

    def _unquantize_param(self, qp: QuantizedParam, q: dict[str, Any]) -> Tensor:
        mn, mx = q["range"]
        bits = q["bits"].to(q["levels"].device)
        return minmax_dequantize(q["levels"], mn, mx, bits.reshape(-1, 1))

    def _pack_param(self, qp: QuantizedParam, q: dict[str, Any]) -> tuple[dict, list[Tensor]]:
        bits = q["bits"].long()
        levels = q["levels"]
        base = int(bits.min())
        width = (int(bits.max()) - base).bit_length()
        chunks = [pack(bits - base, width)] if width else []
        for k in torch.unique(bits).tolist():
            chunks.append(pack(levels[bits == k].reshape(-1).to(torch.int32), k))
        entry = {
            "range": q["range"],
            "group_size": levels.shape[1],
            "bits_base": base,
            "bits_width": width,
        }
        return entry, chunks

    def _unpack_param(self, qp: QuantizedParam, entry: dict, data: Tensor | None) -> dict:
        numel, group = qp.param.numel(), int(entry["group_size"])
        if group <= 0 or numel % group:
            raise CheckpointError(f"corrupt quantized state: bad group size for {qp.full_name}")
        groups, offset = numel // group, int(entry["offset"])
        width, base = int(entry["bits_width"]), int(entry["bits_base"])
        if width:
            nbytes = packed_nbytes(groups, width)
            raw = read_bytes(data, offset, nbytes, qp.full_name)
            bits = unpack(raw, width, groups).long() + base
            offset += nbytes
        else:
            bits = torch.full((groups,), base, dtype=torch.long)
        if int(bits.max()) > _TOP_BITS or int(bits.min()) < 1:
            raise CheckpointError(f"corrupt quantized state: bit widths of {qp.full_name}")
        levels = torch.zeros(groups, group, dtype=torch.int32)
        for k in torch.unique(bits).tolist():
            mask = bits == k
            count = int(mask.sum()) * group
            nbytes = packed_nbytes(count, k)
            raw = read_bytes(data, offset, nbytes, qp.full_name)
            levels[mask] = unpack(raw, k, count).view(-1, group)
            offset += nbytes
        device = qp.param.device
        return {"range": entry["range"], "bits": bits.to(device), "levels": levels.to(device)}

    def _param_size_bits(self, qp: QuantizedParam, exact: bool) -> Tensor:
        assert qp.extra is not None
        bits = self.extra_bits + self._get_bits(qp.extra)
        if exact:
            bits = bits.detach().round().clamp(1, _TOP_BITS)
        top = bits.detach().max().round().double()
        # bits needed to store each group's width relative to min_bits, as the reference counts
        bits_bits = torch.ceil(torch.log2(1 + (top - self.min_bits).clamp(min=0)))
        overhead = 2 * 32 + 8 + bits_bits.to(bits.dtype) * bits.numel()
        return self._group(qp) * bits.sum() + overhead
