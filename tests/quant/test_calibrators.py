"""Calibrators against independent numpy references written from the algorithms' descriptions.

The references (``ref_*``) are plain numpy with loops over candidates, following
pytorch-quantization's published description (percentile = CDF crossing, mse over bin centres
from bin 128, TensorRT's KL search), not the torch implementation's prefix-sum tricks.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from vitquant.errors import ConfigError, VitquantError
from vitquant.quant.calibrators import (
    CALIBRATION_METHODS,
    CalibrationError,
    HistogramCalibrator,
    MaxCalibrator,
    NonFiniteError,
    amax_from_histogram,
    compute_amax,
    make_calibrator,
)
from vitquant.quant.observers import HistogramObserver, MinMaxObserver

# ----------------------------------------------------------------------------------------------
# numpy references


def ref_range(batch_maxima: list[float]) -> float:
    """Smallest power of two >= the running max, growing batch by batch (never shrinking)."""
    r = 0.0
    for m in batch_maxima:
        if m > r:
            r = 1.0
            while r < m:
                r *= 2.0
            while r / 2.0 >= m:
                r /= 2.0
    return r


def ref_hist(batches: list[np.ndarray], num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of |x| of all batches over [0, R], R from the growth rule."""
    a = [np.abs(b.astype(np.float64)).ravel() for b in batches]
    r = ref_range([float(x.max()) for x in a])
    hist, edges = np.histogram(np.concatenate(a), bins=num_bins, range=(0.0, r))
    return hist, edges


def ref_percentile(hist: np.ndarray, edges: np.ndarray, p: float) -> float:
    total = hist.sum()
    running = 0
    for i, c in enumerate(hist):
        running += c
        if running >= Fraction(int(total)) * Fraction(str(p)) / 100:
            return float(edges[i + 1])
    return float(edges[-1])


def ref_fq(x: np.ndarray, amax: float, bits: int, unsigned: bool) -> np.ndarray:
    qmax = 2**bits - 1 if unsigned else 2 ** (bits - 1) - 1
    qmin = 0 if unsigned else -(2 ** (bits - 1))
    scale = amax / qmax
    return np.clip(np.round(x / scale), qmin, qmax) * scale


def ref_mse_errors(hist, edges, bits, unsigned, start=128):
    """sum_i count_i (fq(c_i; amax) - c_i)^2 for amax = each centre from bin ``start`` up."""
    centres = (edges[1:] + edges[:-1]) / 2
    cands = centres[start:]
    fq = ref_fq(centres[None, :], cands[:, None], bits, unsigned)  # [candidates, bins]
    return ((fq - centres[None, :]) ** 2 * hist[None, :]).sum(1), cands


def ref_mse(hist, edges, bits=8, unsigned=False) -> float:
    errs, cands = ref_mse_errors(hist, edges, bits, unsigned)
    return float(cands[int(np.argmin(errs))])


def ref_entropy_kls(hist, bits, unsigned):
    """KL(P || Q) for each candidate i, TensorRT style (one direct evaluation per candidate)."""
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    n = len(bins)
    nq = 2 ** (bits - 1 + int(unsigned))
    kls, cands = [], []
    for i in range(min(2 ** (bits - 1), n), n + 1):
        ref = bins[:i].copy()
        ref[i - 1] += bins[i:].sum()
        # merge bins[:i] into nq groups, then spread each group over its nonzero bins
        group = np.digitize(np.arange(i), np.linspace(0, i, nq + 1)) - 1
        nonzero = bins[:i] > 0
        sums = np.bincount(group, weights=bins[:i], minlength=nq)
        counts = np.bincount(group, weights=nonzero, minlength=nq)
        cand = np.where(nonzero, sums[group] / np.maximum(counts[group], 1), 0.0)
        p, q = ref / ref.sum(), cand / cand.sum()
        if np.any((p > 0) & (q == 0)):
            kls.append(math.inf)
        else:
            m = p > 0
            kls.append(float(np.sum(p[m] * np.log(p[m] / q[m]))))
        cands.append(i)
    return np.array(kls), np.array(cands)


