"""Diagnosis of a model's PTQ: outliers at each quantization point and per-layer sensitivity.

:func:`analyze` prepares and calibrates a copy of a float model with a :class:`QuantConfig`, and
reports (:class:`AnalysisReport`):

* for every activation quantizer (point), the statistics of the tensor it quantizes during
  calibration: max |x|, the ``percentile`` of |x|, and the per-channel outlier ratio
  ``max|x[..., c]| / P(|x| over the channels outside the top_k)`` with the channels responsible
  (:class:`vitquant.models.activation_stats.ChannelStats`; channels along the last axis: the
  features of a Linear's input, the head dimension of q/k/v, the key token of attention scores);
* for every quantized layer (a module holding quantizers), its sensitivity: the model with only
  that layer's quantizers on (weight, input, and output where the preset has one) against the
  float model: relative logit error ``||y_q - y|| / ||y||`` and top-1 agreement; and the same with
  every layer quantized.

``report.table()`` prints both (layers sorted by sensitivity), ``report.to_json(path)`` /
:meth:`AnalysisReport.from_json` round-trip it, ``report.plot(path)`` draws the two as a PNG
(matplotlib, the ``plot`` extra). The command line is ``vitquant analyze``.
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitquant._atomic import atomic_write, atomic_write_json
from vitquant.errors import ConfigError, DataError
from vitquant.models.activation_stats import ChannelHistogram, ChannelStats
from vitquant.quant import (
    QuantConfig,
    QuantConv2d,
    batch_input,
    calibrate,
    named_quantizers,
    prepare,
    quantization_disabled,
)

__all__ = ["PointReport", "LayerReport", "AnalysisReport", "analyze"]

REPORT_VERSION = 1


@dataclass
class PointReport:
    """Outlier statistics of one activation quantizer's input.

    Attributes:
        name: the quantizer (``blocks.1.mlp.fc2.input_quantizer``).
        point: its point kind (``linear_input``, ``aftergemm``, ...).
        stats: the tensor's :class:`~vitquant.models.activation_stats.ChannelStats`.
        amax: the calibrated range (the largest, for per-channel ranges; None: uncalibrated).
    """

    name: str
    point: str
    stats: ChannelStats
    amax: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON)."""
        return {"name": self.name, "point": self.point, "amax": self.amax, **self.stats.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PointReport:
        """Inverse of :meth:`to_dict`."""
        return cls(d["name"], d["point"], ChannelStats.from_dict(d), d.get("amax"))


@dataclass
class LayerReport:
    """Sensitivity of one layer: only its quantizers on, compared with the float model.

    Attributes:
        name: the module (``blocks.1.mlp.fc2``).
        quantizers: its quantizers' names.
        rel_error: ``||y_q - y|| / ||y||`` over every logit.
        agreement: fraction of images whose top-1 class equals the float model's.
    """

    name: str
    quantizers: list[str]
    rel_error: float
    agreement: float

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerReport:
        """Inverse of :meth:`to_dict`."""
        return cls(d["name"], list(d["quantizers"]), float(d["rel_error"]), float(d["agreement"]))


@dataclass
class AnalysisReport:
    """The result of :func:`analyze`.

    Attributes:
        config: the :class:`QuantConfig` as a dict.
        images: images compared.
        points: one :class:`PointReport` per activation quantizer, in model order.
        layers: one :class:`LayerReport` per quantized layer, in model order.
        full: ``rel_error`` and ``agreement`` with every layer quantized.
        model: a label (the model's name, when known).
        version: format version.
    """

    config: dict[str, Any]
    images: int
    points: list[PointReport]
    layers: list[LayerReport]
    full: dict[str, float] = field(default_factory=dict)
    model: str = ""
    version: int = REPORT_VERSION

    # --- access -----------------------------------------------------------------------------
    def point(self, name: str) -> PointReport:
        """The point called ``name``; ConfigError lists the names otherwise."""
        for p in self.points:
            if p.name == name:
                return p
        raise ConfigError(f"no point {name!r}; points: {', '.join(p.name for p in self.points)}")

    def layer(self, name: str) -> LayerReport:
        """The layer called ``name``."""
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise ConfigError(f"no layer {name!r}; layers: {', '.join(x.name for x in self.layers)}")

    def by_sensitivity(self) -> list[LayerReport]:
        """Layers, the most sensitive (largest ``rel_error``) first."""
        return sorted(self.layers, key=lambda x: (-x.rel_error, x.agreement, x.name))

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON)."""
        return {
            "version": self.version,
            "model": self.model,
            "config": self.config,
            "images": self.images,
            "full": dict(self.full),
            "points": [p.to_dict() for p in self.points],
            "layers": [x.to_dict() for x in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalysisReport:
        """Inverse of :meth:`to_dict`; DataError for anything else."""
        try:
            if int(d.get("version", 0)) > REPORT_VERSION:
                raise DataError(f"analysis report version {d['version']} is newer than vitquant's")
            return cls(
                config=dict(d["config"]),
                images=int(d["images"]),
                points=[PointReport.from_dict(p) for p in d["points"]],
                layers=[LayerReport.from_dict(x) for x in d["layers"]],
                full={k: float(v) for k, v in d.get("full", {}).items()},
                model=str(d.get("model", "")),
                version=int(d.get("version", REPORT_VERSION)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"not an analysis report: {type(e).__name__}: {e}") from None

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Writes the report as JSON (atomically); returns the path."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> AnalysisReport:
        """Reads a report written by :meth:`to_json`."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise DataError(f"{path} is not an analysis report")
        return cls.from_dict(d)

    # --- presentation -----------------------------------------------------------------------
    def table(self, max_rows: int | None = None) -> str:
        """Plain text: layers by sensitivity, then points by outlier ratio."""
        cfg = self.config
        head = (
            f"{self.model or 'model'}: {cfg.get('preset')} W{cfg.get('wbits')}A{cfg.get('abits')}, "
            f"{self.images} images; all quantized: rel. logit error "
            f"{self.full.get('rel_error', float('nan')):.4f}, top-1 agreement "
            f"{100 * self.full.get('agreement', float('nan')):.1f}%"
        )
        layers = self.by_sensitivity()[:max_rows]
        width = max([len("layer")] + [len(x.name) for x in layers])
        lines = [
            head,
            "",
            f"{'layer':<{width}}  {'rel.err':>8}  {'agree%':>7}  (only it quantized)",
        ]
        lines += [
            f"{x.name:<{width}}  {x.rel_error:8.4f}  {100 * x.agreement:7.1f}" for x in layers
        ]
        points = sorted(self.points, key=lambda p: -p.stats.ratio)[:max_rows]
        width = max([len("point")] + [len(p.name) for p in points])
        q = points[0].stats.q if points else 99.99
        lines += [
            "",
            f"{'point':<{width}}  {'max':>9}  {f'p{q:g}':>9}  {'ratio':>7}  top channels (ratio)",
        ]
        for p in points:
            s = p.stats
            tops = ", ".join(f"{c} ({r:.1f})" for c, r in zip(s.top_channels, s.top_ratio))
            lines.append(
                f"{p.name:<{width}}  {s.max:9.3g}  {s.percentile:9.3g}  {s.ratio:7.1f}  {tops}"
            )
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Writes a PNG: outlier ratio per point (top), sensitivity per layer (bottom).

        Raises:
            ConfigError: matplotlib is not installed (``pip install 'vitquant[plot]'``).
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ConfigError(
                "report.plot needs matplotlib: pip install 'vitquant[plot]'"
            ) from None
        n = max(len(self.points), len(self.layers), 1)
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.22 * n + 2), 8.0))
        ax1.bar(range(len(self.points)), [p.stats.ratio for p in self.points], color="tab:orange")
        ax1.set_yscale("log")
        ax1.set_ylabel(f"max / p{self.points[0].stats.q:g} (others)" if self.points else "ratio")
        ax1.set_title("outlier ratio per quantization point")
        ax1.set_xticks(range(len(self.points)), [p.name for p in self.points], rotation=90)
        ax2.bar(range(len(self.layers)), [x.rel_error for x in self.layers], color="tab:blue")
        ax2.set_ylabel("relative logit error")
        ax2.set_title("sensitivity: only this layer quantized")
        ax2.set_xticks(range(len(self.layers)), [x.name for x in self.layers], rotation=90)
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", labelsize=6)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return atomic_write(path, lambda f: f.write(buf.getvalue()))


