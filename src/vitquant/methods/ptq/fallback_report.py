"""The options and the report of :func:`vitquant.methods.ptq.fallback.fallback`:
:class:`FallbackConfig`, :class:`FallbackStep`, :class:`FallbackLayer`, :class:`FallbackReport`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vitquant._atomic import atomic_write_json
from vitquant.errors import ConfigError, DataError
from vitquant.quant import (
    QuantConfig,
)
from vitquant.quant.analyze import LayerReport
from vitquant.quant.calibrators import CALIBRATION_METHODS
from vitquant.quant.primitives import check_bits

__all__ = ["FallbackConfig", "FallbackStep", "FallbackLayer", "FallbackReport", "REPORT_VERSION"]

REPORT_VERSION = 1
_EPS = 1e-9  # budget comparisons in points


@dataclass
class FallbackConfig:
    """Settings of :func:`fallback`: ``max_drop`` or ``target_agreement`` (default
    ``max_drop=0.5``).

    Attributes:
        max_drop: allowed top-1 drop against the float model, in points (needs labels).
        target_agreement: wanted top-1 agreement with the float model, in percent (99.5).
        higher_bits: bits of a raised layer's quantizers; None: raised layers run in float (as
            does a layer whose quantizers all have ``higher_bits`` already).
        candidates: fnmatch patterns of the layers that may be raised (default: every layer).
        max_layers: raise at most this many layers (None: no limit).
        prune: once the budget holds, try returning each kept layer to low precision (one pass).
        method, percentile: activation calibration of raised layers (default: the model's
            config's ``calibrator`` / ``percentile``; give what :func:`calibrate` was given).
    """

    max_drop: float | None = None
    target_agreement: float | None = None
    higher_bits: int | None = 8
    candidates: list[str] = field(default_factory=lambda: ["*"])
    max_layers: int | None = None
    prune: bool = True
    method: str | None = None
    percentile: float | None = None

    def __post_init__(self) -> None:
        if self.max_drop is not None and self.target_agreement is not None:
            raise ConfigError("give max_drop or target_agreement, not both")
        if self.max_drop is None and self.target_agreement is None:
            self.max_drop = 0.5
        if self.max_drop is not None:
            d = self.max_drop = _number(self.max_drop, "max_drop")
            if not 0.0 <= d <= 100.0:
                raise ConfigError(f"max_drop={d} must be in [0, 100] (top-1 points)")
        if self.target_agreement is not None:
            t = self.target_agreement = _number(self.target_agreement, "target_agreement")
            if not 1.0 < t <= 100.0:
                hint = " (a percentage such as 99.5, not a fraction)" if 0.0 < t <= 1.0 else ""
                raise ConfigError(f"target_agreement={t} must be in (1, 100]{hint}")
        if self.higher_bits is not None:
            self.higher_bits = check_bits(self.higher_bits, what="higher_bits")
        pats = [self.candidates] if isinstance(self.candidates, str) else self.candidates
        self.candidates = [str(p) for p in pats]
        if not self.candidates:
            raise ConfigError("candidates is empty: give at least one layer pattern")
        m = self.max_layers
        if m is not None and (isinstance(m, bool) or int(m) != m or int(m) < 1):
            raise ConfigError(f"max_layers={m} must be a positive integer or None")
        if self.method is not None and self.method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"unknown method {self.method!r}; use one of {', '.join(CALIBRATION_METHODS)}"
            )
        if self.percentile is not None and not 0.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile={self.percentile} must be in (0, 100]")

    @property
    def metric(self) -> str:
        """``"drop"`` (labels, ``max_drop``) or ``"agreement"`` (``target_agreement``)."""
        return "drop" if self.max_drop is not None else "agreement"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FallbackConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        bad = set(d) - {f.name for f in fields(cls)}
        if bad:
            raise ConfigError(f"unknown FallbackConfig field(s): {', '.join(sorted(bad))}")
        return cls(**d)


def _number(v: Any, what: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = float("nan")
    if x != x or isinstance(v, bool):
        raise ConfigError(f"{what}={v!r} is not a number")
    return x


def _from_fields(cls: type[Any], d: dict[str, Any]) -> Any:
    """A dataclass from its ``asdict`` (JSON keeps the plain types)."""
    return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass
class FallbackStep:
    """One measurement of the whole model.

    Attributes:
        action: ``"baseline"`` (every layer low), ``"raise"`` or ``"lower"`` (prune pass).
        layer: the layer raised or returned to low precision ("" for the baseline).
        accepted: whether the model kept this change (a ``lower`` that misses is undone).
        meets: whether the budget held in this measurement.
        agreement: top-1 agreement with the float model, percent.
        rel_error: ``||y_q - y|| / ||y||`` over the logits.
        top1, drop: top-1 (percent) and its drop against the float model (points); None
            without labels.
        weight_bytes: bytes of the weights at their bits in this measurement.
        layers: layers at higher precision after the step.
    """

    action: str
    layer: str
    accepted: bool
    meets: bool
    agreement: float
    rel_error: float
    top1: float | None
    drop: float | None
    weight_bytes: int
    layers: int


@dataclass
class FallbackLayer:
    """A layer kept at higher precision.

    Attributes:
        name: the module (``blocks.1.mlp.fc2``).
        bits: ``{quantizer: [low bits, high bits]}``; high is None where the quantizer is off.
        sensitivity: :func:`analyze`'s relative logit error with only this layer quantized.
        weight_bytes: bytes its weights cost beyond their low-precision size.
    """

    name: str
    bits: dict[str, list[int | None]]
    sensitivity: float
    weight_bytes: int

    @property
    def to_float(self) -> bool:
        """True when the layer runs in float (its quantizers off)."""
        return all(hi is None for _, hi in self.bits.values())


@dataclass
class FallbackReport:
    """The result of :func:`fallback`.

    Attributes:
        config: the :class:`FallbackConfig` as a dict.
        qconfig: the model's :class:`QuantConfig` as a dict.
        images: validation images.
        float_top1: the float model's top-1 (percent; None without labels).
        met: whether the final model meets the budget.
        layers: the layers kept at higher precision, in the order they were raised.
        steps: every measurement, the baseline first.
        ranking: the candidates' sensitivity (:class:`LayerReport`), most sensitive first.
        float_weight_bytes: bytes of the same weights in float.
        version: format version.
    """

    config: dict[str, Any]
    qconfig: dict[str, Any]
    images: int
    float_top1: float | None
    met: bool
    layers: list[FallbackLayer]
    steps: list[FallbackStep]
    ranking: list[LayerReport]
    float_weight_bytes: int
    version: int = REPORT_VERSION

    @property
    def num_layers(self) -> int:
        """Layers kept at higher precision."""
        return len(self.layers)

    @property
    def layer_names(self) -> list[str]:
        """Their names, in the order they were raised."""
        return [x.name for x in self.layers]

    @property
    def baseline(self) -> FallbackStep:
        """The measurement with every layer at low precision."""
        return self.steps[0]

    @property
    def final(self) -> FallbackStep:
        """The measurement of the returned model (the last accepted step)."""
        return [s for s in self.steps if s.accepted][-1]

    @property
    def size_cost_bytes(self) -> int:
        """Bytes the raised layers add to the weights."""
        return self.final.weight_bytes - self.baseline.weight_bytes

    def overrides(self) -> dict[str, dict[str, Any]]:
        """``QuantConfig.overrides`` entries (one per quantizer) that give this precision."""
        out: dict[str, dict[str, Any]] = {}
        for lay in self.layers:
            for qname, (_, hi) in lay.bits.items():
                out[qname] = {"enabled": False} if hi is None else {"bits": hi}
        return out

    def quant_config(self, base: QuantConfig | dict[str, Any] | None = None) -> QuantConfig:
        """``base`` (default: the model's config) with :meth:`overrides` added: preparing and
        calibrating with it rebuilds this mixed-precision model (float layers have no quantizer)."""
        cfg = base if base is not None else copy.deepcopy(self.qconfig)
        cfg = QuantConfig.from_dict(cfg) if isinstance(cfg, dict) else copy.deepcopy(cfg)
        return replace(cfg, overrides={**cfg.overrides, **self.overrides()})

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FallbackReport:
        """Inverse of :meth:`to_dict`; DataError for anything else."""
        try:
            if int(d.get("version", 0)) > REPORT_VERSION:
                raise DataError(f"fallback report version {d['version']} is newer than vitquant's")
            return _from_fields(
                cls,
                {
                    **d,
                    "layers": [_from_fields(FallbackLayer, x) for x in d["layers"]],
                    "steps": [_from_fields(FallbackStep, x) for x in d["steps"]],
                    "ranking": [LayerReport.from_dict(x) for x in d["ranking"]],
                },
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"not a fallback report: {type(e).__name__}: {e}") from None

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Writes the report as JSON (atomically); returns the path."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> FallbackReport:
        """Reads a report written by :meth:`to_json`."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read fallback report {path}: {e}") from None
        if not isinstance(d, dict):
            raise DataError(f"{path} is not a fallback report")
        return cls.from_dict(d)

    def table(self) -> str:
        """Plain text: the budget and outcome, then one row per step."""
        cfg = FallbackConfig.from_dict(self.config)
        q = self.qconfig
        budget = (
            f"top-1 drop <= {cfg.max_drop:g} pt"
            if cfg.metric == "drop"
            else f"top-1 agreement >= {cfg.target_agreement:g}%"
        )
        hb = "float" if cfg.higher_bits is None else f"{cfg.higher_bits}-bit"
        head = [
            f"fallback to {hb}: {q.get('preset')} W{q.get('wbits')}A{q.get('abits')}, "
            f"{self.images} images, budget {budget}"
            + ("" if self.float_top1 is None else f", float top-1 {self.float_top1:.2f}%"),
            f"{'met' if self.met else 'NOT met'} with {self.num_layers} layer(s) at higher "
            f"precision: {', '.join(self.layer_names) or '-'}; weights "
            f"{self.baseline.weight_bytes} -> {self.final.weight_bytes} bytes "
            f"(+{self.size_cost_bytes}; float {self.float_weight_bytes})",
            "",
        ]
        width = max([len("layer")] + [len(s.layer) for s in self.steps])
        rows = [
            f"{'step':<8}  {'layer':<{width}}  {'top1%':>6}  {'drop':>6}  {'agree%':>7}  "
            f"{'rel.err':>8}  {'bytes':>9}  {'n':>3}  result"
        ]
        for s in self.steps:
            top1 = "-" if s.top1 is None else f"{s.top1:.2f}"
            drop = "-" if s.drop is None else f"{s.drop:.2f}"
            result = ("meets" if s.meets else "misses") + ("" if s.accepted else ", undone")
            rows.append(
                f"{s.action:<8}  {s.layer:<{width}}  {top1:>6}  {drop:>6}  {s.agreement:7.2f}  "
                f"{s.rel_error:8.4f}  {s.weight_bytes:9d}  {s.layers:3d}  {result}"
            )
        return "\n".join(head + rows)


# --- the search ------------------------------------------------------------------------------
