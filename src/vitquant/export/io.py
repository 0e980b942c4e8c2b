"""Packed quantized exports: :func:`save_quantized`, :func:`load_quantized`, :func:`size_report`.

File format ``vitquant-quantized`` version 1: a safetensors file whose tensors are

* ``<weight>::codes``: uint8, the bit-packed integer codes of every weight with a uniform weight
  quantizer (2..16 bits; see :mod:`vitquant.export.qtensor`);
* every other state-dict tensor as itself (float parameters, quantizer ranges ``scale``,
  ``zero_point``, ``amax``, ``amin``, buffers, the SmoothQuant factors ``smooth_scale`` of
  smoothed linears), except training-only state: the oscillation trackers of VVTQ weight
  quantizers (a frozen weight's code is already its packed code);

and whose safetensors metadata holds ``format``, ``header`` (compact JSON) and ``sha256``. The
header records the format version, the model (registry name and constructor arguments), the
:class:`~vitquant.quant.QuantConfig`, one record per tensor (packed weights: bits, grid, shape,
quantizer), the quantizers' ``_extra_state`` (their format) and sizes. ``sha256`` covers the
header text and every tensor (name, dtype, shape, bytes), so a truncated or corrupted file is
refused with a :class:`~vitquant.errors.CheckpointError`, never loaded into a silently wrong model.

Loading rebuilds the model with :func:`vitquant.create_model` and
:func:`vitquant.quant.prepare` (giving the smoothed linears their ``smooth_scale`` buffers),
loads the quantizer states, unpacks and dequantizes the weights
(``w_hat``, which the weight quantizers map to themselves) and returns the fake-quant model in
eval mode: no optimizer, no calibration statistics, no training objects. Like DiffQ's
``get_quantized_state(packed=True)`` (Défossez et al., 2021, arXiv 2104.09987) but on
safetensors + JSON instead of pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitquant._atomic import atomic_write
from vitquant.errors import CheckpointError, ConfigError
from vitquant.export.qtensor import pack_weight, packable, unpack_weight

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "save_quantized",
    "load_quantized",
    "read_header",
    "size_report",
    "model_size_report",
]

EXPORT_FORMAT = "vitquant-quantized"
EXPORT_VERSION = 1
_CODES = "::codes"
_MAX_HEADER = 100 * 2**20


# --- helpers -----------------------------------------------------------------------------------
def _weight_quantizers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``{state key of a weight: (quantizer name, quantizer)}`` for every quantized weight."""
    from vitquant.quant.modules import QuantModule

    out: dict[str, tuple[str, nn.Module]] = {}
    for mname, m in model.named_modules():
        if not isinstance(m, QuantModule):
            continue
        for slot, pname in m.quant_weights.items():
            q = getattr(m, slot, None)
            if q is not None:
                prefix = f"{mname}." if mname else ""
                out[prefix + pname] = (prefix + slot, q)
    return out


def _training_state(model: nn.Module) -> tuple[str, ...]:
    """State-key prefixes of training-only modules, left out of exports: the oscillation
    trackers of VVTQ quantizers (their frozen codes are in the packed weight codes already)."""
    from vitquant.methods.vvtq.oscillation import OscillationTracker

    return tuple(
        f"{name}." for name, m in model.named_modules() if isinstance(m, OscillationTracker)
    )


def _infer_model_args(model: nn.Module) -> tuple[str | None, dict[str, Any]]:
    """The model's registry name and the constructor arguments its state depends on.

    ``init_values`` is recorded when the blocks have LayerScale (its value does not matter: the
    gammas are loaded from the export, but without it the rebuilt model has no LayerScale).
    """
    cfg = getattr(model, "default_cfg", None) or {}
    name = cfg.get("architecture")
    kwargs: dict[str, Any] = {}
    if hasattr(model, "num_classes"):
        kwargs["num_classes"] = int(model.num_classes)  # type: ignore[arg-type]
    pe = getattr(model, "patch_embed", None)
    if pe is not None and hasattr(pe, "img_size"):
        kwargs["img_size"] = int(pe.img_size[0])
        kwargs["in_chans"] = int(pe.proj.in_channels)
    if any(type(m).__name__ == "LayerScale" for m in model.modules()):
        kwargs["init_values"] = 1.0
    return name, kwargs


