"""Weight-oscillation tracking and freezing for quantization-aware training.

Follows "Overcoming Oscillations in Quantization-Aware Training" (Nagel et al., ICML 2022,
arXiv 2203.11086), which VVTQ (Huang et al., TMLR 2024, arXiv 2307.00331) borrows: a latent weight
oscillates when its integer value moves up then down (or down then up) on consecutive changes.
An exponential moving average of those flips gives each weight an oscillation frequency; weights
whose frequency exceeds a threshold are frozen to the rounded moving average of their integer
value. Unlike VVTQ's code, where the frozen values never reach the forward pass, here
:meth:`OscillationTracker.apply` substitutes them, so frozen weights really stop moving (and get no
gradient).

Next to that thresholded EMA, the tracker keeps a threshold-free *window* count on the integer
codes the forward pass really uses (frozen weights at their frozen value): per weight, how many
times its code reversed direction (moved up after its last move was down, or the reverse) and
whether it changed at all since :meth:`OscillationTracker.reset_window`. The fraction of weights
with at least one reversal in a window (an epoch, say) measures oscillation without choosing a
momentum or a threshold.

The state lives in buffers (saved with the model, so a resumed run continues where it stopped);
they are created at the first update, with the weight's shape, and resized when a state dict is
loaded into a fresh tracker. A state dict saved before the window buffers existed loads with an
empty window.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError

__all__ = ["OscillationTracker"]

_WINDOW = ("code_prev", "code_sign", "window_flips", "window_changed")
_BUFFERS = ("prev_int", "prev_sign", "ema_osc", "ema_int", "frozen", "frozen_int", *_WINDOW)


class OscillationTracker(nn.Module):
    """Tracks integer flip-flops of one weight tensor and optionally freezes oscillating weights.

    Args:
        momentum: EMA momentum of the oscillation frequency and of the integer value (Nagel et al.
            use 0.01; VVTQ's tracker 0.001, which needs thousands of steps to react).
        threshold: frequency above which a weight counts as oscillating (and is frozen).
        freeze: freeze oscillating weights; ``False`` only tracks (VVTQ's behaviour).

    Example:
        >>> tr = OscillationTracker(momentum=0.01, threshold=0.1)
        >>> x_int = tr.apply(x_int)      # frozen weights replaced (no-op before any update)
        >>> tr.update(x_int.detach())    # once per training step
    """

    def __init__(self, momentum: float = 0.01, threshold: float = 0.1, freeze: bool = True) -> None:
        super().__init__()
        if not 0 < momentum <= 1:
            raise ConfigError(f"oscillation momentum must be in (0, 1], got {momentum}")
        if not 0 < threshold < 1:
            raise ConfigError(f"oscillation threshold must be in (0, 1), got {threshold}")
        self.momentum = float(momentum)
        self.threshold = float(threshold)
        self.freeze = bool(freeze)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_int", torch.empty(0))
        self.register_buffer("prev_sign", torch.empty(0, dtype=torch.int8))
        self.register_buffer("ema_osc", torch.empty(0))
        self.register_buffer("ema_int", torch.empty(0))
        self.register_buffer("frozen", torch.empty(0, dtype=torch.bool))
        self.register_buffer("frozen_int", torch.empty(0))
        # threshold-free window statistics on the codes the forward pass uses
        self.register_buffer("code_prev", torch.empty(0))
        self.register_buffer("code_sign", torch.empty(0, dtype=torch.int8))
        self.register_buffer("window_flips", torch.empty(0, dtype=torch.int32))
        self.register_buffer("window_changed", torch.empty(0, dtype=torch.bool))
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))

    # --- state ------------------------------------------------------------------------------
    def _init_state(self, x_int: Tensor) -> None:
        x = x_int.detach().float()
        self.prev_int = x.clone()
        self.prev_sign = torch.zeros_like(x, dtype=torch.int8)
        self.ema_osc = torch.zeros_like(x)
        self.ema_int = x.clone()
        self.frozen = torch.zeros_like(x, dtype=torch.bool)
        self.frozen_int = torch.zeros_like(x)
        self._init_window(x)

    def _init_window(self, codes: Tensor, sign: Tensor | None = None) -> None:
        self.code_prev = codes.clone()
        if sign is None or sign.shape != codes.shape:
            sign = torch.zeros_like(codes, dtype=torch.int8)
        self.code_sign = sign.to(torch.int8).clone()
        self.window_flips = torch.zeros_like(codes, dtype=torch.int32)
        self.window_changed = torch.zeros_like(codes, dtype=torch.bool)
        self.window_steps.zero_()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in _BUFFERS:
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        absent = [prefix + n for n in (*_WINDOW, "window_steps") if prefix + n not in state_dict]
        if absent:  # saved before the window statistics existed: start an empty window
            for key in absent:
                if key in missing_keys:
                    missing_keys.remove(key)
            # the last direction of the latent codes is that of the used ones (frozen codes
            # never move again, so their direction does not matter)
            self._init_window(self._codes(self.prev_int), self.prev_sign)

    @property
    def initialized(self) -> bool:
        """Whether the tracker has seen a first update."""
        return self.prev_int.numel() > 0

    # --- per step ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, x_int: Tensor) -> None:
        """Records the integer weights of one training step and freezes new oscillators.

        Args:
            x_int: the integer values (as floats) the weight quantizer produced this step.
        """
        x = x_int.detach().float()
        if not self.initialized or self.prev_int.shape != x.shape:
            self._init_state(x)
            self.steps.fill_(1)
            return
        delta = x - self.prev_int
        sign = torch.sign(delta).to(torch.int8)
        flipped = (sign * self.prev_sign) < 0
        m = self.momentum
        self.ema_osc.mul_(1 - m).add_(flipped.float(), alpha=m)
        self.ema_int.mul_(1 - m).add_(x, alpha=m)
        self.prev_sign = torch.where(delta != 0, sign, self.prev_sign)
        self.prev_int = x.clone()
        if self.freeze:
            new = (self.ema_osc > self.threshold) & ~self.frozen
            if bool(new.any()):
                self.frozen_int = torch.where(new, torch.round(self.ema_int), self.frozen_int)
                self.frozen |= new
        self.steps.add_(1)
        self._update_window(self._codes(x))

    def _codes(self, x: Tensor) -> Tensor:
        """The integer codes the forward pass uses for latent codes ``x`` (frozen ones replaced)."""
        if self.freeze and self.frozen.shape == x.shape:
            return torch.where(self.frozen, self.frozen_int, x)
        return x.clone()

    def _update_window(self, codes: Tensor) -> None:
        if self.code_prev.shape != codes.shape:
            self._init_window(codes)
            return
        delta = codes - self.code_prev
        sign = torch.sign(delta).to(torch.int8)
        self.window_flips += ((sign * self.code_sign) < 0).to(torch.int32)
        self.window_changed |= delta != 0
        self.code_sign = torch.where(delta != 0, sign, self.code_sign)
        self.code_prev = codes
        self.window_steps.add_(1)

    def reset_window(self) -> None:
        """Starts a new window of flip counts (the last code and direction are kept)."""
        if self.initialized:
            self.window_flips.zero_()
            self.window_changed.zero_()
        self.window_steps.zero_()

    def apply(self, x_int: Tensor) -> Tensor:
        """Replaces the frozen weights' integers by their frozen values (no gradient there)."""
        if not self.freeze or not self.initialized or self.frozen.shape != x_int.shape:
            return x_int
        return torch.where(self.frozen, self.frozen_int.to(x_int.dtype), x_int)

    # --- statistics -------------------------------------------------------------------------
    def oscillating_fraction(self) -> float:
        """Fraction of weights whose oscillation frequency is above the threshold now."""
        if not self.initialized:
            return 0.0
        return float((self.ema_osc > self.threshold).float().mean())

    def frozen_fraction(self) -> float:
        """Fraction of weights frozen so far."""
        if not self.initialized:
            return 0.0
        return float(self.frozen.float().mean())

    def counts(self) -> tuple[int, int, int]:
        """``(oscillating, frozen, total)`` weight counts."""
        if not self.initialized:
            return 0, 0, 0
        return (
            int((self.ema_osc > self.threshold).sum()),
            int(self.frozen.sum()),
            self.ema_osc.numel(),
        )

    def window_counts(self, min_flips: int = 1) -> tuple[int, int, int]:
        """``(flipped, changed, total)`` weight counts of the current window.

        ``flipped``: weights whose code reversed direction at least ``min_flips`` times since
        :meth:`reset_window`; ``changed``: weights whose code changed at all.
        """
        if not self.initialized or self.window_flips.numel() == 0:
            return 0, 0, 0
        return (
            int((self.window_flips >= min_flips).sum()),
            int(self.window_changed.sum()),
            self.window_flips.numel(),
        )

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, threshold={self.threshold}, freeze={self.freeze}"