def _compare(ref: list[Tensor], model: nn.Module, inputs: list[Tensor]) -> tuple[float, float]:
    err = norm = 0.0
    same = total = 0
    for x, y_ref in zip(inputs, ref):
        y = _logits(model, x)
        err += float((y - y_ref).pow(2).sum())
        norm += float(y_ref.pow(2).sum())
        same += int((y.argmax(-1) == y_ref.argmax(-1)).sum())
        total += int(y.shape[0])
    return (err / max(norm, 1e-30)) ** 0.5, same / max(total, 1)


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    y = model(x)
    return (y[0] if isinstance(y, (tuple, list)) else y).float()


def analyze(
    model: nn.Module,
    batches: Iterable[Any],
    config: QuantConfig | dict[str, Any] | None = None,
    *,
    method: str | None = None,
    percentile: float | None = None,
    num_batches: int | None = None,
    top_k: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
    name: str = "",
) -> AnalysisReport:
    """Outliers at each quantization point and the sensitivity of each layer (see the module).

    ``model`` is not changed: a copy is prepared with ``config`` and calibrated on ``batches``
    (the statistics are those calibration sees), and the same batches are used to compare.

    Args:
        model: the float model.
        batches: tensors or ``(input, label)`` pairs (a DataLoader).
        config: the quantization (default ``QuantConfig()``).
        method, percentile: the activation calibrator (default: the config's); ``percentile``
            is also the statistic of the outlier ratio.
        num_batches: use only this many batches (they are held in memory).
        top_k: channels reported per point.
        device: run there (default: the model's).
        progress: a progress bar over the layers.
        name: a label for the report (the model's name).

    Returns:
        The :class:`AnalysisReport`.

    Raises:
        ConfigError: invalid config, an already prepared model, or a model with no quantizer.
        DataError: no batches, or NaN/inf in an activation.
    """
    if not isinstance(config, QuantConfig):
        config = QuantConfig.from_dict(config) if isinstance(config, dict) else QuantConfig()
    if int(top_k) < 1:
        raise ConfigError(f"top_k={top_k} must be at least 1")
    q = float(config.percentile if percentile is None else percentile)
    qmodel = prepare(copy.deepcopy(model), config)
    if device is not None:
        qmodel.to(device)
    dev = next(qmodel.parameters()).device
    inputs: list[Tensor] = []
    for batch in batches:
        if num_batches is not None and len(inputs) >= num_batches:
            break
        inputs.append(batch_input(batch).to(dev))
    if not inputs:
        raise DataError("the data yielded no batches")
    owners = {n: m for n, m in qmodel.named_modules()}
    acts = [(n, qz) for n, qz in named_quantizers(qmodel) if qz.role != "weight"]
    if not any(True for _ in named_quantizers(qmodel)):
        raise ConfigError("the config quantizes nothing in this model")
    hists: dict[str, ChannelHistogram] = {}
    hooks = []
    for n, qz in acts:
        axis = 1 if isinstance(owners[n.rpartition(".")[0]], QuantConv2d) else -1
        hists[n] = ChannelHistogram(axis)
        hooks.append(qz.register_forward_hook(lambda _m, args, _o, h=hists[n]: h.update(args[0])))
    try:
        calibrate(qmodel, inputs, method=method, percentile=percentile, progress=False)
    finally:
        for h in hooks:
            h.remove()
    points = []
    for n, qz in acts:
        if hists[n].counts is None:
            continue
        amax = float(qz.amax.max()) if qz.amax.numel() else None
        points.append(PointReport(n, qz.point, hists[n].stats(q, top_k), amax))

    qmodel.eval()
    groups: dict[str, list[str]] = {}
    for n, _ in named_quantizers(qmodel):
        groups.setdefault(n.rpartition(".")[0], []).append(n)
    quantizers = dict(named_quantizers(qmodel))
    layers: list[LayerReport] = []
    with torch.no_grad():
        with quantization_disabled(qmodel):
            ref = [_logits(qmodel, x) for x in inputs]
        err, agree = _compare(ref, qmodel, inputs)
        items: Iterable[tuple[str, list[str]]] = groups.items()
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(items, total=len(groups), desc="analyze", leave=False)
        with quantization_disabled(qmodel):
            for layer, names in items:
                for n in names:
                    quantizers[n].enabled = True
                e, a = _compare(ref, qmodel, inputs)
                for n in names:
                    quantizers[n].enabled = False
                layers.append(LayerReport(layer, names, e, a))
    return AnalysisReport(
        config=config.to_dict(),
        images=sum(int(x.shape[0]) for x in inputs),
        points=points,
        layers=layers,
        full={"rel_error": err, "agreement": agree},
        model=name,
    )