def _digest(header_text: str, tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256(header_text.encode("utf-8"))
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


# --- save ------------------------------------------------------------------------------------
def save_quantized(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    config: Any = None,
) -> Path:
    """Writes a packed export of a prepared, calibrated (or QAT-trained) model; returns the path.

    Args:
        model: the fake-quant model (not lowered).
        path: the output ``.safetensors`` file (written atomically).
        model_name: its :func:`vitquant.create_model` name (default: ``default_cfg``).
        model_kwargs: constructor arguments (default: ``num_classes``, ``img_size``,
            ``in_chans`` read from the model, and ``init_values`` when it has LayerScale);
            plain data.
        config: its :class:`~vitquant.quant.QuantConfig` (default: the one ``prepare`` recorded).

    Raises:
        ConfigError: not prepared, unknown model name, uncalibrated quantizers (named), or a
            lowered model.
    """
    from safetensors.torch import save as st_save

    from vitquant._version import __version__
    from vitquant.quant.api import get_config

    if hasattr(model, "_vitquant_int8"):
        raise ConfigError("save_quantized needs the fake-quant model, not a lowered one")
    config = config or get_config(model)
    if config is None:
        raise ConfigError("save_quantized needs a prepared model (vitquant.quant.prepare)")
    name, kwargs = _infer_model_args(model)
    name = model_name or name
    if not name:
        raise ConfigError("save_quantized cannot tell the model's name: pass model_name=...")
    kwargs = {**kwargs, **(model_kwargs or {})}
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise ConfigError(f"model_kwargs must be plain data (JSON-serialisable): {e}") from None
    from vitquant.runtime.lower import uncalibrated_quantizers

    missing = uncalibrated_quantizers(model)
    if missing:
        raise ConfigError(
            f"cannot export: {len(missing)} quantizer(s) were never calibrated, e.g. {missing[0]}"
        )

    wq = _weight_quantizers(model)
    tensors: dict[str, Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    skip = _training_state(model)
    for key, value in model.state_dict().items():
        if skip and key.startswith(skip):
            continue
        if key.endswith("._extra_state"):
            extra[key] = value
            continue
        if not torch.is_tensor(value):
            raise ConfigError(f"cannot export state entry {key} of type {type(value).__name__}")
        t = value.detach().cpu()
        if key in wq and not packable(wq[key][1]):
            qname, q = wq[key]
            packed, rec = pack_weight(t, q, qname)
            tensors[key + _CODES] = packed
            records[key] = rec
        else:
            tensors[key] = t.contiguous()
            records[key] = {"storage": "float", "dtype": str(t.dtype).replace("torch.", "")}
    sizes = _sizes(records, tensors)
    header = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "vitquant_version": __version__,
        "model": {"name": name, "kwargs": kwargs},
        "quant_config": config.to_dict(),
        "tensors": records,
        "extra_state": extra,
        "sizes": sizes,
    }
    try:
        text = json.dumps(header, separators=(",", ":"), sort_keys=True)
    except TypeError as e:
        raise ConfigError(f"quantizer state is not plain data: {e}") from None
    meta = {"format": EXPORT_FORMAT, "header": text, "sha256": _digest(text, tensors)}
    path = Path(path)
    _atomic_write(path, st_save(tensors, metadata=meta))
    return path


def _sizes(records: dict[str, dict[str, Any]], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Float32 size, true quantized size (packed codes + everything else as stored), floats."""
    float_bytes = 0
    true_bytes = 0
    left_float = []
    for key, rec in records.items():
        if rec["storage"] == "packed":
            numel = 1
            for d in rec["shape"]:
                numel *= int(d)
            float_bytes += 4 * numel
            true_bytes += tensors[key + _CODES].numel()
        else:
            t = tensors[key]
            nbytes = t.numel() * t.element_size()
            true_bytes += nbytes
            if t.is_floating_point() and not _is_quantizer_state(key) and not _is_smooth(key):
                float_bytes += 4 * t.numel()
                left_float.append([key, t.numel()])
            else:
                true_bytes += 0
    return {
        "float32_bytes": float_bytes,
        "quantized_bytes": true_bytes,
        "float_tensors": left_float,
    }


def _is_quantizer_state(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2].endswith("quantizer")


def _is_smooth(key: str) -> bool:
    """SmoothQuant factors: quantization state, not part of the float model's size."""
    return key.rsplit(".", 1)[-1] == "smooth_scale"


# --- load ------------------------------------------------------------------------------------
def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Parses and verifies an export: ``(header, tensors)``; every failure is a CheckpointError."""
    from safetensors.torch import load as st_load

    if not path.is_file():
        raise CheckpointError(f"export file not found: {path}")
    data = path.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{path} is truncated (not a safetensors file)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise CheckpointError(f"{path} is truncated or corrupt (bad safetensors header size)")
    try:
        st_header = json.loads(data[8 : 8 + n].decode("utf-8"))
        meta = st_header.get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise CheckpointError(f"{path} is corrupt (unreadable safetensors header)") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a vitquant quantized export")
    text = meta.get("header")
    if not isinstance(text, str):
        raise CheckpointError(f"{path} is corrupt (no export header)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is corrupt (unreadable export header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt (export header is not an object)")
    version = header.get("format_version")
    if version != EXPORT_VERSION:
        raise CheckpointError(
            f"{path} has export format version {version!r}; this vitquant reads version "
            f"{EXPORT_VERSION}"
        )
    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path} is truncated or corrupt: {str(e).splitlines()[0]}") from None
    if _digest(text, tensors) != meta.get("sha256"):
        raise CheckpointError(f"{path} is corrupt (checksum mismatch)")
    return header, tensors


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified JSON header of an export (format, model, config, tensors, sizes)."""
    return _read(Path(path))[0]


def load_quantized(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", *, lower: bool = False
) -> nn.Module:
    """Rebuilds the quantized model of an export (eval mode, on ``device``).

    Args:
        path: a file written by :func:`save_quantized`.
        device: where to put the model.
        lower: also run :func:`vitquant.runtime.lower` (integer kernels).

    Raises:
        CheckpointError: missing, truncated or corrupt file (checksum), another format version,
            or a state that does not match the rebuilt model.
    """
    from vitquant.models import create_model
    from vitquant.quant.api import prepare
    from vitquant.quant.calibrated_io import load_state_checked
    from vitquant.quant.config import QuantConfig
    from vitquant.quant.modules.linear import add_smooth_buffers

    path = Path(path)
    header, tensors = _read(path)
    try:
        model_info = header["model"]
        records = header["tensors"]
        extra = header.get("extra_state", {})
        config = QuantConfig.from_dict(header["quant_config"])
        model = create_model(str(model_info["name"]), **dict(model_info.get("kwargs", {})))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{path}: bad export header ({str(e).splitlines()[0]})") from None
    prepare(model, config)
    state: dict[str, Any] = dict(extra)
    packed: dict[str, dict[str, Any]] = {}
    if not isinstance(records, dict):
        raise CheckpointError(f"{path}: bad export header (tensors)")
    for key, rec in records.items():
        if not isinstance(rec, dict):
            raise CheckpointError(f"{path}: bad export header record for {key}")
        if rec.get("storage") == "packed":
            if key + _CODES not in tensors:
                raise CheckpointError(f"{path}: missing packed tensor {key}")
            packed[key] = rec
        elif key in tensors:
            state[key] = tensors[key]
        else:
            raise CheckpointError(f"{path}: missing tensor {key}")
    # training-only state is not exported: the rebuilt model keeps its fresh (empty) one
    skip = _training_state(model)
    if skip:
        for key, value in model.state_dict().items():
            if key.startswith(skip):
                state.setdefault(key, value)
    # quantizer ranges first: the packed weights are dequantized with them
    wq = _weight_quantizers(model)
    for key, rec in packed.items():
        if key not in wq or wq[key][0] != rec.get("quantizer"):
            raise CheckpointError(f"{path}: {key} has no matching weight quantizer in the model")
        qname, q = wq[key]
        sub = {k[len(qname) + 1 :]: v for k, v in state.items() if k.startswith(qname + ".")}
        try:
            q.load_state_dict(sub)
        except (RuntimeError, ConfigError) as e:
            raise CheckpointError(f"{path}: quantizer {qname}: {str(e).splitlines()[0]}") from None
        state[key] = unpack_weight(tensors[key + _CODES], rec, q, key)
    add_smooth_buffers(model, state)  # the smooth_scale buffers of smoothed linears
    load_state_checked(model, state, source=str(path))
    model = model.to(device).eval()
    if lower:
        from vitquant.runtime import lower as _lower

        _lower(model)
    return model


# --- sizes -----------------------------------------------------------------------------------
def size_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Sizes of an export: float32, true quantized, file, compression ratio, float tensors.

    Returns:
        ``{"file", "file_bytes", "float32_bytes", "quantized_bytes", "compression",
        "file_vs_quantized", "float_tensors": [[name, numel], ...], "bits": {bits: count}}``.
    """
    path = Path(path)
    header, _ = _read(path)
    sizes = header.get("sizes", {})
    file_bytes = path.stat().st_size
    bits: dict[str, int] = {}
    for rec in header.get("tensors", {}).values():
        if isinstance(rec, dict) and rec.get("storage") == "packed":
            bits[str(rec["bits"])] = bits.get(str(rec["bits"]), 0) + 1
    q = int(sizes.get("quantized_bytes", 0)) or 1
    return {
        "file": str(path),
        "file_bytes": file_bytes,
        "float32_bytes": int(sizes.get("float32_bytes", 0)),
        "quantized_bytes": int(sizes.get("quantized_bytes", 0)),
        "compression": int(sizes.get("float32_bytes", 0)) / q,
        "file_vs_quantized": file_bytes / q,
        "float_tensors": sizes.get("float_tensors", []),
        "bits": bits,
    }


def model_size_report(model: nn.Module) -> dict[str, Any]:
    """The sizes an export of a prepared, calibrated model would have (without writing it)."""
    wq = _weight_quantizers(model)
    records: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Tensor] = {}
    bits: dict[str, int] = {}
    skip = _training_state(model)
    for key, value in model.state_dict().items():
        if not torch.is_tensor(value) or (skip and key.startswith(skip)):
            continue
        if key in wq and not packable(wq[key][1]):
            b = int(wq[key][1].bits)  # type: ignore[arg-type]
            nbytes = (value.numel() * b + 7) // 8
            records[key] = {"storage": "packed", "shape": list(value.shape), "bits": b}
            tensors[key + _CODES] = torch.empty(nbytes, dtype=torch.uint8)
            bits[str(b)] = bits.get(str(b), 0) + 1
        else:
            records[key] = {"storage": "float"}
            tensors[key] = value
    sizes = _sizes(records, tensors)
    q = int(sizes["quantized_bytes"]) or 1
    return {
        "float32_bytes": sizes["float32_bytes"],
        "quantized_bytes": sizes["quantized_bytes"],
        "compression": sizes["float32_bytes"] / q,
        "float_tensors": sizes["float_tensors"],
        "bits": bits,
    }
