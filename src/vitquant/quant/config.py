"""``QuantConfig``: what :func:`vitquant.quant.prepare` quantizes and how.

A preset (``ft1``/``ft2``/``ft3``/``trt`` from FasterTransformer's ViT example, or ``repq`` for
RepQ-ViT-style PTQ, arXiv 2212.08254) chooses the quantization points; the other fields set bits,
granularity and quantizer types, and ``overrides`` adjusts single points. Configs are plain data:
``to_dict``/``from_dict`` round-trip through JSON, with a ``version`` field.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vitquant.errors import ConfigError
from vitquant.quant import primitives as P
from vitquant.quant.calibrators import CALIBRATION_METHODS
from vitquant.quant.passes import CALIBRATION_PASSES
from vitquant.quant.presets import POINT_KINDS, PRESETS, resolve_preset
from vitquant.quant.quantizers import QUANTIZERS

__all__ = ["QuantConfig", "CONFIG_VERSION", "OVERRIDE_KEYS"]

CONFIG_VERSION = 1

#: Keys allowed in an ``overrides`` entry.
OVERRIDE_KEYS = frozenset(
    {"enabled", "quantizer", "bits", "signed", "symmetric", "narrow", "granularity"}
)

_GRANULARITIES = ("tensor", "channel", "head")


def _check_granularity(value: str, what: str) -> str:
    v = str(value).strip().lower()
    if v in _GRANULARITIES:
        return v
    if v.startswith("group:"):
        try:
            if int(v.split(":", 1)[1]) > 0:
                return v
        except ValueError:
            pass
    raise ConfigError(
        f"{what}={value!r} is not a granularity; use tensor, channel, head or group:<size>"
    )


@dataclass
class QuantConfig:
    """Quantization settings for :func:`~vitquant.quant.prepare`.

    Args:
        preset: ``"robust"`` (the default: ft1's points, per-channel weights, SmoothQuant) or
            FasterTransformer's ``"ft1" | "ft2" | "ft3" | "trt"``, ``"repq"``, ``"weight_only"``
            (``"1"``/``"2"`` are aliases of ft1/ft2). Chooses the enabled point kinds and the
            calibration passes (``docs/ptq.md``).
        wbits: weight bits (2..16).
        abits: activation bits (2..16).
        calibrator: default activation calibration method for :func:`calibrate`:
            ``"max" | "percentile" | "mse" | "entropy"``; None: the preset's (percentile, MSE
            in ``lowbit``).
        percentile: percentile for the ``percentile`` calibrator.
        num_bins: histogram bins of the histogram calibrators.
        weight_granularity: ``"tensor" | "channel" | "group:<size>"``; None: the preset's
            (per channel in ft1/repq, per tensor in ft2/ft3/trt).
        act_granularity: ``"tensor" | "channel" | "head"`` for activations. ``head`` gives the
            attention operands (q, k, v, probabilities) one scale per head and Linear inputs/outputs
            inside attention one scale per head's channel block; other points stay per tensor.
        act_symmetric: symmetric activations; None: the preset's (asymmetric in repq).
        act_dynamic: per-token dynamic scales on every Linear input (``linear_input`` points:
            :class:`~vitquant.quant.quantizers.dynamic.DynamicQuantizer`, one grid per token
            computed from the input, as LLM.int8 / ZeroQuant / SmoothQuant-O3); the other points
            keep calibrated per-tensor scales. Lowers to integer GEMMs
            (:class:`~vitquant.runtime.dynamic.DynamicInt8Linear`). For single layers, use
            ``overrides={"blocks.*.mlp.fc2.input_quantizer": {"quantizer": "dynamic"}}``.
        narrow: narrow signed range (``[-127, 127]`` at 8 bits).
        softmax_quantizer: quantizer of the softmax output: ``"uniform" | "log2" | "log2_sqrt2"``;
            None: the preset's.
        softmax_bits: bits of the softmax output (None: ``abits``).
        ln_reparam: RepQ-ViT LayerNorm reparameterisation (per-channel ranges of post-LayerNorm
            activations folded into the LayerNorm and the next Linear); None: the preset's.
        enable: extra point kinds to enable (e.g. ``["layernorm_input"]``).
        disable: point kinds to disable.
        include: fnmatch patterns of module names to quantize (default all).
        exclude: fnmatch patterns of module names to keep float.
        overrides: ``{pattern: options}``; ``pattern`` is a point kind (``"softmax_input"``) or an
            fnmatch pattern over quantizer names (``"blocks.0.*.weight_quantizer"``); options are
            ``enabled, quantizer, bits, signed, symmetric, narrow, granularity``. Later entries
            win.
        quantize_patch_embed: quantize Conv2d layers (the patch embedding) too.
        quantize_head: quantize the classifier head(s) (modules matching ``head_patterns``).
        head_patterns: fnmatch patterns naming classifier heads.
        passes: calibration passes that :func:`calibrate` runs around its statistics, by
            registered name (:data:`~vitquant.quant.passes.CALIBRATION_PASSES`: SmoothQuant
            migration ``"smooth"``, loss-aware ranges ``"output_mse"``, ...); None: the preset's.
        pass_options: ``{pass name: {option: value}}``.
        version: format version of this config.

    Example:
        >>> cfg = QuantConfig(preset="ft2", wbits=8, abits=8)
        >>> cfg = QuantConfig("ft1", wbits=4, abits=4, softmax_quantizer="log2", ln_reparam=True)
    """

    preset: str = "robust"
    wbits: int = 8
    abits: int = 8
    calibrator: str | None = None
    percentile: float = 99.99
    num_bins: int = 2048
    weight_granularity: str | None = None
    act_granularity: str = "tensor"
    act_symmetric: bool | None = None
    act_dynamic: bool = False
    narrow: bool = False
    softmax_quantizer: str | None = None
    softmax_bits: int | None = None
    ln_reparam: bool | None = None
    enable: list[str] = field(default_factory=list)
    disable: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantize_patch_embed: bool = False
    quantize_head: bool = False
    head_patterns: list[str] = field(
        default_factory=lambda: [
            "head",
            "head_dist",
            "heads",
            "heads.*",
            "classifier",
            "fc",
            "cls_classifier",
            "distillation_classifier",  # transformers DeiT-with-teacher
        ]
    )
    passes: list[str] | None = None
    pass_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.preset = resolve_preset(self.preset)
        self.wbits = P.check_bits(self.wbits, what="wbits")
        self.abits = P.check_bits(self.abits, what="abits")
        if self.softmax_bits is not None:
            self.softmax_bits = P.check_bits(self.softmax_bits, what="softmax_bits")
        if self.calibrator is not None and self.calibrator not in CALIBRATION_METHODS:
            raise ConfigError(
                f"unknown calibrator {self.calibrator!r}; use one of "
                f"{', '.join(CALIBRATION_METHODS)}"
            )
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile={self.percentile} must be in (0, 100]")
        if int(self.num_bins) < 16:
            raise ConfigError(f"num_bins={self.num_bins} is too small (use at least 16)")
        if self.weight_granularity is not None:
            self.weight_granularity = _check_granularity(
                self.weight_granularity, "weight_granularity"
            )
            if self.weight_granularity == "head":
                raise ConfigError("weight_granularity='head' is not supported; use channel")
        if not isinstance(self.act_dynamic, bool):
            raise ConfigError(f"act_dynamic={self.act_dynamic!r} must be true or false")
        self.act_granularity = _check_granularity(self.act_granularity, "act_granularity")
        if self.act_granularity.startswith("group:"):
            raise ConfigError("act_granularity='group:...' is not supported; use channel or head")
        if self.softmax_quantizer is not None and self.softmax_quantizer not in QUANTIZERS:
            raise ConfigError(
                f"unknown softmax_quantizer {self.softmax_quantizer!r}; use one of "
                f"{', '.join(QUANTIZERS.names())}"
            )
        for name in ("enable", "disable"):
            kinds = list(getattr(self, name))
            for k in kinds:
                if k not in POINT_KINDS:
                    raise ConfigError(
                        f"{name}: unknown point kind {k!r}; use one of {', '.join(POINT_KINDS)}"
                    )
            setattr(self, name, kinds)
        self.include = [str(p) for p in self.include]
        self.exclude = [str(p) for p in self.exclude]
        self.head_patterns = [str(p) for p in self.head_patterns]
        self.overrides = {str(k): dict(v) for k, v in dict(self.overrides).items()}
        for pattern, opts in self.overrides.items():
            bad = set(opts) - OVERRIDE_KEYS
            if bad:
                raise ConfigError(
                    f"overrides[{pattern!r}]: unknown option(s) {', '.join(sorted(bad))}; use "
                    f"{', '.join(sorted(OVERRIDE_KEYS))}"
                )
            if "bits" in opts:
                opts["bits"] = P.check_bits(opts["bits"], what=f"overrides[{pattern!r}].bits")
            if "quantizer" in opts and opts["quantizer"] not in QUANTIZERS:
                raise ConfigError(
                    f"overrides[{pattern!r}]: unknown quantizer {opts['quantizer']!r}; use one of "
                    f"{', '.join(QUANTIZERS.names())}"
                )
            if "granularity" in opts:
                opts["granularity"] = _check_granularity(
                    opts["granularity"], f"overrides[{pattern!r}].granularity"
                )
        if self.passes is not None:
            self.passes = [str(p) for p in self.passes]
        self.pass_options = {str(k): dict(v) for k, v in dict(self.pass_options).items()}
        for name in [*self.effective_passes, *self.pass_options]:
            if name not in CALIBRATION_PASSES:
                raise ConfigError(
                    f"unknown calibration pass {name!r}; use one of "
                    f"{', '.join(CALIBRATION_PASSES.names()) or '(none registered)'}"
                )
        if int(self.version) > CONFIG_VERSION:
            raise ConfigError(
                f"config version {self.version} is newer than this vitquant ({CONFIG_VERSION})"
            )

    # --- effective values -------------------------------------------------------------------
    @property
    def points(self) -> frozenset[str]:
        """Enabled point kinds: the preset's, plus ``enable``, minus ``disable``."""
        return (PRESETS[self.preset].points | set(self.enable)) - set(self.disable)

    @property
    def effective_weight_granularity(self) -> str:
        return self.weight_granularity or PRESETS[self.preset].weight_granularity

    @property
    def effective_softmax_quantizer(self) -> str:
        return self.softmax_quantizer or PRESETS[self.preset].softmax_quantizer

    @property
    def effective_ln_reparam(self) -> bool:
        if self.ln_reparam is None:
            return PRESETS[self.preset].ln_reparam
        return bool(self.ln_reparam)

    @property
    def effective_calibrator(self) -> str:
        """The activation calibrator :func:`calibrate` uses: ``calibrator``, else the preset's."""
        return self.calibrator or PRESETS[self.preset].calibrator

    @property
    def effective_passes(self) -> list[str]:
        """The calibration passes :func:`calibrate` runs: ``passes``, else the preset's."""
        return list(PRESETS[self.preset].passes if self.passes is None else self.passes)

    @property
    def effective_pass_options(self) -> dict[str, dict[str, Any]]:
        """Options of each pass: the preset's, updated by ``pass_options``."""
        out = {name: dict(opts) for name, opts in PRESETS[self.preset].pass_options}
        for name, opts in self.pass_options.items():
            out[name] = {**out.get(name, {}), **opts}
        return out

    @property
    def effective_act_symmetric(self) -> bool:
        if self.act_symmetric is None:
            return PRESETS[self.preset].act_symmetric
        return bool(self.act_symmetric)

    def module_selected(self, module_name: str) -> bool:
        """True when ``module_name`` passes ``include`` and is not ``exclude``d."""
        if not any(fnmatch.fnmatchcase(module_name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(module_name, p) for p in self.exclude)

    def is_head(self, module_name: str) -> bool:
        """True when ``module_name`` names a classifier head."""
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.head_patterns)

    def point_options(self, quantizer_name: str, kind: str) -> dict[str, Any] | None:
        """Options of the quantizer at one point, or None when the point stays float.

        Returns a dict with ``quantizer, bits, signed, symmetric, narrow, granularity`` (the
        granularity as a string, resolved by ``prepare`` against the tensor's layout).
        """
        if kind not in POINT_KINDS:
            raise ConfigError(f"unknown point kind {kind!r}")
        enabled = kind in self.points
        if kind == "weight":
            opts: dict[str, Any] = dict(
                quantizer="uniform",
                bits=self.wbits,
                signed=True,
                symmetric=True,
                narrow=self.narrow,
                granularity=self.effective_weight_granularity,
            )
        else:
            opts = dict(
                quantizer="uniform",
                bits=self.abits,
                signed=True,
                symmetric=self.effective_act_symmetric,
                narrow=self.narrow,
                granularity=self.act_granularity,
            )
            if kind == "linear_input" and self.act_dynamic:
                opts["quantizer"], opts["granularity"] = "dynamic", "tensor"
            if kind == "softmax_output":
                opts["quantizer"] = self.effective_softmax_quantizer
                opts["bits"] = self.softmax_bits or self.abits
        for pattern, over in self.overrides.items():
            if pattern == kind or fnmatch.fnmatchcase(quantizer_name, pattern):
                over = dict(over)
                enabled = bool(over.pop("enabled", enabled))
                opts.update(over)
        return opts if enabled else None

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable) for checkpoints and reports."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        if not isinstance(d, dict):
            raise ConfigError(f"a quantization config must be a dict, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ConfigError(f"unknown QuantConfig field(s): {', '.join(sorted(bad))}")
        return cls(**d)
