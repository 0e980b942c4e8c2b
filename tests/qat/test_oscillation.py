"""Tests of oscillation tracking and freezing (Nagel et al., 2022)."""

from __future__ import annotations

import pytest
import torch

from vitquant.errors import ConfigError
from vitquant.methods.vvtq.oscillation import OscillationTracker


def _reference_ema(seq: list[float], m: float) -> float:
    """EMA of sign flips of consecutive non-zero integer changes, re-derived by hand."""
    ema, prev, prev_sign = 0.0, seq[0], 0
    for x in seq[1:]:
        d = x - prev
        sign = (d > 0) - (d < 0)
        ema = (1 - m) * ema + m * float(sign * prev_sign < 0)
        if d != 0:
            prev_sign = sign
        prev = x
    return ema


def test_tracks_flip_flops_like_reference() -> None:
    seqs = [
        [0, 1, 0, 1, 0, 1, 0, 1, 0, 1] * 3,  # oscillates every step
        list(range(30)),  # monotone: never oscillates
        [0, 0, 1, 1, 1, 0, 0, 2, 2, 1] * 3,  # irregular
    ]
    tr = OscillationTracker(momentum=0.1, threshold=0.5, freeze=False)
    for t in range(30):
        tr.update(torch.tensor([float(s[t]) for s in seqs]))
    ref = torch.tensor([_reference_ema([float(v) for v in s], 0.1) for s in seqs])
    torch.testing.assert_close(tr.ema_osc, ref)
    assert tr.ema_osc[0] > 0.5 and tr.ema_osc[1] == 0
    assert tr.frozen_fraction() == 0.0
    assert tr.oscillating_fraction() == pytest.approx(1 / 3)


def test_freezes_oscillating_weights_to_rounded_ema_and_stops_their_gradient() -> None:
    tr = OscillationTracker(momentum=0.2, threshold=0.3, freeze=True)
    at_freeze = None
    for t in range(20):
        tr.update(torch.tensor([float(t % 2), float(t)]))
        if at_freeze is None and bool(tr.frozen[0]):
            at_freeze = float(torch.round(tr.ema_int[0]))
    assert bool(tr.frozen[0]) and not bool(tr.frozen[1])
    assert at_freeze is not None and float(tr.frozen_int[0]) == at_freeze
    latent = torch.tensor([0.0, 5.0], requires_grad=True)
    out = tr.apply(latent)
    assert float(out[0].detach()) == float(tr.frozen_int[0]) and float(out[1].detach()) == 5.0
    out.sum().backward()
    assert latent.grad.tolist() == [0.0, 1.0]
    assert tr.frozen_fraction() == 0.5


def test_state_dict_round_trip_into_fresh_tracker() -> None:
    tr = OscillationTracker(momentum=0.2, threshold=0.3)
    for t in range(12):
        tr.update(torch.tensor([[float(t % 2), 1.0], [float(t), 2.0]]))
    fresh = OscillationTracker(momentum=0.2, threshold=0.3)
    fresh.load_state_dict(tr.state_dict())
    for name, buf in tr.named_buffers():
        torch.testing.assert_close(getattr(fresh, name), buf)
    x = torch.tensor([[0.0, 1.0], [12.0, 2.0]])
    tr.update(x)
    fresh.update(x)
    torch.testing.assert_close(fresh.ema_osc, tr.ema_osc)


def test_apply_is_identity_before_updates_and_bad_options() -> None:
    tr = OscillationTracker()
    x = torch.randn(3)
    assert tr.apply(x) is x
    with pytest.raises(ConfigError):
        OscillationTracker(momentum=0.0)
    with pytest.raises(ConfigError):
        OscillationTracker(threshold=1.5)