def ref_entropy(hist, edges, bits=8, unsigned=False) -> float:
    kls, cands = ref_entropy_kls(hist, bits, unsigned)
    best = len(kls) - 1 - int(np.argmin(kls[::-1]))
    return float(edges[cands[best]])


# ----------------------------------------------------------------------------------------------
# data


def _data(kind: str, n: int = 40_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "laplace":
        return rng.laplace(size=n).astype(np.float32)
    if kind == "outliers":
        x = rng.standard_normal(n)
        x[rng.choice(n, 20, replace=False)] *= 40.0
        return x.astype(np.float32)
    if kind == "softmax":
        logits = rng.standard_normal((n // 50, 50)) * 3.0
        e = np.exp(logits - logits.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)).astype(np.float32).ravel()
    raise ValueError(kind)


KINDS = ["gaussian", "laplace", "outliers", "softmax"]


def _assert_mse_pick(amax: float, hist, edges, bits, unsigned):
    assert amax == pytest.approx(ref_mse(hist, edges, bits, unsigned), rel=1e-7)


def _assert_entropy_pick(amax: float, hist, edges, bits, unsigned):
    assert amax == pytest.approx(ref_entropy(hist, edges, bits, unsigned), rel=1e-7)


# ----------------------------------------------------------------------------------------------
# one batch


@pytest.mark.parametrize("kind", KINDS)
def test_histogram_matches_numpy(kind):
    x = _data(kind)
    cal = HistogramCalibrator()
    cal.collect(torch.from_numpy(x))
    hist, edges = ref_hist([x], 2048)
    np.testing.assert_array_equal(cal.hist.numpy(), hist)
    np.testing.assert_allclose(cal.bin_edges.numpy(), edges, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_max_and_percentile_vs_numpy(kind):
    x = _data(kind)
    t = torch.from_numpy(x)
    assert float(compute_amax(t, "max")) == float(np.abs(x).max())
    hist, edges = ref_hist([x], 2048)
    for p in (99.0, 99.9, 99.99, 100.0):
        amax = float(compute_amax(t, "percentile", percentile=p))
        assert amax == pytest.approx(ref_percentile(hist, edges, p), rel=1e-6)
        # the empirical quantile of |x| lies in the chosen bin
        k = math.ceil(Fraction(len(x)) * Fraction(str(p)) / 100)  # exact rank of the quantile
        q = np.sort(np.abs(x))[k - 1]
        width = edges[1] - edges[0]
        assert amax - width <= q <= amax


@pytest.mark.parametrize("kind", KINDS)
def test_mse_vs_numpy(kind):
    x = _data(kind)
    unsigned = kind == "softmax"
    hist, edges = ref_hist([x], 2048)
    for bits in (8, 4):
        amax = float(compute_amax(torch.from_numpy(x), "mse", bits=bits, unsigned=unsigned))
        _assert_mse_pick(amax, hist, edges, bits, unsigned)


@pytest.mark.parametrize("kind", KINDS)
def test_entropy_vs_numpy(kind):
    x = _data(kind)
    unsigned = kind == "softmax"
    hist, edges = ref_hist([x], 2048)
    amax = float(compute_amax(torch.from_numpy(x), "entropy", unsigned=unsigned))
    _assert_entropy_pick(amax, hist, edges, 8, unsigned)


@pytest.mark.parametrize("bits,unsigned", [(4, False), (5, True), (6, False)])
def test_entropy_other_bits_small_histogram(bits, unsigned):
    x = _data("laplace", 20_000, seed=3)
    x = np.abs(x) if unsigned else x
    hist, edges = ref_hist([x], 256)
    cal = HistogramCalibrator(num_bins=256)
    cal.collect(torch.from_numpy(x))
    amax = float(cal.compute_amax("entropy", bits=bits, unsigned=unsigned))
    _assert_entropy_pick(amax, hist, edges, bits, unsigned)


def test_entropy_outliers_in_empty_last_bin_are_infinite():
    # all mass in bins 0..9 except one outlier at bin 200: candidates whose last bin is empty
    # while outliers exist have infinite KL and must never win
    hist = np.zeros(256, dtype=np.int64)
    hist[:10] = 100
    hist[200] = 1
    edges = np.linspace(0, 1, 257)
    amax = float(amax_from_histogram(torch.from_numpy(hist), torch.from_numpy(edges), "entropy"))
    kls, cands = ref_entropy_kls(hist, 8, False)
    assert np.isinf(kls[cands - 1 < 200]).all()
    assert amax == pytest.approx(ref_entropy(hist, edges))


# ----------------------------------------------------------------------------------------------
# growth across batches


def _growing_batches(kind: str) -> list[np.ndarray]:
    return [_data(kind, 8_000, seed=s) * f for s, f in enumerate([0.3, 1.0, 2.7, 2.0, 9.0])]


@pytest.mark.parametrize("kind", KINDS)
def test_growing_histogram_equals_histogram_of_all_data(kind):
    batches = _growing_batches(kind)
    cal = HistogramCalibrator()
    for b in batches:
        cal.collect(torch.from_numpy(b))
    hist, edges = ref_hist(batches, 2048)
    np.testing.assert_array_equal(cal.hist.numpy(), hist)
    assert cal.bin_edges[-1].item() == edges[-1]
    unsigned = kind == "softmax"
    true_max = max(float(np.abs(b).max()) for b in batches)
    hmax = float(cal.compute_amax("max"))  # right edge of the last nonzero bin
    assert hmax == edges[np.nonzero(hist)[0][-1] + 1] and true_max <= hmax < true_max + edges[1]
    p = float(cal.compute_amax("percentile", percentile=99.9))
    assert p == pytest.approx(ref_percentile(hist, edges, 99.9), rel=1e-6)
    _assert_mse_pick(float(cal.compute_amax("mse", unsigned=unsigned)), hist, edges, 8, unsigned)
    ent = float(cal.compute_amax("entropy", unsigned=unsigned))
    _assert_entropy_pick(ent, hist, edges, 8, unsigned)


def test_growth_is_order_independent_and_merge_is_exact():
    batches = [torch.from_numpy(b) for b in _growing_batches("laplace")]
    fwd, bwd = HistogramCalibrator(), HistogramCalibrator()
    for b in batches:
        fwd.collect(b)
    for b in reversed(batches):
        bwd.collect(b)
    assert torch.equal(fwd.hist, bwd.hist)
    a, b = HistogramCalibrator(), HistogramCalibrator()
    for i, t in enumerate(batches):
        (a if i % 2 else b).collect(t)
    a.merge(b)
    assert torch.equal(a.hist, fwd.hist) and a.count == fwd.count
    for m in CALIBRATION_METHODS:
        assert torch.equal(a.compute_amax(m), fwd.compute_amax(m))


def test_all_zero_batches_then_data():
    cal = HistogramCalibrator(num_bins=64)
    cal.collect(torch.zeros(100))
    assert float(cal.compute_amax("entropy")) == 0.0
    x = _data("gaussian", 2000)
    cal.collect(torch.from_numpy(x))
    hist, _ = np.histogram(
        np.abs(np.concatenate([np.zeros(100), x])), bins=64, range=(0, ref_range([np.abs(x).max()]))
    )
    np.testing.assert_array_equal(cal.hist.numpy(), hist)


def test_unsigned_calibrator_counts_negatives_as_zero():
    x = torch.tensor([-3.0, -1.0, 0.5, 1.0])
    cal = HistogramCalibrator(num_bins=4, unsigned=True)
    cal.collect(x)
    assert cal.hist.tolist() == [2, 0, 1, 1] and cal.bin_edges[-1] == 1.0
    assert float(cal.compute_amax("max")) == 1.0


def test_bf16_and_large_batches_are_counted_exactly(monkeypatch):
    import vitquant.quant.collectors as C

    monkeypatch.setattr(C, "_CHUNK", 1000)  # force several histc chunks
    x = _data("gaussian", 5_000)
    cal = HistogramCalibrator(num_bins=128)
    cal.collect(torch.from_numpy(x).to(torch.bfloat16))
    xb = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    hist, _ = ref_hist([xb], 128)
    np.testing.assert_array_equal(cal.hist.numpy(), hist)


def test_cpu_bincount_path_matches_histc_path_and_numpy():
    # float32 uses exact bin indices + bincount, float64 torch.histc: same counts, including a
    # value equal to the range (last bin), values on bin edges and exact zeros
    x = _data("laplace", 10_000)
    x[:4] = [4.0, -4.0, 0.5, 0.0]
    x = np.clip(x, -4.0, 4.0)
    for unsigned in (False, True):
        a, b = HistogramCalibrator(unsigned=unsigned), HistogramCalibrator(unsigned=unsigned)
        a.collect(torch.from_numpy(x).reshape(100, 100).T)  # non-contiguous too
        b.collect(torch.from_numpy(x).double())
        assert torch.equal(a.hist, b.hist)
        ref = np.histogram(np.maximum(x, 0) if unsigned else np.abs(x), bins=2048, range=(0, 4))[0]
        np.testing.assert_array_equal(a.hist.numpy(), ref)


# ----------------------------------------------------------------------------------------------
# max / minmax


@pytest.mark.parametrize("axis", [None, 0, -1, 1])
def test_max_calibrator_per_channel(axis):
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((4, 6, 5)).astype(np.float32) * s for s in (1, 3, 0.5)]
    cal = MaxCalibrator(axis=axis)
    for b in batches:
        cal.collect(torch.from_numpy(b))
    a = np.abs(np.stack(batches))  # [batch, 4, 6, 5]
    if axis is None:
        ref = a.max()
    else:
        keep = axis % 3 + 1
        ref = a.max(axis=tuple(d for d in range(4) if d != keep))
    np.testing.assert_array_equal(cal.compute_amax().numpy(), ref)


@pytest.mark.parametrize("axis", [None, 0, -1])
def test_minmax_observer(axis):
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((3, 7)).astype(np.float32) + s for s in (2.0, -1.0, 0.0)]
    obs = MinMaxObserver(axis=axis)
    for b in batches:
        obs.collect(torch.from_numpy(b))
    lo, hi = obs.minmax()
    allx = np.concatenate(batches, axis=0 if axis != 0 else 1)
    red = None if axis is None else (1 if axis % 2 == 0 else 0)
    np.testing.assert_array_equal(lo.numpy(), allx.min(axis=red))
    np.testing.assert_array_equal(hi.numpy(), allx.max(axis=red))
    np.testing.assert_array_equal(
        obs.compute_amax().numpy(), np.maximum(-allx.min(axis=red), allx.max(axis=red))
    )


def test_histogram_observer_percentile_and_mse():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(30_000) * 0.5 + 1.0).astype(np.float32)  # asymmetric
    x[:5] = [9.0, 8.5, -4.0, 7.0, 6.0]  # outliers
    obs = HistogramObserver(num_bins=512)
    obs.collect(torch.from_numpy(x[:10_000]))
    obs.collect(torch.from_numpy(x[10_000:]))
    r = ref_range([float(np.abs(x).max())])
    hist, edges = np.histogram(x.astype(np.float64), bins=512, range=(-r, r))
    # histc bins x + R in float32: a value within an ulp of an edge may move one bin
    assert np.abs(obs.hist.numpy() - hist).sum() <= 20 and obs.hist.sum() == len(x)
    lo, hi = obs.minmax("max")
    assert (float(lo), float(hi)) == (float(x.min()), float(x.max()))
    lo, hi = obs.minmax("percentile", percentile=99.9)
    width = edges[1] - edges[0]
    assert float(lo) <= np.quantile(x, 0.001) + width and float(hi) >= np.quantile(x, 0.999)
    assert float(hi) <= np.quantile(x, 0.999) + width and float(lo) >= np.quantile(x, 0.001) - width
    lo, hi = (float(v) for v in obs.minmax("mse", bits=4))

    def err(a, b):  # numpy affine fake-quant error on the histogram's centres
        c = (edges[1:] + edges[:-1]) / 2
        a, b = min(a, 0.0), max(b, 0.0)
        s = (b - a) / 15
        z = np.clip(np.round(-a / s), 0, 15)
        return float(np.sum(hist * ((np.clip(np.round(c / s) + z, 0, 15) - z) * s - c) ** 2))

    full = err(float(x.min()), float(x.max()))
    assert err(lo, hi) < full  # clipping the outliers pays off at 4 bits
    assert hi < float(x.max()) and lo >= float(x.min())
    # hi is a coordinate-wise optimum: no other positive edge is better for this lo
    cands = edges[edges >= 0]
    assert err(lo, hi) <= min(err(lo, c) for c in cands if c <= x.max()) * (1 + 1e-4)


