"""Tests of the threshold-free oscillation measure: per-window counts of integer-code reversals.

Each count is re-derived independently with numpy from the integer sequences the tracker sees.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vitquant.methods.vvtq.method import oscillation_stats
from vitquant.methods.vvtq.oscillation import OscillationTracker
from vitquant.methods.vvtq.quantizer import VVTQQuantizer


def _np_reversals(seq: np.ndarray) -> tuple[int, bool]:
    """(number of direction reversals, changed at all) of one integer sequence.

    A reversal is a non-zero change whose sign is opposite to the last non-zero change.
    """
    moves = np.diff(seq.astype(np.float64))
    moves = moves[moves != 0]
    signs = np.sign(moves)
    return int(np.sum(signs[1:] != signs[:-1])), bool(moves.size > 0)


def _feed(tr: OscillationTracker, seqs: np.ndarray) -> None:
    for t in range(seqs.shape[1]):
        tr.update(torch.from_numpy(seqs[:, t].astype(np.float32)))


def test_window_counts_match_numpy_on_hand_made_sequences() -> None:
    seqs = np.array(
        [
            [0, 1, 0, 1, 0, 1, 0, 1],  # 6 reversals
            [0, 1, 2, 3, 4, 5, 6, 7],  # monotone: changes, never reverses
            [2, 2, 2, 2, 2, 2, 2, 2],  # never changes
            [0, 0, 1, 1, 1, 0, 0, 0],  # one reversal across a plateau
            [0, 1, 1, 2, 1, 1, 1, 2],  # 2 reversals
        ]
    )
    tr = OscillationTracker(momentum=0.01, threshold=0.5, freeze=False)
    _feed(tr, seqs)
    ref = [_np_reversals(s) for s in seqs]
    assert tr.window_flips.tolist() == [r[0] for r in ref] == [6, 0, 0, 1, 2]
    assert tr.window_changed.tolist() == [r[1] for r in ref]
    assert int(tr.window_steps) == seqs.shape[1] - 1
    # the EMA frequency of weight 0 is 6·0.01-ish: far below the threshold although it flips
    # at every step; the window count sees it
    assert tr.oscillating_fraction() == 0.0
    assert tr.window_counts(1) == (3, 4, 5)
    assert tr.window_counts(2) == (2, 4, 5)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(-2, 1), min_size=12, max_size=12),
        min_size=1,
        max_size=6,
    ),
    st.integers(2, 10),
)
def test_window_counts_and_reset_match_numpy(rows: list[list[int]], cut: int) -> None:
    seqs = np.array(rows)
    tr = OscillationTracker(momentum=0.05, threshold=0.9, freeze=False)
    _feed(tr, seqs[:, : cut + 1])
    first = [_np_reversals(s[: cut + 1]) for s in seqs]
    assert tr.window_flips.tolist() == [r[0] for r in first]
    tr.reset_window()
    assert tr.window_counts(1)[:2] == (0, 0)
    _feed(tr, seqs[:, cut + 1 :])
    # the new window counts reversals of changes after step `cut`, relative to the last
    # direction seen before the reset
    for i, s in enumerate(seqs):
        whole, _ = _np_reversals(s)
        before, _ = _np_reversals(s[: cut + 1])
        assert int(tr.window_flips[i]) == whole - before
        assert bool(tr.window_changed[i]) == bool(np.any(np.diff(s[cut:]) != 0))


def test_frozen_weights_stop_flipping_in_the_window() -> None:
    """With freezing, the window counts reversals of the codes the forward pass uses."""
    m, th = 0.3, 0.4
    seq = np.array([t % 2 for t in range(20)], dtype=np.float64)
    # independent re-derivation: EMA of reversals; frozen from the first step it exceeds th,
    # to round(EMA of the value); the used code is the frozen one from then on
    ema, ema_int, prev_sign, used = 0.0, seq[0], 0, [seq[0]]
    frozen_at, frozen_val = None, None
    for t in range(1, len(seq)):
        d = seq[t] - seq[t - 1]
        sign = int(np.sign(d))
        ema = (1 - m) * ema + m * float(sign * prev_sign < 0)
        ema_int = (1 - m) * ema_int + m * seq[t]
        if d != 0:
            prev_sign = sign
        if frozen_at is None and ema > th:
            frozen_at, frozen_val = t, float(np.round(ema_int))
        used.append(frozen_val if frozen_at is not None else seq[t])
    assert frozen_at is not None and frozen_at < len(seq) - 3
    ref_flips, _ = _np_reversals(np.array(used))

    tr = OscillationTracker(momentum=m, threshold=th, freeze=True)
    for v in seq:
        tr.update(torch.tensor([float(v)]))
    assert bool(tr.frozen[0])
    assert int(tr.window_flips[0]) == ref_flips
    # without freezing the same sequence keeps reversing
    free = OscillationTracker(momentum=m, threshold=th, freeze=False)
    for v in seq:
        free.update(torch.tensor([float(v)]))
    assert int(free.window_flips[0]) == _np_reversals(seq)[0] > ref_flips


def test_window_survives_state_dict_and_old_state_dicts_load() -> None:
    tr = OscillationTracker(momentum=0.2, threshold=0.5, freeze=False)
    seqs = np.array([[0, 1, 0, 1, 0], [3, 2, 1, 2, 3]])
    _feed(tr, seqs)
    sd = tr.state_dict()
    fresh = OscillationTracker(momentum=0.2, threshold=0.5, freeze=False)
    fresh.load_state_dict(sd)
    assert fresh.window_flips.tolist() == tr.window_flips.tolist() == [3, 1]
    # a state dict written before the window buffers existed still loads (strict), empty window
    old = {
        k: v
        for k, v in sd.items()
        if k not in ("code_prev", "code_sign", "window_flips", "window_changed", "window_steps")
    }
    legacy = OscillationTracker(momentum=0.2, threshold=0.5, freeze=False)
    legacy.load_state_dict(old)
    assert legacy.window_counts(1) == (0, 0, 2)
    torch.testing.assert_close(legacy.ema_osc, tr.ema_osc)
    # weight 0 moves up after a down move (a reversal), weight 1 keeps going up (none)
    x = torch.tensor([1.0, 4.0])
    legacy.update(x)
    assert legacy.window_flips.tolist() == [1, 0]


def test_oscillation_stats_sums_quantizers_and_resets() -> None:
    model = nn.Module()
    model.a = VVTQQuantizer(2)
    model.b = VVTQQuantizer(2)
    seq_a = np.array([[0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 2, 1]])  # 2, 0, 1 reversals
    seq_b = np.array([[1, 0, 1, 1], [0, -1, -2, -2]])  # 1, 0 reversals
    for q, s in ((model.a, seq_a), (model.b, seq_b)):
        q.oscillation.freeze = False
        _feed(q.oscillation, s)
    ref = [_np_reversals(s) for s in (*seq_a, *seq_b)]
    n = len(ref)
    stats = oscillation_stats(model, reset=True)
    assert stats["flip_pct"] == pytest.approx(100 * sum(r[0] >= 1 for r in ref) / n)
    assert stats["flip2_pct"] == pytest.approx(100 * sum(r[0] >= 2 for r in ref) / n)
    assert stats["change_pct"] == pytest.approx(100 * sum(r[1] for r in ref) / n)
    assert stats["frozen_pct"] == 0.0
    after = oscillation_stats(model)
    assert after["flip_pct"] == after["change_pct"] == 0.0
    assert oscillation_stats(nn.Linear(2, 2)) == {}
