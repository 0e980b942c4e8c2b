"""One quantized weight as stored in an export: packed integer codes plus a plain-data record.

A weight ``w`` quantized by a uniform quantizer (any granularity: per tensor, channel, head or
group) is stored as its codes ``x_q - qmin`` in ``[0, 2^bits - 1]``, bit-packed densely with
:func:`vitquant.quant.bitpack.pack` (``ceil(numel * bits / 8)`` bytes), while its scale and zero
point stay in the quantizer's own state-dict entries. The codes are the quantizer's
:meth:`~vitquant.quant.quantizers.base.Quantizer.int_codes`, the very codes its fake-quant forward
dequantizes (frozen VVTQ weights included). Dequantization follows
:class:`~vitquant.quant.QParams`: ``w_hat = (x_q - zero_point) * scale``, which is exactly what the
fake-quant model computes (its weight quantizer is idempotent on ``w_hat``). The packing layout
replaces DiffQ's (Défossez et al., 2021, arXiv 2104.09987) per-tensor ``(levels, (min, max))``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import CheckpointError
from vitquant.quant.bitpack import pack, packed_nbytes, unpack

__all__ = ["packable", "quantize_weight", "pack_weight", "unpack_weight"]


def packable(quantizer: nn.Module | None) -> str:
    """Why a weight quantizer's output cannot be packed ("" when it can)."""
    if quantizer is None or not getattr(quantizer, "enabled", False):
        return "not quantized"
    if not getattr(quantizer, "is_calibrated", False):
        return "quantizer never calibrated"
    if getattr(quantizer, "kind", "uniform") != "uniform":
        return f"{quantizer.kind} quantizer"  # type: ignore[union-attr]
    if int(quantizer.bits) > 16:  # type: ignore[arg-type]
        return "more than 16 bits"
    return ""


def quantize_weight(w: Tensor, quantizer: nn.Module) -> Tensor:
    """The integer codes (int32, on ``w``'s device) that ``quantizer``'s forward uses for ``w``.

    They come from :meth:`~vitquant.quant.quantizers.base.Quantizer.int_codes`, the one
    definition of the codes shared with the fake-quant forward and the int8 runtime:
    ``clamp(round(w / s) + z, qmin, qmax)`` for plain uniform quantizers, with the frozen codes of
    a VVTQ quantizer's oscillation tracker substituted.
    """
    dev = quantizer.scale.device  # type: ignore[union-attr]
    with torch.no_grad():
        q = quantizer.int_codes(w.detach().to(dev))  # type: ignore[operator]
    return q.to(device=w.device, dtype=torch.int32)


def pack_weight(w: Tensor, quantizer: nn.Module, quantizer_name: str) -> tuple[Tensor, dict]:
    """Packs ``w`` with ``quantizer``; returns ``(uint8 bytes, record)``.

    The record (plain data, stored in the JSON header) holds ``bits, qmin, qmax, shape, dtype``
    and the name of the quantizer whose ``scale``/``zero_point`` dequantize it.
    """
    qp = quantizer.qparams()  # type: ignore[operator]
    codes = quantize_weight(w, quantizer) - qp.qmin
    packed = pack(codes.reshape(-1).cpu(), qp.bits)
    record = {
        "storage": "packed",
        "bits": int(qp.bits),
        "qmin": int(qp.qmin),
        "qmax": int(qp.qmax),
        "shape": [int(d) for d in w.shape],
        "dtype": str(w.dtype).replace("torch.", ""),
        "quantizer": quantizer_name,
    }
    return packed, record


def unpack_weight(packed: Tensor, record: dict[str, Any], quantizer: nn.Module, key: str) -> Tensor:
    """Inverse of :func:`pack_weight`: the dequantized float weight.

    Raises:
        CheckpointError: a record that does not match the packed bytes or the quantizer.
    """
    try:
        bits, qmin, qmax = int(record["bits"]), int(record["qmin"]), int(record["qmax"])
        shape = [int(d) for d in record["shape"]]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"export header: bad record for {key}") from None
    numel = 1
    for d in shape:
        if d < 0:
            raise CheckpointError(f"export header: negative shape for {key}")
        numel *= d
    if not 1 <= bits <= 16 or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise CheckpointError(f"export: packed tensor {key} is malformed")
    if packed.numel() != packed_nbytes(numel, bits):
        raise CheckpointError(
            f"export: {key} holds {packed.numel()} bytes, expected {packed_nbytes(numel, bits)}"
        )
    if (qmin, qmax) != (int(quantizer.qmin), int(quantizer.qmax)) or bits != quantizer.bits:  # type: ignore[arg-type,attr-defined]
        raise CheckpointError(f"export: {key} was packed for another quantizer grid")
    codes = unpack(packed, bits, numel).to(torch.int64) + qmin
    if numel and int(codes.max()) > qmax:
        raise CheckpointError(f"export: {key} has codes outside its {bits}-bit grid")
    ref = torch.empty(shape)
    s = quantizer.expanded(quantizer.scale.detach().float().cpu(), ref)  # type: ignore[operator]
    z = quantizer.expanded(quantizer.zero_point.detach().float().cpu(), ref)  # type: ignore[operator]
    w = (codes.reshape(shape).float() - z) * s
    dtype = _DTYPES.get(str(record.get("dtype", "float32")))
    if dtype is None:
        raise CheckpointError(f"export header: unsupported dtype for {key}")
    return w.to(dtype)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
