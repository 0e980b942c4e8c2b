"""Granularities against numpy reductions written per definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitquant.errors import ConfigError
from vitquant.quant.granularity import (
    PerChannel,
    PerGroup,
    PerHead,
    PerTensor,
    granularity_from_dict,
    granularity_from_str,
)


def _x(shape=(2, 5, 12), seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_per_tensor():
    x = _x()
    amax = PerTensor().reduce_amax(x)
    assert amax.shape == () and float(amax) == float(np.abs(x.numpy()).max())
    assert PerTensor().expand(amax, x) is amax


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_per_channel(axis):
    x = _x()
    g = PerChannel(axis)
    amax = g.reduce_amax(x)
    a = np.abs(x.numpy())
    ref = np.array([np.take(a, i, axis=axis).max() for i in range(a.shape[axis])])
    np.testing.assert_array_equal(amax.numpy(), ref)
    e = g.expand(amax, x)
    assert torch.all(x.abs() <= e)  # broadcasts, and bounds every element of its channel
    np.testing.assert_array_equal(torch.broadcast_to(e, x.shape).amax(dim=axis).numpy(), ref.max())


@pytest.mark.parametrize("axis", [-1, 1])
def test_per_head(axis):
    x = _x((3, 12, 12), seed=1)
    g = PerHead(num_heads=4, axis=axis)
    amax = g.reduce_amax(x)
    a = np.moveaxis(np.abs(x.numpy()), axis, -1)
    ref = np.array([a[..., h * 3 : (h + 1) * 3].max() for h in range(4)])
    np.testing.assert_array_equal(amax.numpy(), ref)
    e = torch.broadcast_to(g.expand(amax, x), x.shape)
    e_last = np.moveaxis(e.numpy(), axis, -1)
    for h in range(4):  # every element of head h gets head h's scale
        assert (e_last[..., h * 3 : (h + 1) * 3] == ref[h]).all()


def test_per_group():
    w = _x((6, 16), seed=2)
    g = PerGroup(group_size=4)
    amax = g.reduce_amax(w)
    ref = np.abs(w.numpy()).reshape(6, 4, 4).max(-1)
    np.testing.assert_array_equal(amax.numpy(), ref)
    e = g.expand(amax, w)
    assert e.shape == w.shape
    np.testing.assert_array_equal(e.numpy(), np.repeat(ref, 4, axis=1))
    g0 = PerGroup(group_size=3, axis=0)
    np.testing.assert_array_equal(
        g0.reduce_amax(w).numpy(), np.abs(w.numpy()).reshape(2, 3, 16).max(1)
    )


def test_errors_and_round_trip():
    with pytest.raises(ConfigError, match="heads"):
        PerHead(num_heads=5).reduce_amax(_x())
    with pytest.raises(ConfigError, match="group_size"):
        PerGroup(group_size=5).reduce_amax(_x())
    with pytest.raises(ConfigError, match="axis"):
        PerChannel(axis=3).reduce_amax(_x())
    with pytest.raises(ConfigError, match="unknown granularity"):
        granularity_from_str("row")
    with pytest.raises(ConfigError, match="num_heads"):
        granularity_from_str("head")
    with pytest.raises(ConfigError):
        granularity_from_str("channel", bogus=1)
    with pytest.raises(ConfigError):
        PerGroup(group_size=0)
    for g in (PerTensor(), PerChannel(1), PerHead(3), PerGroup(32, axis=0)):
        d = g.to_dict()
        assert granularity_from_dict(d) == g and type(g).from_dict(d) == g
        assert granularity_from_str(d.pop("kind"), **d) == g
    assert granularity_from_str("Tensor") == PerTensor()