# ----------------------------------------------------------------------------------------------
# errors, state, API


def test_errors():
    with pytest.raises(ConfigError, match="max, percentile, mse, entropy"):
        make_calibrator("kl")
    with pytest.raises(ConfigError):
        compute_amax(torch.ones(3), "median")
    with pytest.raises(ConfigError):
        make_calibrator("entropy", axis=0)
    with pytest.raises(ConfigError):
        HistogramCalibrator(num_bins=1)
    cal = HistogramCalibrator()
    with pytest.raises(CalibrationError, match="saw no data"):
        cal.compute_amax("entropy")
    with pytest.raises(CalibrationError, match="saw no data"):
        MaxCalibrator().compute_amax()
    with pytest.raises(CalibrationError, match="saw no data"):
        MinMaxObserver().minmax()
    cal.collect(torch.randn(100))
    for p in (0.0, -1.0, 100.5):
        with pytest.raises(ConfigError, match="percentile"):
            cal.compute_amax("percentile", percentile=p)
    for bits in (1, 17, 2.5):
        with pytest.raises(ConfigError, match="bits"):
            cal.compute_amax("mse", bits=bits)
    with pytest.raises(ConfigError, match="reads only 'max'"):
        MaxCalibrator().compute_amax("entropy")
    with pytest.raises(ConfigError, match="bin edges"):
        amax_from_histogram(torch.ones(4), torch.ones(4), "max")


