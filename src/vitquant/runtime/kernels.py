"""Integer GEMM kernels of the int8 runtime, with a pure-torch reference beside each one.

Three backends compute the same thing, ``acc = (x_q - z_x) @ (w_q)ᵀ`` accumulated in int32 and
turned into float (or requantized) in an epilogue:

* ``"onednn"`` (CPU): ``torch.ops.onednn.qlinear_pointwise`` on a prepacked int8 weight with a
  ``uint8`` activation. The epilogue (dequantize, bias, GELU, residual add, requantization to
  ``uint8``/``int8``) is fused into the GEMM, as in PyTorch Inductor's x86 int8 path. Signed
  activation codes are stored shifted by 128 (``u8 = q + 128``, zero point ``z + 128``) because
  oneDNN's ``int8`` activations run a slow reference kernel here and ``uint8`` ones use VNNI.
* ``"intmm"`` (CPU or CUDA): ``torch._int_mm`` (int8 x int8 -> int32) and the epilogue in torch.
* ``"reference"``: the exact integer product computed in float64 (exact below 2^53) and the same
  epilogue; the yardstick of the tests.

The quantization conventions are those of :mod:`vitquant.quant.primitives`
(``x_q = clamp(round(x / s) + z, qmin, qmax)``); FasterTransformer's int8 modes
(NVIDIA FasterTransformer, ``examples/pytorch/vit/ViT-quantization``) define which tensors are
integer: ft1 (int8 in, int32 accumulation, float out) and ft2 (int8 in, int8 out).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "BACKENDS",
    "ActQ",
    "default_backend",
    "onednn_available",
    "check_backend",
    "quantize_act",
    "PackedWeight",
    "int8_linear",
    "int8_bmm",
]

BACKENDS = ("onednn", "intmm", "reference")

_ONEDNN: bool | None = None


def onednn_available() -> bool:
    """True when torch has the oneDNN int8 linear (``onednn::qlinear_pointwise``) and it runs."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            w = torch.ones(8, 8, dtype=torch.int8)
            packed = torch.ops.onednn.qlinear_prepack(w, [2, 8])
            x = torch.full((2, 8), 129, dtype=torch.uint8)
            y = torch.ops.onednn.qlinear_pointwise(
                x, 1.0, 128, packed, torch.ones(8), torch.zeros(8, dtype=torch.long), None,
                1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
            _ONEDNN = bool(torch.allclose(y, torch.full((2, 8), 8.0)))
        except (RuntimeError, AttributeError):
            _ONEDNN = False
    return _ONEDNN


def default_backend(device: torch.device | str | None = None) -> str:
    """``"onednn"`` on a CPU that has it, else ``"intmm"`` (``torch._int_mm``, also on CUDA)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cpu" and onednn_available():
        return "onednn"
    return "intmm"


def check_backend(backend: str | None, device: torch.device | str | None = None) -> str:
    """Validates a backend name (None: :func:`default_backend`)."""
    if backend is None:
        return default_backend(device)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown int8 backend {backend!r}; use one of {', '.join(BACKENDS)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "onednn" and (dev.type != "cpu" or not onednn_available()):
        raise ConfigError("the onednn int8 backend needs a CPU build of torch with oneDNN")
    return backend


@dataclass(frozen=True)
class ActQ:
    """Per-tensor uniform activation quantizer: ``x_q = clamp(round(x / scale) + zp, qmin, qmax)``.

    Only grids that fit in 8 bits (``qmin >= -128`` and ``qmax <= 127``, or ``0 <= qmin`` and
    ``qmax <= 255``) run on the integer kernels.
    """

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def offset(self, dtype: torch.dtype) -> int:
        """What is added to the codes to store them in ``dtype`` (uint8 or int8)."""
        if dtype == torch.uint8:
            return 128 if self.signed else 0
        return 0 if self.qmax <= 127 else -128

    def fake_quant(self, x: Tensor) -> Tensor:
        """Quantize-dequantize in float (the fake-quant model's function)."""
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale


def quantize_act(
    x: Tensor,
    a: ActQ,
    dtype: torch.dtype = torch.uint8,
    *,
    scaled: bool = False,
    shifted: bool = False,
    clamp: bool = True,
    offset_in: bool = False,
) -> Tensor:
    """Integer codes of ``x`` stored in ``dtype`` (shifted by ``a.offset(dtype)``).

    Computes ``x / scale`` as the fake quantizer does (division, not multiplication by the
    inverse), so the codes are exactly the fake-quant model's. The shift between signed codes
    and ``uint8`` storage (and back) is a bitwise XOR with 128 on the bytes, not a float pass.

    Args:
        x: float tensor.
        a: the quantizer.
        dtype: ``torch.uint8`` or ``torch.int8``.
        scaled: ``x`` is already divided by the scale (a temporary that may be overwritten).
        shifted: the zero point is already added too.
        clamp: clamp to ``[qmin, qmax]`` (skip only when the range provably holds).
        offset_in: the storage offset is already added as well (with ``shifted``).
    """
    off = a.offset(dtype)
    q = x.round_() if scaled else torch.div(x, a.scale).round_()
    if a.zero_point and not shifted:
        q.add_(a.zero_point)
    if offset_in:
        return (q.clamp_(a.qmin + off, a.qmax + off) if clamp else q).to(dtype)
    if clamp:
        q.clamp_(a.qmin, a.qmax)
    if off == 0:
        return q.to(dtype)
    natural = torch.int8 if a.signed else torch.uint8
    return q.to(natural).view(dtype).bitwise_xor_(128)


class PackedWeight:
    """An int8 weight ``[N, K]`` with a per-output-channel float scale, ready for a backend.

    Attributes:
        codes: int8 ``[N, K]`` (symmetric: dequantized weight is ``codes * scale[:, None]``).
        scale: float32 ``[N]``.
        backend: the backend it is packed for.
        packed: the backend's prepacked form (oneDNN) or the transposed codes (``_int_mm``).
        row_sum: int32 ``[N]``, ``codes.sum(1)`` (zero-point corrections of ``intmm``).
    """

    def __init__(self, codes: Tensor, scale: Tensor, backend: str) -> None:
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ConfigError("PackedWeight needs 2-D int8 codes")
        self.codes = codes.contiguous()
        self.scale = scale.detach().float().reshape(-1).expand(codes.shape[0]).contiguous()
        self.backend = backend
        self.row_sum = self.codes.sum(1, dtype=torch.int32)
        self.packed: Any = None
        if backend == "onednn":
            self.packed = torch.ops.onednn.qlinear_prepack(self.codes, None)
            self.zero_points = torch.zeros(codes.shape[0], dtype=torch.long)
        elif backend == "intmm":
            self.packed = self.codes.t()

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    def to(self, device: torch.device | str) -> PackedWeight:
        """A copy on ``device`` (oneDNN packs stay on the CPU)."""
        dev = torch.device(device)
        backend = self.backend if dev.type == "cpu" or self.backend != "onednn" else "intmm"
        return PackedWeight(self.codes.to(dev), self.scale.to(dev), backend)


def _acc_int(xq: Tensor, x_zp: int, w: PackedWeight, exact: bool) -> Tensor:
    """``(xq - x_zp) @ codesᵀ`` as int32 (``_int_mm``) or float64 (``exact``)."""
    x2 = xq.reshape(-1, xq.shape[-1])
    if exact:
        acc = (x2.double() - x_zp) @ w.codes.double().t()
        return acc
    if x2.dtype != torch.int8:
        raise ConfigError("the intmm backend needs int8 activation codes")
    acc = _int_mm(x2, w.packed)
    if x_zp:
        acc -= x_zp * w.row_sum
    return acc


def _int_mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``torch._int_mm`` where its shape rules allow, else an exact float matmul of the codes."""
    m, k = a.shape
    n = b.shape[1]
    if a.is_cuda and (m <= 16 or k % 8 or n % 8):
        res = (a.double() @ b.double()).to(torch.int32)
        return res if out is None else out.copy_(res)
    if out is None:
        return torch._int_mm(a, b)
    return torch._int_mm(a, b, out=out)


def int8_linear(
    xq: Tensor,
    x_scale: float,
    x_zp: int,
    w: PackedWeight,
    bias: Tensor | None = None,
    *,
    out: ActQ | None = None,
    out_dtype: torch.dtype = torch.float32,
    post: str = "none",
    gelu_approximate: str = "none",
    other: Tensor | None = None,
    w_scale: Tensor | None = None,
) -> Tensor:
    """Integer linear layer: ``y = post((xq - x_zp) @ codesᵀ * x_scale * w_scale + bias)``.

    Args:
        xq: activation codes (``uint8`` for onednn, ``int8`` for intmm; any for reference),
            shape ``[..., K]``.
        x_scale, x_zp: their scale and zero point, in the stored code space.
        w: the packed weight.
        bias: float ``[N]`` or None.
        out: requantize the result with this quantizer (int8/uint8 out, stored as
            ``out_dtype``); None: float output.
        out_dtype: ``torch.float32`` (or bfloat16) without ``out``; ``torch.uint8`` or
            ``torch.int8`` with it.
        post: ``"none"`` or ``"gelu"`` (applied before ``other`` and ``out``).
        gelu_approximate: ``"none"`` (erf) or ``"tanh"``.
        other: float tensor ``[..., N]`` added after ``post`` (a residual connection).
        w_scale: per-output-channel scale replacing ``w.scale`` (folds a per-channel output
            scale into the epilogue).

    Returns:
        ``[..., N]`` float, or codes in ``out_dtype`` when ``out`` is given.
    """
    shape = (*xq.shape[:-1], w.out_features)
    ws = w.scale if w_scale is None else w_scale
    if w.backend == "onednn":
        x2 = xq.reshape(-1, xq.shape[-1])
        if out is None:
            oscale, ozp, odt = 1.0, 0, out_dtype
        else:
            oscale, ozp, odt = out.scale, out.zero_point + out.offset(out_dtype), out_dtype
        if other is not None:
            y = torch.ops.onednn.qlinear_pointwise.binary(
                x2, float(x_scale), int(x_zp), w.packed, ws, w.zero_points,
                other.reshape(-1, shape[-1]), bias, oscale, ozp, odt, 1.0, 0, "add", 1.0,
                post, [], gelu_approximate if post == "gelu" else "",
            )  # fmt: skip
        else:
            y = torch.ops.onednn.qlinear_pointwise(
                x2, float(x_scale), int(x_zp), w.packed, ws, w.zero_points, bias, oscale, ozp,
                odt, post, [], gelu_approximate if post == "gelu" else "",
            )  # fmt: skip
        if out is not None:  # oneDNN saturates to the dtype; narrower grids need a clamp
            off = out.offset(odt)
            if out.qmin + off > _lo(odt) or out.qmax + off < _hi(odt):
                y = y.clamp_(out.qmin + off, out.qmax + off)
        return y.reshape(shape)
    acc = _acc_int(xq, x_zp, w, exact=w.backend == "reference")
    y = acc.to(torch.float32 if w.backend != "reference" else torch.float64) * (x_scale * ws)
    if bias is not None:
        y = y + bias
    y = y.float()
    if post == "gelu":
        y = F.gelu(y, approximate=gelu_approximate)
    if other is not None:
        y = y + other.reshape(y.shape)
    if out is not None:
        return quantize_act(y, out, out_dtype).reshape(shape)
    return y.to(out_dtype).reshape(shape)


def _lo(dtype: torch.dtype) -> int:
    return 0 if dtype == torch.uint8 else -128


def _hi(dtype: torch.dtype) -> int:
    return 255 if dtype == torch.uint8 else 127


def int8_bmm(a: Tensor, a_zp: int, b: Tensor, b_zp: int, backend: str) -> Tensor:
    """Batched integer matmul ``(a - a_zp) @ (b - b_zp)`` with int32 accumulation.

    Args:
        a: int8 codes ``[..., M, K]``.
        a_zp: zero point of ``a`` in the stored code space.
        b: int8 codes ``[..., K, N]`` (rows or columns contiguous).
        b_zp: zero point of ``b``.
        backend: ``"reference"`` computes in float64 (exact); the others loop ``torch._int_mm``
            over the batch (one int8 GEMM per head) into one int32 buffer.

    Returns:
        int32 ``[..., M, N]`` (float64 for the reference backend).
    """
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if backend == "reference":
        return (a.double() - a_zp) @ (b.double() - b_zp)
    out = torch.empty(*batch, m, n, dtype=torch.int32, device=a.device)
    # One small GEMM per head on strided views (no copies of q, kᵀ): on the CPU each runs best
    # on one thread (a parallel region per call costs more than the GEMM, far more when the
    # cores are shared).
    threads = torch.get_num_threads() if not a.is_cuda else 1
    if threads > 1:
        torch.set_num_threads(1)
    try:
        for idx in itertools.product(*(range(d) for d in batch)):
            _int_mm(a[idx], b[idx], out=out[idx])
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
    if b_zp:
        out -= b_zp * a.sum(-1, dtype=torch.int32).unsqueeze(-1)
    if a_zp:
        out -= a_zp * b.sum(-2, dtype=torch.int32).unsqueeze(-2)
    if a_zp and b_zp:
        out += k * a_zp * b_zp
    return out
