"""The common machinery of DiffQ's parameter-level quantizers: :class:`BaseQuantizer`.

Follows the design of DiffQ (Défossez, Adi and Synnaeve, 2021, "Differentiable Model Compression
via Pseudo Quantization Noise", arXiv 2104.09987): a quantizer is attached to any ``nn.Module``,
selects the parameters worth quantizing (``min_size``, ``exclude``), counts shared parameters
once, and swaps each selected parameter for a transformed tensor during the forward pass: the
method's training-time version in ``model.train()`` (noise, STE, learnt step) and the truly
quantized weights in ``model.eval()``. Subclasses override a few hooks (template method):

* ``_make_extra(qp)``: the method's learnable tensor for one parameter (bit logits, step size);
* ``_train_weight(qp)``: the weight used by a training forward (``None``: the float weight);
* ``_quantize_param(qp, weight)`` / ``_unquantize_param(qp, q)``: integers and back;
* ``_pack_param(qp, q, out)`` / ``_unpack_param(qp, entry, data)``: bit-packed form;
* ``_param_size_bits(qp, exact)``: storage cost of one parameter, in bits.

Unlike the original, the quantized state is plain data (tensors, strings, numbers, lists and
dicts) that loads with ``torch.load(..., weights_only=True)``, names its parameters so that a
state made for another model is refused, and stores all packed bits in one uint8 buffer so that
the saved file is within a few kB of :meth:`BaseQuantizer.true_model_size`.

Building and restoring that state (the bodies of :meth:`BaseQuantizer.get_quantized_state` and
:meth:`BaseQuantizer.restore_quantized_state`) live in :mod:`vitquant.methods.diffq.packed_state`.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.methods.diffq.packed_state import build_state, restore_state

__all__ = ["BaseQuantizer", "QuantizedParam"]

_MB = 8 * 2**20  # bits per MB (DiffQ reports MiB and calls them MB)


@dataclass(eq=False)
class QuantizedParam:
    """One appearance of a quantized parameter.

    Args:
        name: attribute name on ``module`` (``"weight"``).
        full_name: dotted name in the model (``"blocks.0.mlp.fc1.weight"``).
        param: the float parameter.
        module: the module that holds it.
        other: first appearance of the same parameter when it is shared (tied weights), else
            ``None``; only first appearances are stored and counted.
        extra: the method's learnable tensor (DiffQ's bit logits, LSQ's step), shared with
            ``other`` for tied parameters.
    """

    name: str
    full_name: str
    param: nn.Parameter
    module: nn.Module
    other: QuantizedParam | None = None
    extra: nn.Parameter | None = None


@dataclass(eq=False)
class _KeptParam:
    """A parameter kept in float (too small or excluded), with all its appearances."""

    full_name: str
    param: nn.Parameter
    slots: list[tuple[nn.Module, str]] = field(default_factory=list)


class BaseQuantizer:
    """Common API of :class:`DiffQuantizer`, :class:`UniformQuantizer` and :class:`LSQ`.

    Args:
        model: the model; hooks are added to it (remove them with :meth:`detach`).
        min_size: parameters of at most ``min_size`` MB (``numel <= min_size * 2**20 // 4``) stay
            in float, as in DiffQ.
        float16: store the float parameters in float16 (and use float16-rounded values in
            ``eval()``).
        exclude: ``fnmatch`` patterns on the dotted name (``"blocks.*.attn.*"``) or the bare
            attribute name (``"bias"``) of parameters to keep in float.
        detect_bound: quantize a parameter used by several modules once.
    """

    method: ClassVar[str] = "base"
    suffix: str | None = None  # attribute suffix of the extra learnable tensor, if any
    _optimizer_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        model: nn.Module,
        min_size: float = 0.01,
        float16: bool = False,
        exclude: Sequence[str] = (),
        detect_bound: bool = True,
    ) -> None:
        if isinstance(exclude, str):
            exclude = [exclude]
        if min_size < 0:
            raise ConfigError(f"min_size={min_size} must be >= 0 (MB)")
        self.model = model
        self.min_size = float(min_size)
        self.float16 = bool(float16)
        self.exclude = [str(p) for p in exclude]
        self.detect_bound = bool(detect_bound)
        self._init_kwargs.update(
            min_size=self.min_size,
            float16=self.float16,
            exclude=list(self.exclude),
            detect_bound=self.detect_bound,
        )
        self._qparams: list[QuantizedParam] = []
        self._kept: list[_KeptParam] = []
        self._rnns: list[nn.RNNBase] = []
        self._saved: list[Tensor] | None = None  # float copies while quantize()d in place
        self._swapped = False
        self._optimizer_setup = False
        try:
            self._find_params()
        except BaseException:
            self._remove_extra()
            raise
        self._pre_handle = model.register_forward_pre_hook(self._forward_pre_hook)
        self._post_handle = model.register_forward_hook(self._forward_hook)

    # ------------------------------------------------------------------ selection
    _init_kwargs: dict[str, Any]

    def _excluded(self, full_name: str, name: str) -> bool:
        return any(fnmatch(full_name, p) or fnmatch(name, p) for p in self.exclude)

    def _find_params(self) -> None:
        min_params = self.min_size * 2**20 // 4
        first: dict[int, QuantizedParam | _KeptParam] = {}
        for module_name, module in self.model.named_modules():
            if isinstance(module, nn.RNNBase):
                self._rnns.append(module)
            for name, param in list(module.named_parameters(recurse=False)):
                full_name = f"{module_name}.{name}" if module_name else name
                seen = first.get(id(param)) if self.detect_bound else None
                if param.numel() <= min_params or self._excluded(full_name, name):
                    if isinstance(seen, _KeptParam):
                        seen.slots.append((module, name))
                        continue
                    kept = _KeptParam(full_name, param, [(module, name)])
                    first[id(param)] = kept
                    self._kept.append(kept)
                    continue
                if isinstance(seen, _KeptParam):  # excluded under another name: keep it float
                    seen.slots.append((module, name))
                    continue
                qp = QuantizedParam(name, full_name, param, module, other=seen)
                if seen is None:
                    qp.extra = self._make_extra(qp)
                    if qp.extra is not None and self.suffix is not None:
                        module.register_parameter(name + self.suffix, qp.extra)
                    first[id(param)] = qp
                else:
                    assert isinstance(seen, QuantizedParam)
                    qp.extra = seen.extra
                self._qparams.append(qp)

    def _check_fresh(self, model: nn.Module) -> None:
        """Refuses a model that already carries this method's extra parameters."""
        if self.suffix is None:
            return
        for name, _ in model.named_parameters():
            if name.endswith(self.suffix):
                raise ConfigError(
                    f"the model already has a {self.method} parameter {name!r}: a quantizer is "
                    "already attached (call detach() on it first)"
                )

    @property
    def _first(self) -> list[QuantizedParam]:
        return [qp for qp in self._qparams if qp.other is None]

    def quantized_names(self) -> list[str]:
        """Dotted names of the quantized parameters (first appearances)."""
        return [qp.full_name for qp in self._first]

    def float_names(self) -> list[str]:
        """Dotted names of the parameters kept in float (float16 with ``float16=True``)."""
        return [k.full_name for k in self._kept]

    def extra_parameters(self) -> list[nn.Parameter]:
        """The method's learnable tensors (DiffQ's bit logits, LSQ's steps); empty for Uniform."""
        return [qp.extra for qp in self._first if qp.extra is not None]

    # ------------------------------------------------------------------ optimizer
    def setup_optimizer(self, optimizer: torch.optim.Optimizer, **overrides: Any) -> None:
        """Adds the method's learnable tensors to ``optimizer`` as a new parameter group.

        The group uses the method's defaults (DiffQ: ``lr=1e-3, weight_decay=0``; LSQ: the
        optimizer's own settings), updated with ``overrides``.

        Raises:
            ConfigError: the optimizer already holds them (create it before the quantizer, or
                build it from parameters that exclude :meth:`extra_parameters`), or this was
                already called.
        """
        if self._optimizer_setup:
            raise ConfigError("setup_optimizer() was already called on this quantizer")
        extra = {id(p) for p in self.extra_parameters()}
        for group in optimizer.param_groups:
            if any(id(p) in extra for p in group["params"]):
                raise ConfigError(
                    f"the optimizer already holds the {self.method} parameters: create the "
                    "optimizer before the quantizer (or without its extra parameters)"
                )
        self._optimizer_setup = True
        if extra:
            group = {"params": self.extra_parameters(), **self._optimizer_defaults, **overrides}
            optimizer.add_param_group(group)

    def no_optimizer(self) -> None:
        """Declares that the learnable tensors are trained elsewhere (or not at all)."""
        self._optimizer_setup = True

    def clear_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Removes the method's learnable tensors from every group of ``optimizer``."""
        extra = {id(p) for p in self.extra_parameters()}
        for group in optimizer.param_groups:
            group["params"][:] = [p for p in group["params"] if id(p) not in extra]

    # ------------------------------------------------------------------ forward hooks
    def _set_slots(self, weights: dict[int, Tensor]) -> None:
        """Points every appearance of the parameters in ``weights`` (by id) to the new tensor."""
        for qp in self._qparams:
            key = id(qp.param)
            if key in weights:
                qp.module._parameters[qp.name] = weights[key]  # type: ignore[assignment]
        for kept in self._kept:
            if id(kept.param) in weights:
                for module, name in kept.slots:
                    module._parameters[name] = weights[id(kept.param)]  # type: ignore[assignment]
        self._fix_rnns()

    def _restore_slots(self) -> None:
        if not self._swapped:
            return
        for qp in self._qparams:
            qp.module._parameters[qp.name] = qp.param
        for kept in self._kept:
            for module, name in kept.slots:
                module._parameters[name] = kept.param
        self._swapped = False
        self._fix_rnns()

    def _fix_rnns(self) -> None:
        for rnn in self._rnns:
            if hasattr(rnn, "_init_flat_weights"):
                rnn._init_flat_weights()

    def _forward_pre_hook(self, module: nn.Module, inputs: Any) -> None:
        self._restore_slots()  # a previous forward may have raised before the post hook
        if self.model.training:
            if self._saved is not None:
                self.unquantize()
            weights = {}
            for qp in self._first:
                w = self._train_weight(qp)
                if w is not None:
                    weights[id(qp.param)] = w
        else:
            if self._saved is not None:  # already quantize()d in place
                return
            with torch.no_grad():
                weights = self._eval_weights()
        if weights:
            self._swapped = True
            self._set_slots(weights)

    def _forward_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._restore_slots()

    def _eval_weights(self) -> dict[int, Tensor]:
        """The truly quantized weights (and float16-rounded kept parameters), by parameter id."""
        weights = {}
        for qp in self._first:
            w = self._unquantize_param(qp, self._quantize_param(qp, qp.param.detach()))
            weights[id(qp.param)] = w.view_as(qp.param).to(qp.param.dtype)
        if self.float16:
            for kept in self._kept:
                weights[id(kept.param)] = kept.param.detach().half().to(kept.param.dtype)
        return weights

    # ------------------------------------------------------------------ in-place quantization
    def quantize(self) -> bool:
        """Writes the quantized weights into the parameters, keeping float copies.

        Not needed for evaluation (``model.eval()`` does it on the fly); useful to inspect the
        weights. Returns ``False`` if the model was already quantized in place.
        """
        if self._saved is not None:
            return False
        self._restore_slots()
        with torch.no_grad():
            weights = self._eval_weights()
            params = [qp.param for qp in self._first] + [k.param for k in self._kept]
            self._saved = [p.detach().clone() for p in params if id(p) in weights]
            for p in params:
                if id(p) in weights:
                    p.copy_(weights[id(p)])
        self._fix_rnns()
        return True

    def unquantize(self) -> None:
        """Reverts :meth:`quantize` (does nothing if the model is not quantized in place)."""
        if self._saved is None:
            return
        saved = iter(self._saved)
        with torch.no_grad():
            for qp in self._first:
                qp.param.copy_(next(saved))
            if self.float16:
                for kept in self._kept:
                    kept.param.copy_(next(saved))
        self._saved = None
        self._fix_rnns()

    @contextmanager
    def enter_quantize(self) -> Iterator[None]:
        """Context manager: the model holds its quantized weights inside the block."""
        self.quantize()
        try:
            yield
        finally:
            self.unquantize()

    def detach(self) -> None:
        """Removes the hooks and the method's extra parameters from the model.

        The parameters keep their current values: after :meth:`quantize` (or
        :meth:`restore_quantized_state`) the detached model holds the quantized weights.
        """
        self._restore_slots()
        self._saved = None
        self._pre_handle.remove()
        self._post_handle.remove()
        self._remove_extra()

    def _remove_extra(self) -> None:
        if self.suffix is None:
            return
        for qp in self._first:
            attr = qp.name + self.suffix
            if qp.extra is not None and qp.module._parameters.get(attr) is qp.extra:
                delattr(qp.module, attr)

    # ------------------------------------------------------------------ sizes
    def _float_size_bits(self) -> int:
        per = 16 if self.float16 else 32
        return sum(per * k.param.numel() for k in self._kept)

    def model_size(self) -> Tensor:
        """Size of the quantized model in MB (2**20 bytes), as a tensor.

        Differentiable with respect to the method's learnable tensors for DiffQ, so that
        ``loss + penalty * quantizer.model_size()`` trains the bit allocation.
        """
        return self._size(exact=False)

    def true_model_size(self) -> float:
        """Exact size in MB of the stored weights (bits, ranges, bit maps), before compression."""
        return float(self._size(exact=True))

    def _size(self, exact: bool) -> Tensor:
        device = self._first[0].param.device if self._first else torch.device("cpu")
        total = torch.tensor(float(self._float_size_bits()), device=device)
        for qp in self._first:
            total = total + self._param_size_bits(qp, exact)
        return total / _MB

    def packed_model_size(self) -> float:
        """Size in MB of ``torch.save(get_quantized_state(packed=True))``: the file on disk."""
        buffer = io.BytesIO()
        torch.save(self.get_quantized_state(packed=True), buffer)
        return buffer.tell() / 2**20

    def compressed_model_size(self, compress_level: int = -1, num_workers: int = 8) -> float:
        """Size in MB of the unpacked state compressed with zlib (an entropy estimate).

        As in DiffQ, the saved unpacked state is cut into ``num_workers`` chunks compressed in
        parallel threads; this can exceed :meth:`true_model_size`.
        """
        buffer = io.BytesIO()
        torch.save(self.get_quantized_state(packed=False), buffer)
        data = buffer.getvalue()
        workers = max(1, num_workers)
        step = max(1, math.ceil(len(data) / workers))
        chunks = [data[i : i + step] for i in range(0, len(data), step)]
        with futures.ThreadPoolExecutor(workers) as pool:
            sizes = pool.map(lambda c: len(zlib.compress(c, compress_level)), chunks)
            return sum(sizes) / 2**20

    # ------------------------------------------------------------------ state
    def get_quantized_state(self, packed: bool = True) -> dict[str, Any]:
        """The quantized model as plain data (loads with ``torch.load(..., weights_only=True)``).

        Args:
            packed: bit-pack the integer levels into one uint8 buffer ``state["data"]`` (on the
                CPU); otherwise each entry holds its levels as a tensor.

        Returns:
            ``{"meta": {"format", "version", "method", "init_kwargs", "packed"},
            "quantized": [one dict per quantized parameter, with its "name" and "shape"],
            "float": {"names", "shapes", "data"}, "data": uint8 buffer (packed only)}``.
        """
        return build_state(self, packed)

    def restore_quantized_state(self, state: dict[str, Any]) -> None:
        """Loads a state from :meth:`get_quantized_state` into the model's parameters.

        Raises:
            CheckpointError: not a vitquant state, another method, or made for another model
                (names or shapes differ).
        """
        restore_state(self, state)

    # ------------------------------------------------------------------ hooks to override
    def _make_extra(self, qp: QuantizedParam) -> nn.Parameter | None:
        return None

    def _train_weight(self, qp: QuantizedParam) -> Tensor | None:
        return None

    def _quantize_param(self, qp: QuantizedParam, weight: Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def _unquantize_param(self, qp: QuantizedParam, q: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def _pack_param(self, qp: QuantizedParam, q: dict[str, Any]) -> tuple[dict, list[Tensor]]:
        raise NotImplementedError

    def _unpack_param(self, qp: QuantizedParam, entry: dict, data: Tensor | None) -> dict:
        raise NotImplementedError

    def _param_size_bits(self, qp: QuantizedParam, exact: bool) -> Tensor | float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._init_kwargs.items())
        return f"{type(self).__name__}({args})"
