"""The quantizer interface shared by every method: :class:`QParams`, :class:`Quantizer` and the
``QUANTIZERS`` registry.

A quantizer is an ``nn.Module`` placed on one tensor (a weight, or an activation at one point of
the network). Its life cycle follows NVIDIA's pytorch-quantization ``TensorQuantizer`` (as used by
the FasterTransformer ViT example): *calibrating* (observe statistics, pass ``x`` through
unchanged), then *calibrated* (fake quantization with straight-through gradients). Range state is
held in buffers (``amax``, ``amin``, ``scale``, ``zero_point``) plus a small ``_extra_state``
describing the format, so a state dict alone rebuilds a calibrated quantizer. The maths lives in
:mod:`vitquant.quant.primitives`. :meth:`Quantizer.int_codes` is the one definition of the integer
codes, shared by the fake-quant forward, the packed export and the int8 runtime.

Granularities: per tensor, per channel along any axis, per attention head (contiguous channel
blocks along an axis) and per group (``group_size`` consecutive elements along an axis, one scale
per group and per index of the other dimensions; meant for weights).

:class:`QParams` and the granularity helpers (``gran_kind``, ``gran_to_dict``,
``gran_from_dict``, ``gran_str`` and the row reshapes of the statistics) live in
:mod:`vitquant.quant.quantizers.shapes` and are re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.quant import primitives as P
from vitquant.quant.calibrators import NonFiniteError, make_calibrator
from vitquant.quant.granularity import PerTensor
from vitquant.quant.quantizers.shapes import (
    QParams,
    gran_from_dict,
    gran_kind,
    gran_str,
    gran_to_dict,
)
from vitquant.quant.quantizers.shapes import expand as _expand
from vitquant.quant.quantizers.shapes import rows as _rows
from vitquant.quant.quantizers.shapes import unrows as _unrows
from vitquant.registry import Registry

__all__ = [
    "QParams",
    "Quantizer",
    "QUANTIZERS",
    "RANGE_TENSORS",
    "quantizer_name",
    "gran_kind",
    "gran_to_dict",
    "gran_from_dict",
    "gran_str",
]

QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer")

#: the range state of every quantizer, buffers (or learned parameters) under these names
RANGE_TENSORS = ("amax", "amin", "scale", "zero_point")


def quantizer_name(q: Quantizer | type[Quantizer]) -> str:
    """The name ``q``'s class is registered under in ``QUANTIZERS`` (``"lsq"``, ``"log2"``, ...).

    Unlike :attr:`Quantizer.kind` (the integer grid, ``"uniform"`` for every LSQ variant), this
    names the method. A class that is not registered itself reports its nearest registered base
    class (then its ``kind``); a class registered under several names reports the first in
    sorted order.
    """
    cls = q if isinstance(q, type) else type(q)
    names: dict[type, str] = {}
    for name in QUANTIZERS.names():
        names.setdefault(QUANTIZERS.get(name), name)
    for base in cls.__mro__:
        if base in names:
            return names[base]
    return str(cls.kind)


class Quantizer(nn.Module):
    """Base class of all quantizers: fake quantization of one tensor with an STE.

    Args:
        bits: bit width (2..16).
        signed: signed integer grid (symmetric quantizers of signed data); unsigned grids suit
            non-negative data (softmax outputs). Asymmetric quantizers always use an unsigned
            grid with a zero point.
        symmetric: symmetric range ``[-amax, amax]`` (zero point 0); else ``[min, max]``.
        narrow: drop the most negative level (TensorRT narrow range, ``[-127, 127]``).
        granularity: ``PerTensor()`` (default), ``PerChannel(axis)``, ``PerHead(num_heads, axis)``
            or ``PerGroup(group_size, axis)``.
        role: ``"weight"`` or ``"activation"`` (reporting and calibration policy only).

    Attributes:
        enabled: when False, ``forward`` is the identity (except while calibrating).
        calibrating: when True, ``forward`` observes ``x`` and returns it unchanged.
        name: the quantizer's module path, set by ``prepare`` (used in error messages).
        point: the point kind it quantizes (see ``vitquant.quant.presets.POINT_KINDS``).
    """

    kind: str = "uniform"

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
        super().__init__()
        self.bits = P.check_bits(bits)
        self.signed = bool(signed) if symmetric else False
        self.symmetric = bool(symmetric)
        self.narrow = bool(narrow)
        self.granularity = granularity if granularity is not None else PerTensor()
        gran_kind(self.granularity)
        self.role = role
        self.enabled = True
        self.calibrating = False
        self.name = ""
        self.point = ""  # the point kind (``linear_input``, ``weight``, ...), set by ``prepare``
        for name in RANGE_TENSORS:
            self.register_buffer(name, torch.empty(0))
        self._calibrator: Any = None
        self._min: Tensor | None = None
        self._max: Tensor | None = None
        self._ref_shape: torch.Size | None = None
        self.channels = 0  # channels along the head axis (per-head granularity only)

    # --- properties -------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return P.qrange(self.bits, self.signed, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return P.qrange(self.bits, self.signed, self.narrow)[1]

    @property
    def is_calibrated(self) -> bool:
        """True once a range (scale) is set, by calibration or by loading a state dict."""
        return self.scale.numel() > 0

    @property
    def active(self) -> bool:
        """True when ``forward`` changes its input (enabled, calibrated, not calibrating)."""
        return self.enabled and not self.calibrating and self.is_calibrated

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantizes ``x`` (STE) when enabled and calibrated; observes it when calibrating."""
        if self.calibrating:
            self.observe(x)
            return x
        if not self.enabled or not self.is_calibrated:
            return x
        return self.fake_quant(x)

    def fake_quant(self, x: Tensor) -> Tensor:
        """Quantize-dequantize with the current range: the dequantized :meth:`int_codes`.

        Subclasses define the grid through :meth:`_grid`, :meth:`_codes` and :meth:`_dequant`
        (and override this method only to change the gradient, never the codes).
        """
        s, z = self._grid(x)
        return self._dequant(self._codes(x, s, z, training_step=True), s, z, x)

    # --- integer codes: the one definition shared by forward, export and the int8 runtime --
    def int_codes(self, x: Tensor) -> Tensor:
        """The integer codes ``x_q`` in ``[qmin, qmax]`` that the fake-quant forward uses.

        The single source of a quantizer's codes: :meth:`fake_quant` dequantizes exactly these
        (``forward(x) = dequantize(int_codes(x))``), and the packed export and the int8 runtime
        store them. Quantizers that override the rounding of some values (VVTQ's frozen weights)
        substitute them here. The result is a float tensor of integers shaped like ``x``,
        differentiable where the forward pass is (straight-through estimator); callers that store
        codes ``detach()`` and cast it. Calling it never changes the quantizer's state (no
        oscillation tracking).

        Raises:
            ConfigError: the quantizer was never calibrated.
        """
        if not self.is_calibrated:
            raise ConfigError(f"quantizer {self.name or '<unnamed>'} was never calibrated")
        s, z = self._grid(x)
        return self._codes(x, s, z)

    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` broadcast against ``x``, as the forward pass uses them."""
        return self.expanded(self.scale.detach(), x), self.expanded(self.zero_point.detach(), x)

    def _codes(self, x: Tensor, s: Tensor, z: Tensor, training_step: bool = False) -> Tensor:
        """The codes of ``x`` on grid ``(s, z)``; ``training_step``: called by the forward pass
        (a subclass may update training statistics then, from the codes before any override)."""
        raise NotImplementedError(f"{type(self).__name__} defines no integer codes")

    def _dequant(self, codes: Tensor, s: Tensor, z: Tensor, x: Tensor) -> Tensor:
        """Float values of ``codes`` (uniform grids: ``(codes - z) * s``) in ``x``'s dtype."""
        return ((codes - z) * s).to(x.dtype)

    # --- calibration ------------------------------------------------------------------------
    def start_calibration(self, method: str = "max", num_bins: int = 2048) -> None:
        """Resets statistics and switches to observing (``forward`` returns ``x`` unchanged)."""
        per_tensor = gran_kind(self.granularity) == "tensor"
        self._calibrator = make_calibrator(
            self._collect_method(method), axis=None if per_tensor else 0, num_bins=num_bins
        )
        self._min = self._max = None
        self._ref_shape = None
        self.calibrating = True

    def _collect_method(self, method: str) -> str:
        """The statistics to collect for ``method`` (subclasses may force ``"max"``)."""
        if gran_kind(self.granularity) != "tensor":
            return "max"
        return method

    def observe(self, x: Tensor) -> None:
        """Adds ``x`` to the statistics; NaN/inf raise a :class:`DataError` naming the module."""
        if self._calibrator is None:
            self.start_calibration()
        x = x.detach()
        self._check_finite(x)
        rows = _rows(x.float(), self.granularity)
        self._ref_shape = x.shape
        if gran_kind(self.granularity) == "head":
            self.channels = int(x.shape[self.granularity.axis])
        if gran_kind(self.granularity) == "tensor":
            self._calibrator.collect(rows.reshape(-1))
        else:
            self._calibrator.collect(rows)
        if not self.symmetric:
            mn, mx = rows.amin(1), rows.amax(1)
            self._min = mn if self._min is None else torch.minimum(self._min, mn)
            self._max = mx if self._max is None else torch.maximum(self._max, mx)

    def _check_finite(self, x: Tensor) -> None:
        """Raises :class:`NonFiniteError` naming the quantizer when ``x`` holds NaN or inf."""
        if not torch.isfinite(x).all():
            raise NonFiniteError(
                f"NaN or inf in the input of quantizer {self.name or '<unnamed>'} during "
                "calibration (check the data and the float model)"
            )

    @property
    def has_statistics(self) -> bool:
        """True when calibration has observed at least one tensor."""
        return self._ref_shape is not None

    def finish_calibration(self, method: str = "max", **kw: Any) -> None:
        """Computes the range from the statistics and stops observing.

        Args:
            method: ``"max" | "percentile" | "mse" | "entropy"`` (see the calibrators module);
                per-channel/head/group statistics use ``"max"``.
            **kw: ``percentile`` (default 99.99), ``reduce`` (all-reduce statistics when
                ``torch.distributed`` is initialised, default True).

        A quantizer that observed nothing stays uncalibrated (``is_calibrated`` is False).
        """
        self.calibrating = False
        if not self.has_statistics:
            self._calibrator = None
            return
        if kw.get("reduce", True) and dist.is_available() and dist.is_initialized():
            self._calibrator.all_reduce()
            if self._min is not None and self._max is not None:
                dist.all_reduce(self._min, op=dist.ReduceOp.MIN)
                dist.all_reduce(self._max, op=dist.ReduceOp.MAX)
        cmethod = self._collect_method(method)
        amax = self._calibrator.compute_amax(
            cmethod,
            percentile=float(kw.get("percentile", 99.99)),
            bits=self.bits,
            unsigned=not self.signed,
        )
        amax = amax.detach().float().reshape(-1)
        ref = torch.empty(self._ref_shape, device="meta")
        amin = None
        if not self.symmetric:
            assert self._min is not None and self._max is not None
            clip = amax.to(self._max)
            amax = torch.minimum(self._max, clip)
            amin = torch.maximum(self._min, -clip)
        self.set_range(
            _unrows(amax, ref, self.granularity),
            None if amin is None else _unrows(amin, ref, self.granularity),
        )
        self._calibrator = None
        self._min = self._max = None

    def calibrate_tensor(self, x: Tensor, method: str = "max", **kw: Any) -> None:
        """Calibrates from one tensor (weights): observe ``x`` once, then finish."""
        self.start_calibration(method)
        self.observe(x)
        self.finish_calibration(method, reduce=False, **kw)

    def set_range(self, amax: Tensor, amin: Tensor | None = None) -> None:
        """Sets the range directly and derives ``scale`` / ``zero_point``.

        Symmetric quantizers take ``amax`` (``|x| <= amax``); asymmetric ones ``[amin, amax]``.
        Shapes follow :class:`QParams`.
        """
        amax = amax.detach().float()
        dev = self.scale.device
        if self.symmetric:
            scale = P.scale_from_amax(amax, self.bits, self.signed, self.narrow)
            zp = torch.zeros_like(scale)
            self.amin = torch.empty(0, device=dev)
        else:
            if amin is None:
                raise ConfigError("an asymmetric quantizer needs amin and amax")
            amin = amin.detach().float().to(amax.device)
            scale, zp = P.qparams_from_minmax(amin, amax, self.bits)
            self.amin = amin.to(dev)
        self.amax = amax.to(dev)
        self.scale = scale.to(dev)
        self.zero_point = zp.to(dev)

    def set_qparams(self, scale: Tensor, zero_point: Tensor, granularity: Any = None) -> None:
        """Sets ``scale`` and ``zero_point`` directly (and optionally a new granularity).

        ``amax``/``amin`` are re-derived from the grid for reporting.
        """
        if granularity is not None:
            gran_kind(granularity)
            self.granularity = granularity
        dev = self.scale.device
        scale = scale.detach().float().to(dev)
        zero_point = zero_point.detach().float().to(dev)
        self.scale, self.zero_point = scale, zero_point
        self.amax = (self.qmax - zero_point) * scale
        self.amin = (
            torch.empty(0, device=dev) if self.symmetric else (self.qmin - zero_point) * scale
        )

    def reset(self) -> None:
        """Forgets the range and any statistics (back to uncalibrated)."""
        dev = self.scale.device
        for name in RANGE_TENSORS:
            setattr(self, name, torch.empty(0, device=dev))
        self._calibrator = None
        self._min = self._max = None
        self._ref_shape = None
        self.calibrating = False

    # --- export -----------------------------------------------------------------------------
    def qparams(self) -> QParams:
        """Scale, zero point and integer grid of the calibrated quantizer."""
        if not self.is_calibrated:
            raise ConfigError(f"quantizer {self.name or '<unnamed>'} was never calibrated")
        g = self.granularity
        kind = gran_kind(g)
        axis = None if kind == "tensor" else int(g.axis)
        group = None
        if kind == "group":
            group = int(g.group_size)
        elif kind == "head" and self.channels:
            group = self.channels // int(g.num_heads)
        return QParams(
            scale=self.scale.detach().clone(),
            zero_point=self.zero_point.detach().clone(),
            bits=self.bits,
            signed=self.signed,
            qmin=self.qmin,
            qmax=self.qmax,
            axis=axis,
            group_size=group,
            kind=self.kind,
        )

    def expanded(self, t: Tensor, x: Tensor) -> Tensor:
        """Broadcasts a stored per-channel/head/group tensor (scale, zero point) against ``x``."""
        return _expand(t, x, self.granularity)

    # --- training hooks ---------------------------------------------------------------------
    def penalty(self) -> Tensor | None:
        """A loss term added during training (e.g. size penalties); None by default."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups for the quantizer's own learnable parameters (no weight decay)."""
        params = [p for p in self.parameters(recurse=False) if p.requires_grad]
        return [{"params": params, "weight_decay": 0.0}] if params else []

    # --- state ------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        """Plain-data format description saved with the buffers (``enabled`` only when off: a
        layer kept in float by a fallback stays float when its file is loaded)."""
        state: dict[str, Any] = {
            "kind": self.kind,
            "bits": self.bits,
            "signed": self.signed,
            "symmetric": self.symmetric,
            "narrow": self.narrow,
            "granularity": gran_to_dict(self.granularity),
            "channels": self.channels,
        }
        if not self.enabled:
            state["enabled"] = False
        return state

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            return
        if state.get("kind", self.kind) != self.kind:
            raise ConfigError(
                f"quantizer {self.name or '<unnamed>'} is {self.kind!r} but the state holds "
                f"{state.get('kind')!r}"
            )
        self.bits = P.check_bits(state.get("bits", self.bits))
        self.signed = bool(state.get("signed", self.signed))
        self.symmetric = bool(state.get("symmetric", self.symmetric))
        self.narrow = bool(state.get("narrow", self.narrow))
        if "granularity" in state:
            self.granularity = gran_from_dict(state["granularity"])
        self.channels = int(state.get("channels", self.channels))
        if "enabled" in state:
            self.enabled = bool(state["enabled"])

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Range tensors take the shape of the saved ones (per-channel sizes are data dependent);
        # subclasses that learn some of them (LSQ) hold those as float32 parameters.
        for name in RANGE_TENSORS:
            saved = state_dict.get(prefix + name)
            if saved is None:
                continue
            p = self._parameters.get(name)
            buf = self._buffers.get(name)
            if p is not None and p.shape != saved.shape:
                p.data = torch.empty_like(saved, device=p.device, dtype=torch.float32)
            elif buf is not None and buf.shape != saved.shape:
                self._buffers[name] = torch.empty_like(saved, device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        sign = "signed" if self.signed else "unsigned"
        state = "calibrated" if self.is_calibrated else "uncalibrated"
        if not self.enabled:
            state += ", disabled"
        return (
            f"{self.kind}, bits={self.bits}, {sign}, {sym}"
            f"{', narrow' if self.narrow else ''}, {gran_str(self.granularity)}, {state}"
        )

    def range_summary(self) -> str:
        """``amax=1.23`` or ``amax=[0.1..2.3]`` (per channel) or ``[min, max]`` (asymmetric)."""
        if not self.is_calibrated:
            return "-"

        def fmt(t: Tensor) -> str:
            if t.numel() == 1:
                return f"{t.item():.4g}"
            return f"[{t.min().item():.4g}..{t.max().item():.4g}]x{t.numel()}"

        if self.symmetric:
            return f"amax={fmt(self.amax)}"
        return f"min={fmt(self.amin)} max={fmt(self.amax)} zp={fmt(self.zero_point)}"
