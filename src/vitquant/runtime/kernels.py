"""Integer GEMM kernels of the int8 runtime, with a pure-torch reference beside each one.

Three backends compute the same thing, ``acc = (x_q - z_x) @ (w_q)ᵀ`` accumulated in int32 and
turned into float (or requantized) in an epilogue:

* ``"onednn"`` (CPU): ``torch.ops.onednn.qlinear_pointwise`` on a prepacked int8 weight with a
  ``uint8`` activation. The epilogue (dequantize, bias, GELU, residual add, requantization to
  ``uint8``/``int8``) is fused into the GEMM, as in PyTorch Inductor's x86 int8 path. Signed
  activation codes are stored shifted by 128 (``u8 = q + 128``, zero point ``z + 128``) because
  oneDNN's ``int8`` activations run a slow reference kernel here and ``uint8`` ones use VNNI.
* ``"intmm"`` (CPU or CUDA): ``torch._int_mm`` (int8 x int8 -> int32) and the epilogue in torch.
  On CUDA, shapes that break ``_int_mm``'s rules (16 rows or fewer, sizes not multiples of 8)
  are zero-padded (:func:`pad_int_operands`, exact) and the result sliced.
* ``"reference"``: the exact integer product computed in float64 (exact below 2^53) and the same
  epilogue; the yardstick of the tests.

The attention matmuls (:func:`int8_bmm`, every backend but the reference) batch all heads
(:func:`int_bmm`): one batched float32 GEMM on CUDA and on AMX CPUs (in bfloat16 there), which
is exact on int8 codes, since ``_int_mm`` has no batched form; int8 GEMMs per head on other
CPUs, where they are faster (:mod:`vitquant.runtime.isa` picks). :func:`quantize_fast` is the
one-pass activation quantizer of the fast backends; :mod:`vitquant.runtime.ops` wraps the
kernels as custom operators while ``torch.compile`` traces.

The quantization conventions are those of :mod:`vitquant.quant.primitives`
(``x_q = clamp(round(x / s) + z, qmin, qmax)``); FasterTransformer's int8 modes
(NVIDIA FasterTransformer, ``examples/pytorch/vit/ViT-quantization``) define which tensors are
integer: ft1 (int8 in, int32 accumulation, float out) and ft2 (int8 in, int8 out).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vitquant.errors import ConfigError
from vitquant.runtime import ops
from vitquant.runtime.intmm import (
    INT_MM_MIN_ROWS,
    INT_MM_MULTIPLE,
    exact_float_chunk,
    int_bmm,
    int_mm,
    int_mm_padding,
    pad_int_operands,
)

__all__ = [
    "BACKENDS",
    "ActQ",
    "default_backend",
    "onednn_available",
    "check_backend",
    "quantize_act",
    "quantize_fast",
    "PackedWeight",
    "int8_linear",
    "int8_bmm",
    "int_bmm",
    "int_mm",
    "int_mm_padding",
    "pad_int_operands",
    "exact_float_chunk",
    "INT_MM_MIN_ROWS",
    "INT_MM_MULTIPLE",
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
    div: Tensor | None = None,
) -> Tensor:
    """Integer codes of ``x`` stored in ``dtype`` (shifted by ``a.offset(dtype)``).

    Computes ``x / scale`` as the fake quantizer does (division, not multiplication by the
    inverse), so the codes are exactly the fake-quant model's. The shift between signed codes
    and ``uint8`` storage (and back) is a bitwise XOR with 128 on the bytes, not a float pass.
    A smoothed input (SmoothQuant's ``x / s`` before the quantizer) passes ``div = s * scale``
    (per channel of the last axis): the smoothing costs no pass of its own, and the codes equal
    the fake-quant ones up to the rounding of ``(x / s) / scale`` against ``x / (s * scale)``.

    Args:
        x: float tensor.
        a: the quantizer.
        dtype: ``torch.uint8`` or ``torch.int8``.
        scaled: ``x`` is already divided by the scale (a temporary that may be overwritten).
        shifted: the zero point is already added too.
        clamp: clamp to ``[qmin, qmax]`` (skip only when the range provably holds).
        offset_in: the storage offset is already added as well (with ``shifted``).
        div: per-channel divisor ``[C]`` (last axis) used instead of ``a.scale`` (not with
            ``scaled``).
    """
    off = a.offset(dtype)
    if scaled:
        q = x.round_()
    else:
        q = torch.div(x, a.scale if div is None else div).round_()
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


_QPT_WARNED = False


def _qpt(x: Tensor, scale: float, zp: int, qdtype: torch.dtype) -> Tensor:
    """``torch.quantize_per_tensor`` without its (once per process) deprecation warning."""
    global _QPT_WARNED
    if _QPT_WARNED:
        return torch.quantize_per_tensor(x, scale, zp, qdtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_tensor(x, scale, zp, qdtype)
    _QPT_WARNED = True
    return q


def quantize_fast(
    x: Tensor, a: ActQ, dtype: torch.dtype = torch.uint8, *, prescaled: bool = False
) -> Tensor:
    """The codes of :func:`quantize_act` in one vectorised pass (plus a byte copy).

    Eager on the CPU, ``torch.quantize_per_tensor`` (one kernel: scale, round half to even,
    add the zero point, saturate) replaces the chain of division, rounding, clamp and dtype
    conversion; its ``int_repr`` is a copy of one byte per element. It multiplies by the
    inverse scale where the fake quantizer divides, so a value within one float ulp of a
    rounding midpoint may land one step away (a few per million values); the ``reference``
    backend keeps :func:`quantize_act`. A transposed input comes out contiguous (the quantize
    pass is also the transposing copy). While ``torch.compile`` traces, and for anything but a
    float32 CPU tensor, it is :func:`quantize_act`, whose elementwise chain Inductor fuses into
    the producer's loop.

    Args:
        x: float tensor.
        a: the quantizer.
        dtype: ``torch.uint8`` or ``torch.int8`` storage.
        prescaled: ``x`` already is ``x / scale + zero_point + storage offset`` (only rounding
            and saturation are left, e.g. after
            :class:`~vitquant.runtime.layernorm.LayerNormQuant`).
    """
    off = a.offset(dtype)
    scale, zp = (1.0, 0) if prescaled else (a.scale, a.zero_point + off)
    if (
        x.dtype != torch.float32
        or x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or not _lo(dtype) <= zp <= _hi(dtype)
    ):
        if prescaled:
            return quantize_act(x, a, dtype, scaled=True, shifted=True, offset_in=True)
        return quantize_act(x, a, dtype)
    q = _qpt(x, scale, zp, torch.quint8 if dtype == torch.uint8 else torch.qint8).int_repr()
    if a.qmin + off > _lo(dtype) or a.qmax + off < _hi(dtype):
        q.clamp_(a.qmin + off, a.qmax + off)
    return q


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
        self.handle = 0
        if backend == "onednn":
            self.packed = torch.ops.onednn.qlinear_prepack(self.codes, None)
            self.zero_points = torch.zeros(codes.shape[0], dtype=torch.long)
            self.handle = ops.register_packed(self.packed)
        elif backend == "intmm":
            self.packed = self.codes.t()

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedWeight:
        return PackedWeight(self.codes.clone(), self.scale.clone(), self.backend)

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
    acc = int_mm(x2, w.packed)
    if x_zp:
        acc -= x_zp * w.row_sum
    return acc


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
    out_div: Tensor | None = None,
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
        out_div: with ``out``, a per-output-channel divisor replacing ``out.scale`` (the
            smoothing factors of the next layer times its input scale, see
            :func:`quantize_act`); oneDNN then returns float and the requantization runs as
            one :func:`quantize_act`, since its epilogue takes one output scale.

    Returns:
        ``[..., N]`` float, or codes in ``out_dtype`` when ``out`` is given.
    """
    shape = (*xq.shape[:-1], w.out_features)
    ws = w.scale if w_scale is None else w_scale
    if w.backend == "onednn" and out is not None and out_div is not None:
        y = int8_linear(
            xq, x_scale, x_zp, w, bias, post=post, gelu_approximate=gelu_approximate,
            other=other, w_scale=w_scale,
        )  # fmt: skip
        return quantize_act(y, out, out_dtype, div=out_div)
    if w.backend == "onednn":
        x2 = xq.reshape(-1, xq.shape[-1])
        if out is None:
            oscale, ozp, odt = 1.0, 0, out_dtype
        else:
            oscale, ozp, odt = out.scale, out.zero_point + out.offset(out_dtype), out_dtype
        algo = gelu_approximate if post == "gelu" else ""
        if torch.compiler.is_compiling():  # opaque to Inductor (see vitquant.runtime.ops)
            y = ops.onednn_qlinear(
                x2, w.handle, float(x_scale), int(x_zp), ws, w.zero_points, bias,
                None if other is None else other.reshape(-1, shape[-1]), float(oscale),
                int(ozp), odt, post, algo,
            )  # fmt: skip
        elif other is not None:
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
        return quantize_act(y, out, out_dtype, div=out_div).reshape(shape)
    return y.to(out_dtype).reshape(shape)


def _lo(dtype: torch.dtype) -> int:
    return 0 if dtype == torch.uint8 else -128


def _hi(dtype: torch.dtype) -> int:
    return 255 if dtype == torch.uint8 else 127


def int8_bmm(
    a: Tensor,
    a_zp: int,
    b: Tensor,
    b_zp: int,
    backend: str,
    *,
    method: str | None = None,
    bf16: bool = False,
    float_out: bool = False,
) -> Tensor:
    """Batched integer matmul ``(a - a_zp) @ (b - b_zp)`` with int32 accumulation.

    Args:
        a: int8 codes ``[..., M, K]``.
        a_zp: zero point of ``a`` in the stored code space.
        b: int8 codes ``[..., K, N]`` (rows or columns contiguous).
        b_zp: zero point of ``b``.
        backend: ``"reference"`` computes in float64 (exact); the others run :func:`int_bmm`
            on the raw codes (one batched GEMM on CUDA, int8 GEMMs per head on the CPU) and
            correct the zero points with row and column sums.
        method: :func:`int_bmm`'s method (None: by device).
        bf16: :func:`int_bmm`'s ``bf16`` (batched float GEMM in bfloat16, exact).
        float_out: :func:`int_bmm`'s ``float_out`` (exact float32 integers, batched only).

    Returns:
        int32 ``[..., M, N]`` (float64 for the reference backend, float32 with ``float_out``
        where the batched float GEMM ran).
    """
    if backend == "reference":
        return (a.double() - a_zp) @ (b.double() - b_zp)
    k = a.shape[-1]
    out = int_bmm(a, b, method=method, bf16=bf16, float_out=float_out)
    if b_zp:
        out -= b_zp * a.sum(-1, dtype=torch.int32).unsqueeze(-1)
    if a_zp:
        out -= a_zp * b.sum(-2, dtype=torch.int32).unsqueeze(-2)
    if a_zp and b_zp:
        out += k * a_zp * b_zp
    return out
