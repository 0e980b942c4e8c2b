"""The PTQ workflow: :func:`prepare` (insert quantizers), :func:`calibrate` (set their ranges),
:func:`enable_quantization` / :func:`quantization_disabled`, :func:`named_quantizers`.

The flow follows NVIDIA FasterTransformer's ViT example (pytorch-quantization): collect
activation statistics over a few batches with quantization off, compute ranges with the chosen
calibrator (max / percentile / mse / entropy), max-calibrate the weights (per channel in ft1).
With ``ln_reparam`` the post-LayerNorm ranges are folded into the model as RepQ-ViT does
(:mod:`vitquant.quant.reparam`) before the weights are calibrated.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError, DataError
from vitquant.models.layers import Add, MatMul
from vitquant.quant.calibrators import CALIBRATION_METHODS
from vitquant.quant.config import QuantConfig
from vitquant.quant.granularity import PerChannel, PerGroup, PerTensor
from vitquant.quant.modules import (
    QuantAdd,
    QuantAttention,
    QuantBlock,
    QuantConv2d,
    QuantLayerNorm,
    QuantLinear,
    QuantMatMul,
    QuantModule,
    QuantMultiheadAttention,
    QuantSoftmax,
    QuantTransformerEncoderLayer,
    swap_hf_layers,
)
from vitquant.quant.modules.torchvision import is_torchvision_encoder_block, swap_torchvision_blocks
from vitquant.quant.passes import build_passes
from vitquant.quant.quantizers import QUANTIZERS, Quantizer
from vitquant.quant.reparam import apply_reparam, prepare_reparam

__all__ = [
    "prepare",
    "calibrate",
    "named_quantizers",
    "enable_quantization",
    "quantization_disabled",
    "get_config",
    "batch_input",
    "forward_batches",
]

_CONFIG_ATTR = "_vitquant_config"
_ATTENTION_TYPES = ("Attention", "QuantAttention")


# --- structure ---------------------------------------------------------------------------------
def _is_timm(m: nn.Module, cls_name: str, attrs: tuple[str, ...]) -> bool:
    t = type(m)
    return (
        t.__name__ == cls_name
        and t.__module__.startswith("timm.")
        and all(hasattr(m, a) for a in attrs)
    )


def _set_child(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, attr = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _swap_if_same_state(model: nn.Module, fqn: str, old: nn.Module, new: nn.Module) -> None:
    if set(new.state_dict()) != set(old.state_dict()):
        warnings.warn(
            f"prepare: {fqn} ({type(old).__name__}) not swapped: state differs", stacklevel=3
        )
        return
    _set_child(model, fqn, new)


def _swap_structures(model: nn.Module) -> None:
    swap_torchvision_blocks(model)  # torchvision ViT EncoderBlocks (quant/modules/torchvision.py)
    swap_hf_layers(model)  # transformers ViT/DeiT layers -> vitquant blocks (quant/modules/hf.py)
    block_attrs = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    for fqn, m in list(model.named_modules()):
        if fqn and _is_timm(m, "Block", block_attrs):
            _swap_if_same_state(model, fqn, m, QuantBlock.from_timm(m))
    attn_attrs = ("qkv", "proj", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
    for fqn, m in list(model.named_modules()):
        if fqn and _is_timm(m, "Attention", attn_attrs):
            _swap_if_same_state(model, fqn, m, QuantAttention.from_timm(m))
        elif isinstance(m, nn.MultiheadAttention) and not isinstance(m, QuantMultiheadAttention):
            if QuantMultiheadAttention.supported(m):
                QuantMultiheadAttention.from_float(m)
            else:
                warnings.warn(
                    f"prepare: {fqn or 'model'} uses bias_k/add_zero_attn/separate q,k,v weights; "
                    "its attention stays float",
                    stacklevel=2,
                )
        elif isinstance(m, nn.TransformerEncoderLayer) and not isinstance(
            m, QuantTransformerEncoderLayer
        ):
            QuantTransformerEncoderLayer.from_float(m)
        elif isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False  # the nested-tensor fast path skips our modules


def _is_block(m: nn.Module) -> bool:
    """Transformer blocks whose LayerNorms are FasterTransformer's ``layernorm_input`` points."""
    if isinstance(m, (QuantBlock, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return True
    if is_torchvision_encoder_block(m):
        return True
    name = type(m).__name__
    return (name == "Block" and hasattr(m, "attn")) or (
        name == "EncoderBlock" and hasattr(m, "ln_1")
    )


def _swap_ops(model: nn.Module) -> None:
    plain_linear = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
    for _, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            t = type(child)
            if t is MatMul:
                role = {"qk_matmul": "qk", "av_matmul": "av"}.get(attr, "matmul")
                setattr(parent, attr, QuantMatMul(role))
            elif t is Add:
                setattr(parent, attr, QuantAdd())
            elif t is nn.Softmax and type(parent).__name__ in _ATTENTION_TYPES:
                QuantSoftmax.from_float(child)
            elif (
                isinstance(child, nn.LayerNorm)
                and not isinstance(child, QuantLayerNorm)
                and (
                    t is nn.LayerNorm
                    or (t.__name__ == "LayerNorm" and t.__module__.startswith("timm."))
                )
                and _is_block(parent)
            ):
                QuantLayerNorm.from_float(child)
            elif t in plain_linear:
                QuantLinear.from_float(child)
            elif t is nn.Conv2d:
                QuantConv2d.from_float(child)


# --- quantizer construction ------------------------------------------------------------------
def _granularity(gstr: str, kind: str, module: nn.Module, fqn: str) -> Any:
    if gstr == "tensor":
        return PerTensor()
    if kind == "weight":
        if gstr.startswith("group:"):
            if not isinstance(module, (QuantLinear, QuantMultiheadAttention)):
                raise ConfigError(f"{fqn}: group granularity applies to Linear weights only")
            return PerGroup(group_size=int(gstr.split(":", 1)[1]), axis=-1)
        return PerChannel(axis=0)
    if gstr == "channel":
        return PerChannel(axis=-1)
    if gstr == "head":
        if isinstance(module, QuantMatMul) or (
            isinstance(module, QuantSoftmax) and kind == "softmax_input"
        ):
            return PerChannel(axis=1)  # [B, heads, N, *]
        return PerTensor()
    raise ConfigError(f"{fqn}: granularity {gstr!r} is not valid for {kind}")


def _build(opts: dict[str, Any], kind: str, module: nn.Module, qname: str) -> Quantizer:
    opts = dict(opts)
    cls = QUANTIZERS.get(opts.pop("quantizer"))
    gran = _granularity(str(opts.pop("granularity")), kind, module, qname)
    role = "weight" if kind == "weight" else "activation"
    q = cls(
        opts.pop("bits"),
        signed=bool(opts.pop("signed")),
        symmetric=bool(opts.pop("symmetric")),
        narrow=bool(opts.pop("narrow")),
        granularity=gran,
        role=role,
    )
    q.name = qname
    q.point = kind
    return q


def _attach(model: nn.Module, config: QuantConfig) -> int:
    count = 0
    for name, m in model.named_modules():
        if not isinstance(m, QuantModule) or not config.module_selected(name):
            continue
        if isinstance(m, QuantLinear) and config.is_head(name) and not config.quantize_head:
            continue
        if isinstance(m, QuantConv2d) and not config.quantize_patch_embed:
            continue
        for attr, kind in m.point_kinds().items():
            qname = f"{name}.{attr}" if name else attr
            opts = config.point_options(qname, kind)
            if opts is None:
                continue
            setattr(m, attr, _build(opts, kind, m, qname))
            count += 1
    return count


def get_config(model: nn.Module) -> QuantConfig | None:
    """The :class:`QuantConfig` a model was prepared with (None if not prepared)."""
    return getattr(model, _CONFIG_ATTR, None)


def prepare(model: nn.Module, config: QuantConfig | dict[str, Any] | None = None) -> nn.Module:
    """Inserts quantizers into ``model`` in place and returns it.

    Works on vitquant's models, timm's ViT/DeiT (timm ``Attention``/``Block`` are swapped for
    equivalents holding the same submodules), and any model built from ``nn.Linear``,
    ``nn.Conv2d``, ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``. Parameter names
    and the float function are unchanged; quantizers start uncalibrated (identity).

    Args:
        model: the float model.
        config: a :class:`QuantConfig`, its ``to_dict()``, or None for ``QuantConfig()`` (ft2).

    Returns:
        ``model``, with quantizers at the points the config enables (``quant_summary`` lists
        them). Points not enabled have no quantizer.

    Raises:
        ConfigError: invalid config, or a model that is already prepared.
    """
    if config is None:
        config = QuantConfig()
    elif isinstance(config, dict):
        config = QuantConfig.from_dict(config)
    elif not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig or a dict, not {type(config).__name__}")
    if get_config(model) is not None or any(isinstance(m, Quantizer) for m in model.modules()):
        raise ConfigError("the model is already prepared for quantization")
    _swap_structures(model)
    _swap_ops(model)
    _attach(model, config)
    if config.effective_ln_reparam:
        prepare_reparam(model)
    object.__setattr__(model, _CONFIG_ATTR, config)
    return model


# --- helpers ---------------------------------------------------------------------------------
def named_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """All quantizers of ``model`` with their module names."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def enable_quantization(model: nn.Module, on: bool = True) -> None:
    """Switches every quantizer on or off (off: the model computes its float function)."""
    for _, q in named_quantizers(model):
        q.enabled = bool(on)


@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager running ``model`` in float; restores each quantizer's state on exit."""
    saved = [(q, q.enabled) for _, q in named_quantizers(model)]
    try:
        for q, _ in saved:
            q.enabled = False
        yield model
    finally:
        for q, was in saved:
            q.enabled = was


def forward_batches(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None,
    device: torch.device,
    progress: bool,
    desc: str,
) -> int:
    """Runs ``model`` on the inputs of ``data`` (:func:`batch_input`, moved to ``device``), at
    most ``num_batches`` of them, with a tqdm bar named ``desc`` when ``progress``; returns the
    number of batches run. The caller sets the mode (``no_grad``, quantization off, hooks)."""
    batches: Iterable[Any] = data
    if progress:
        from tqdm.auto import tqdm

        total = num_batches
        if total is None and hasattr(data, "__len__"):
            total = len(data)  # type: ignore[arg-type]
        batches = tqdm(data, total=total, desc=desc, leave=False)
    count = 0
    for batch in batches:
        if num_batches is not None and count >= num_batches:
            break
        model(batch_input(batch).to(device))
        count += 1
    return count


def batch_input(batch: Any) -> Tensor:
    """The input tensor of a batch: a tensor, ``(input, label, ...)``, or a dict with
    ``"image"``/``"input"``/``"pixel_values"``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "input", "pixel_values", "x"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise DataError(
        f"cannot find the input tensor in a batch of type {type(batch).__name__}; yield tensors "
        "or (input, label) pairs"
    )


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --- calibration -----------------------------------------------------------------------------
def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    method: str | None = None,
    percentile: float | None = None,
    num_batches: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    *,
    weight_method: str = "max",
    num_bins: int | None = None,
) -> nn.Module:
    """Calibrates every quantizer of a prepared model (post-training quantization).

    Activation statistics are collected over ``data`` with quantization off, then ranges are
    computed with ``method``; with ``ln_reparam`` the post-LayerNorm ranges are folded into the
    model; then weights are calibrated from the (possibly folded) weights. The config's
    calibration passes (:mod:`vitquant.quant.passes`) run before the statistics (with
    quantization off) and after the ranges.

    Args:
        model: a model returned by :func:`prepare`.
        data: iterable of input tensors or ``(input, label)`` pairs (a DataLoader).
        method: ``"max" | "percentile" | "mse" | "entropy"`` for activations (default: the
            config's ``calibrator``). Log2 quantizers always use the maximum.
        percentile: for ``"percentile"`` (default: the config's, 99.99).
        num_batches: stop after this many batches (default: all of ``data``).
        device: run on this device (the model is moved there); default: the model's.
        progress: show tqdm progress bars (the statistics pass and the config's passes).
        weight_method: calibration of weights (``"max"`` as FasterTransformer).
        num_bins: histogram bins (default: the config's).

    Returns:
        ``model`` (calibrated, in its original train/eval mode).

    Raises:
        ConfigError: not prepared, or unknown method.
        DataError: ``data`` yields no batch, or NaN/inf reaches a quantizer (named).
    """
    config = get_config(model)
    quantizers = list(named_quantizers(model))
    if config is None and not quantizers:
        raise ConfigError("the model is not prepared for quantization: call prepare() first")
    config = config or QuantConfig()
    method = method or config.effective_calibrator
    for what, m in (("method", method), ("weight_method", weight_method)):
        if m not in CALIBRATION_METHODS:
            raise ConfigError(
                f"unknown calibration {what} {m!r}; use one of {', '.join(CALIBRATION_METHODS)}"
            )
    percentile = config.percentile if percentile is None else float(percentile)
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"percentile={percentile} must be in (0, 100]")
    bins = int(num_bins or config.num_bins)
    if device is not None:
        model.to(device)
    dev = torch.device(device) if device is not None else _model_device(model)

    passes = build_passes(config, progress)
    if passes:  # every pass reads the same batches, so a one-shot iterator is read once here
        data = _take(data, num_batches)
    acts = [q for _, q in quantizers if q.role != "weight"]
    was_training = model.training
    model.eval()
    try:
        with quantization_disabled(model), torch.no_grad():
            for p in passes:
                p.before_statistics(model, data, config)
        pairs = prepare_reparam(model) if config.effective_ln_reparam else []
        with quantization_disabled(model), torch.no_grad():
            for q in acts:
                q.start_calibration(method, num_bins=bins)
            count = forward_batches(model, data, num_batches, dev, progress, "calibrate")
        if count == 0:
            raise DataError("the calibration data yielded no batches")
        for q in acts:
            q.finish_calibration(method, percentile=percentile)
        unseen = [q.name for q in acts if not q.is_calibrated]
        if unseen:
            warnings.warn(
                f"calibrate: {len(unseen)} quantizer(s) saw no data and stay uncalibrated "
                f"(identity), e.g. {unseen[0]}",
                stacklevel=2,
            )
        apply_reparam(pairs)
        _calibrate_weights(model, weight_method, percentile)
        for p in passes:
            p.after_ranges(model, data, config)
    finally:
        for q in acts:
            q.calibrating = False
        model.train(was_training)
    return model


def _take(data: Iterable[Any], num_batches: int | None) -> list[Any]:
    """The first ``num_batches`` batches of ``data`` (all of them when None), as a list."""
    out: list[Any] = []
    for batch in data:
        if num_batches is not None and len(out) >= num_batches:
            break
        out.append(batch)
    return out


def _calibrate_weights(model: nn.Module, method: str, percentile: float) -> None:
    for _, m in model.named_modules():
        if not isinstance(m, QuantModule):
            continue
        for slot, pname in m.quant_weights.items():
            q = getattr(m, slot, None)
            if isinstance(q, Quantizer):
                q.calibrate_tensor(getattr(m, pname).detach(), method, percentile=percentile)
