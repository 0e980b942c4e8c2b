"""Accuracy-driven fallback for recipes with block reconstruction, minimal after reconstruction.

:func:`~vitquant.methods.ptq.fallback.fallback` must see the float weights (reconstruction moves
them onto their low-bit grid, which a layer raised to 8 bits would keep), so a recipe with the
``reconstruct`` pass runs in three steps, as ``vitquant calibrate --max-drop`` does:

1. the full recipe; if it meets the budget on the validation images, no layer is raised;
2. else the recipe without reconstruction, :func:`fallback` on it (the fewest sensitive layers
   raised until the budget holds), then reconstruction of the mixed-precision model;
3. (``prune``) reconstruction recovers part of the loss the fallback answered for, so a layer
   raised in step 2 may no longer be needed: each one, the last raised first, is tried back at
   low precision by rebuilding the model from the float one (``prepare`` with the remaining
   layers' overrides, ``calibrate`` with the reconstruction) and dropped when the rebuilt model
   still meets the budget. Each try costs one calibration with reconstruction. Should the
   reconstruction of step 2 miss the budget that the fallback met without it (it fits the
   calibration images, not the validation ones), the model without reconstruction is returned.

After step 3 no single raised layer can go back to low precision (with reconstruction) and keep
the budget, which is the sense in which the count is minimal; like the fallback's own greedy
search it is not a global optimum.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError, DataError
from vitquant.methods.ptq.fallback import fallback
from vitquant.methods.ptq.fallback_report import _EPS, FallbackReport
from vitquant.methods.ptq.reconstruct_pass import reconstruct_with, without_reconstruction
from vitquant.quant import QuantConfig, batch_input, calibrate, prepare

__all__ = ["ReconstructedFallback", "fallback_with_reconstruction", "meets_budget"]


@dataclass
class ReconstructedFallback:
    """The result of :func:`fallback_with_reconstruction`.

    ``report`` is the fallback's (None when the reconstructed model met the budget alone), its
    ``layers`` narrowed to those still raised and ``met`` measured after the reconstruction (the
    fallback's own steps are measured before it); ``lowered`` names the layers the prune after
    reconstruction returned to low precision, ``tries`` the rebuilds it made. ``reconstructed``
    is False when the reconstruction of the mixed model missed the budget that the fallback's
    model met without it: that model is returned (its config without the reconstruct pass).
    """

    model: nn.Module
    config: QuantConfig
    report: FallbackReport | None = None
    lowered: list[str] = field(default_factory=list)
    tries: int = 0
    reconstructed: bool = True

    @property
    def raised(self) -> list[str]:
        """Names of the layers kept at higher precision."""
        return [] if self.report is None else [x.name for x in self.report.layers]


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, (tuple, list)) else out


def meets_budget(
    model_float: nn.Module,
    model: nn.Module,
    batches: Sequence[Any],
    *,
    max_drop: float | None = None,
    target_agreement: float | None = None,
) -> bool:
    """Whether ``model`` is within ``max_drop`` top-1 points of ``model_float`` (labelled
    ``(input, label)`` batches), or agrees with its top-1 on ``target_agreement`` % of them."""
    if (max_drop is None) == (target_agreement is None):
        raise ConfigError("give one budget: max_drop or target_agreement")
    dev = next(model.parameters()).device
    hits_f = hits_q = agree = n = 0
    with torch.no_grad():
        for b in batches:
            x = batch_input(b).to(dev)
            pf, pq = _logits(model_float, x).argmax(-1), _logits(model, x).argmax(-1)
            agree += int((pf == pq).sum())
            n += int(x.shape[0])
            if max_drop is not None:
                if not isinstance(b, (tuple, list)) or len(b) < 2:
                    raise DataError("max_drop needs labels: (input, label) batches")
                y = torch.as_tensor(b[1]).to(dev)
                hits_f += int((pf == y).sum())
                hits_q += int((pq == y).sum())
    if n == 0:
        raise DataError("the validation batches are empty")
    if max_drop is not None:
        return 100.0 * (hits_f - hits_q) / n <= max_drop + _EPS
    assert target_agreement is not None
    return 100.0 * agree / n >= target_agreement - _EPS


def _build(model_float: nn.Module, config: QuantConfig, calib: Sequence[Any]) -> nn.Module:
    q = prepare(copy.deepcopy(model_float), config)
    calibrate(q, calib, progress=False)
    return q


def fallback_with_reconstruction(
    model_float: nn.Module,
    config: QuantConfig,
    calib_batches: Sequence[Any],
    val_batches: Sequence[Any],
    *,
    max_drop: float | None = None,
    target_agreement: float | None = None,
    higher_bits: int | None = 8,
    prune: bool = True,
    progress: bool = False,
) -> ReconstructedFallback:
    """The three steps of the module docstring; ``model_float`` is not modified.

    Args:
        model_float: the float model.
        config: a config whose passes include ``reconstruct`` (the ``lowbit`` preset's do).
        calib_batches: calibration batches (every step calibrates on them).
        val_batches: the validation subset the budget is measured on (``(input, label)``
            batches for ``max_drop``).
        max_drop, target_agreement: the budget (one of them), as :func:`fallback`.
        higher_bits: bits of raised layers (None: float).
        prune: step 3.
        progress: progress bars of the first calibration and the fallback.

    Returns:
        A :class:`ReconstructedFallback` (the quantized model, its config with the raised
        layers' overrides, the fallback report).

    Raises:
        ConfigError: a config without the ``reconstruct`` pass, a bad budget.
        DataError: as :func:`fallback`.
    """
    if "reconstruct" not in config.effective_passes:
        raise ConfigError("fallback_with_reconstruction: the config has no reconstruct pass")
    budget = {"max_drop": max_drop, "target_agreement": target_agreement}
    calib, val = list(calib_batches), list(val_batches)
    full = prepare(copy.deepcopy(model_float), config)
    calibrate(full, calib, progress=progress)
    if meets_budget(model_float, full, val, **budget):
        return ReconstructedFallback(full, config)
    q = _build(model_float, without_reconstruction(config), calib)
    report = fallback(
        model_float, q, val, calib_batches=calib, higher_bits=higher_bits, progress=progress,
        **{k: v for k, v in budget.items() if v is not None},
    )  # fmt: skip
    before = copy.deepcopy(q)
    reconstruct_with(q, calib, config)
    met = meets_budget(model_float, q, val, **budget)  # after the reconstruction
    if not met and report.met:
        # reconstruction on the calibration images cost validation accuracy: the fallback's
        # model without it meets the budget, so that one is returned
        cfg = report.quant_config(without_reconstruction(config))
        return ReconstructedFallback(before, cfg, report, reconstructed=False)
    result = ReconstructedFallback(q, report.quant_config(config), replace(report, met=met))
    if not prune or not met:
        return result
    kept = list(report.layers)
    for layer in reversed(report.layers):
        trial = [x for x in kept if x is not layer]
        cfg = replace(report, layers=trial).quant_config(config)
        candidate = _build(model_float, cfg, calib)
        result.tries += 1
        if meets_budget(model_float, candidate, val, **budget):
            kept, result.model, result.config = trial, candidate, cfg
            result.lowered.append(layer.name)
    result.report = replace(report, layers=kept, met=True)
    return result
