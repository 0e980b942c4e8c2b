"""Building and restoring the plain-data quantized state of a DiffQ :class:`BaseQuantizer`.

Follows DiffQ's ``get_quantized_state`` / ``restore_quantized_state`` (Défossez, Adi and
Synnaeve, 2021, arXiv 2104.09987), but the state is plain data (see
:mod:`vitquant.methods.diffq.state`): :func:`build_state` quantizes (and with ``packed=True``
bit-packs into one uint8 buffer) the parameters of a quantizer, :func:`restore_state` checks a
state against the quantizer's model and writes the weights back. They are the bodies of
:meth:`BaseQuantizer.get_quantized_state` and :meth:`BaseQuantizer.restore_quantized_state`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vitquant.errors import CheckpointError
from vitquant.methods.diffq.state import STATE_FORMAT, STATE_VERSION, check_state, mismatch_message

if TYPE_CHECKING:
    from vitquant.methods.diffq.base import BaseQuantizer

__all__ = ["build_state", "restore_state"]


def build_state(quantizer: BaseQuantizer, packed: bool = True) -> dict[str, Any]:
    """The body of :meth:`BaseQuantizer.get_quantized_state` (see there)."""
    quantizer._restore_slots()
    with torch.no_grad():
        # while quantize()d in place, the float weights are the saved copies
        weights = _saved_first(quantizer) if quantizer._saved is not None else {}
        entries, buffers, offset = [], [], 0
        for qp in quantizer._first:
            q = quantizer._quantize_param(qp, weights.get(id(qp.param), qp.param.detach()))
            if packed:
                entry, chunks = quantizer._pack_param(qp, q)
                entry["offset"] = offset
                for chunk in chunks:
                    buffers.append(chunk.cpu())
                    offset += chunk.numel()
            else:
                entry = q
            entries.append({"name": qp.full_name, "shape": list(qp.param.shape), **entry})
        kept = [_saved_kept(quantizer).get(id(k.param), k.param.detach()) for k in quantizer._kept]
        dtype = torch.float16 if quantizer.float16 else torch.float32
        flat = [p.reshape(-1).to(dtype).cpu() for p in kept]
    state: dict[str, Any] = {
        "meta": {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "method": quantizer.method,
            "init_kwargs": dict(quantizer._init_kwargs),
            "packed": bool(packed),
        },
        "quantized": entries,
        "float": {
            "names": [k.full_name for k in quantizer._kept],
            "shapes": [list(k.param.shape) for k in quantizer._kept],
            "data": torch.cat(flat) if flat else torch.zeros(0, dtype=dtype),
        },
    }
    if packed:
        state["data"] = (
            torch.cat(buffers) if buffers else torch.zeros(0, dtype=torch.uint8)
        ).contiguous()
    return state


def _saved_first(quantizer: BaseQuantizer) -> dict[int, Tensor]:
    """The float copies of the quantized parameters while ``quantize()``d in place."""
    assert quantizer._saved is not None
    return {id(qp.param): t for qp, t in zip(quantizer._first, quantizer._saved)}


def _saved_kept(quantizer: BaseQuantizer) -> dict[int, Tensor]:
    """The float copies of the kept parameters (float16 only) while ``quantize()``d."""
    if quantizer._saved is None or not quantizer.float16:
        return {}
    rest = quantizer._saved[len(quantizer._first) :]
    return {id(k.param): t for k, t in zip(quantizer._kept, rest)}


def restore_state(quantizer: BaseQuantizer, state: dict[str, Any]) -> None:
    """The body of :meth:`BaseQuantizer.restore_quantized_state` (see there)."""
    check_state(state, quantizer.method)
    quantizer._restore_slots()
    quantizer.unquantize()
    entries = state["quantized"]
    first = quantizer._first
    names, want = [e.get("name") for e in entries], [qp.full_name for qp in first]
    if names != want:
        raise CheckpointError(mismatch_message(names, want, "quantized"))
    floats = state["float"]
    if list(floats["names"]) != [k.full_name for k in quantizer._kept]:
        raise CheckpointError(
            mismatch_message(list(floats["names"]), [k.full_name for k in quantizer._kept], "float")
        )
    packed = bool(state["meta"].get("packed", False))
    data = state.get("data")
    with torch.no_grad():
        for qp, entry in zip(first, entries):
            if list(entry["shape"]) != list(qp.param.shape):
                raise CheckpointError(
                    f"state was made for another model: {qp.full_name} has shape "
                    f"{list(entry['shape'])} in the state, {list(qp.param.shape)} here"
                )
            q = quantizer._unpack_param(qp, entry, data) if packed else entry
            w = quantizer._unquantize_param(qp, q)
            qp.param.copy_(w.view_as(qp.param).to(qp.param.device, qp.param.dtype))
        offset = 0
        flat = floats["data"]
        for kept, shape in zip(quantizer._kept, floats["shapes"]):
            n = kept.param.numel()
            if list(shape) != list(kept.param.shape) or offset + n > flat.numel():
                raise CheckpointError(
                    f"state was made for another model: {kept.full_name} has shape "
                    f"{list(shape)} in the state, {list(kept.param.shape)} here"
                )
            chunk = flat[offset : offset + n].view(kept.param.shape)
            kept.param.copy_(chunk.to(kept.param.device, kept.param.dtype))
            offset += n
    quantizer._fix_rnns()