@pytest.mark.parametrize(
    "make",
    [
        lambda: MaxCalibrator(),
        lambda: MaxCalibrator(axis=1),
        lambda: HistogramCalibrator(),
        lambda: MinMaxObserver(axis=0),
        lambda: HistogramObserver(),
    ],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_raises(make, bad):
    x = torch.randn(4, 5)
    x[2, 3] = bad
    with pytest.raises(NonFiniteError, match="NaN or inf") as err:
        make().collect(x)
    assert isinstance(err.value, VitquantError)


@pytest.mark.parametrize(
    "make,read",
    [
        (lambda: MaxCalibrator(axis=0), lambda c: c.compute_amax()),
        (lambda: HistogramCalibrator(), lambda c: c.compute_amax("entropy")),
        (lambda: MinMaxObserver(axis=-1), lambda c: torch.stack(c.minmax())),
        (lambda: HistogramObserver(), lambda c: torch.stack(c.minmax("percentile"))),
    ],
)
def test_state_dict_round_trip(make, read, tmp_path):
    a = make()
    for s in (1.0, 4.0):
        a.collect(torch.randn(8, 16) * s)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = make()
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(read(a), read(b))
    b.reset()
    with pytest.raises(CalibrationError):
        read(b)


def test_collect_has_no_grad_and_does_not_change_input():
    x = torch.randn(10, requires_grad=True)
    y = x * 2
    before = y.detach().clone()
    for cal in (MaxCalibrator(), HistogramCalibrator(), MinMaxObserver(), HistogramObserver()):
        cal.collect(y)
    assert torch.equal(y.detach(), before)


def test_make_calibrator_and_one_shot():
    assert isinstance(make_calibrator("max", axis=0), MaxCalibrator)
    for m in ("percentile", "mse", "entropy"):
        cal = make_calibrator(m, num_bins=512)
        assert isinstance(cal, HistogramCalibrator) and cal.num_bins == 512
    assert float(compute_amax(torch.tensor([0.5, -2.0]), "max")) == 2.0


def test_readers_are_fast():
    import time

    cal = HistogramCalibrator()
    cal.collect(torch.randn(200_000))
    for m in CALIBRATION_METHODS:
        t = time.perf_counter()
        cal.compute_amax(m)
        assert time.perf_counter() - t < 1.0, m


def test_all_reduce_is_noop_without_process_group():
    cal = HistogramCalibrator()
    cal.collect(torch.randn(100))
    before = cal.state_dict()
    cal.all_reduce()
    after = cal.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


_DIST_SCRIPT = """
import sys, torch, torch.distributed as dist
from vitquant.quant.calibrators import HistogramCalibrator, MaxCalibrator
from vitquant.quant.observers import HistogramObserver, MinMaxObserver
rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
g = torch.Generator().manual_seed(0)
xs = [torch.randn(6, 4, generator=g) * s for s in (1.0, 5.0)]
def make():
    return [HistogramCalibrator(), MaxCalibrator(axis=1), MinMaxObserver(axis=1),
            HistogramObserver(), MinMaxObserver()]
solo, split = make(), make()
if rank == 0:  # solo: rank 1 sees no data at all
    for x in xs:
        for c in solo:
            c.collect(x)
for c in split:  # split: rank r sees batch r (rank 1's range is larger)
    c.collect(xs[rank])
for c in solo + split:
    c.all_reduce()
torch.save([c.state_dict() for c in solo + split], out)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_all_reduce_across_two_gloo_ranks(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_DIST_SCRIPT)
    init = f"file://{tmp_path / 'store'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", init, str(tmp_path / f"r{r}.pt")], env=env
        )
        for r in range(2)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    states = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 4, generator=g) * s for s in (1.0, 5.0)]
    ref = [
        HistogramCalibrator(),
        MaxCalibrator(axis=1),
        MinMaxObserver(axis=1),
        HistogramObserver(),
        MinMaxObserver(),
    ]
    for x in xs:
        for c in ref:
            c.collect(x)
    for r in range(2):  # every rank ends with the statistics of all the data, however split
        assert len(states[r]) == 2 * len(ref)
        for i, got in enumerate(states[r]):
            want = ref[i % len(ref)]
            assert set(got) == set(want.state_dict())
            for k, v in want.state_dict().items():
                assert torch.equal(v, got[k]), (r, i, type(want).__name__, k)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    batches = [torch.from_numpy(b) for b in _growing_batches("outliers")]
    cpu, gpu = HistogramCalibrator(), HistogramCalibrator()
    obs_c, obs_g = HistogramObserver(), HistogramObserver()
    for b in batches:
        cpu.collect(b)
        gpu.collect(b.cuda())
        obs_c.collect(b)
        obs_g.collect(b.cuda())
    assert torch.equal(cpu.hist, gpu.hist.cpu())
    for m in CALIBRATION_METHODS:
        assert torch.equal(cpu.compute_amax(m), gpu.compute_amax(m).cpu())
    assert (obs_c.hist - obs_g.hist.cpu()).abs().sum() <= 20
