"""vitquant.methods.ptq.reconstruct: block reconstruction (BRECQ with AdaRound) of a W4A4 model
lowers every block's output error against the float model, leaves the weights exactly on the
grid of the unchanged round-to-nearest quantizers, lowers to integer kernels, is reproducible,
and refuses bad input with one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import vitquant
from helpers import block_outputs, randomize_affine
from vitquant.data import build_dataset, subset
from vitquant.errors import ConfigError, DataError
from vitquant.methods.ptq.reconstruct import ReconstructConfig, ReconstructReport, reconstruct
from vitquant.quant import QuantConfig, QuantLinear, calibrate, named_quantizers, prepare
from vitquant.runtime import Int8Block, lower

W4A4 = QuantConfig("ft1", wbits=4, abits=4)
FAST = ReconstructConfig(iterations=60, batch_size=32, progress=False)


def make_model(seed: int = 0) -> nn.Module:
    """A random nano ViT (random affine parameters, 3x the init weights: attention that is not
    uniform, so errors inside the blocks reach the logits), as in tests/quant/test_analyze.py."""
    torch.manual_seed(seed)
    model = vitquant.create_model("vit_nano_patch4_28").eval()
    randomize_affine(model, seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight *= 3.0
    return model


@pytest.fixture(scope="module")
def batches() -> list[Tensor]:
    ds = subset(build_dataset("digits", "train", img_size=28, train_transform=False), 192, seed=0)
    return [x for x, _ in DataLoader(ds, batch_size=64)]


@pytest.fixture(scope="module")
def models(
    batches: list[Tensor],
) -> tuple[nn.Module, nn.Module, nn.Module, ReconstructReport]:
    """(float, plain calibrated W4A4, reconstructed W4A4, report); calibration on 128 images."""
    float_model = make_model()
    plain = prepare(copy.deepcopy(float_model), W4A4)
    calibrate(plain, batches[:2], progress=False)
    rec = copy.deepcopy(plain)
    report = reconstruct(float_model, rec, batches[:2], FAST)
    return float_model, plain, rec, report


def rel_mse(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def weight_quantizers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.blocks.named_modules() if isinstance(m, QuantLinear)}


def test_lowers_each_block_error(
    batches: list[Tensor], models: tuple[nn.Module, nn.Module, nn.Module, ReconstructReport]
) -> None:
    float_model, plain, rec, report = models
    for images in (torch.cat(batches[:2]), batches[2]):  # calibration and held-out images
        ref = block_outputs(float_model, images)
        before = [rel_mse(q, f) for q, f in zip(block_outputs(plain, images), ref)]
        after = [rel_mse(q, f) for q, f in zip(block_outputs(rec, images), ref)]
        assert len(after) == 2
        assert all(a < 0.8 * b for a, b in zip(after, before)), (before, after)
        with torch.no_grad():
            f = float_model(images)
            assert rel_mse(rec(images), f) < rel_mse(plain(images), f)
    assert [b.name for b in report.blocks] == ["blocks.0", "blocks.1"]
    assert report.images == 128
    for b in report.blocks:
        assert not b.kept and b.mse_after < b.mse_before
        assert b.act_quantizers == 8  # qkv/proj/fc1/fc2 inputs, q, k, v, probabilities
    # the report's "before" of block 0 is the plain model's (same input: the float embedding)
    x = torch.cat(batches[:2])
    ref0 = block_outputs(float_model, x)[0]
    assert report.blocks[0].mse_before == pytest.approx(
        rel_mse(block_outputs(plain, x)[0], ref0), rel=1e-4
    )


def test_weights_lie_on_the_unchanged_grid(
    models: tuple[nn.Module, nn.Module, nn.Module, ReconstructReport],
) -> None:
    _, plain, rec, report = models
    flips = 0
    plain_linears = weight_quantizers(plain)
    for name, lin in weight_quantizers(rec).items():
        q, w = lin.weight_quantizer, lin.weight.detach()
        p = plain_linears[name]
        assert q is not None and p.weight_quantizer is not None
        assert type(q) is type(p.weight_quantizer)
        torch.testing.assert_close(q.scale, p.weight_quantizer.scale, rtol=0, atol=0)
        s = q.expanded(q.scale, w)
        codes = q.int_codes(w)
        assert torch.equal(codes * s, w)  # exactly a grid point (symmetric: zero point 0)
        assert torch.equal(q(w), w)  # round-to-nearest fake quantization reproduces it
        x = p.weight.detach() / s  # the float weight in grid units
        assert bool(((codes == torch.floor(x)) | (codes == torch.floor(x) + 1)).all())
        flips += int((codes != p.weight_quantizer.int_codes(p.weight.detach())).sum())
    assert flips == sum(b.flipped for b in report.blocks) > 0


def test_activation_scales_refined_in_place(
    models: tuple[nn.Module, nn.Module, nn.Module, ReconstructReport],
) -> None:
    _, plain, rec, _ = models
    assert rec.state_dict().keys() == plain.state_dict().keys()
    plain_q = dict(named_quantizers(plain))
    changed = 0
    for name, q in named_quantizers(rec):
        assert type(q) is type(plain_q[name]) and q.scale.shape == plain_q[name].scale.shape
        if q.role != "weight" and name.startswith("blocks."):
            changed += not torch.equal(q.scale, plain_q[name].scale)
            torch.testing.assert_close(q.amax, q.scale * q.qmax)
        elif not name.startswith("blocks."):
            assert torch.equal(q.scale, plain_q[name].scale)  # outside the blocks: untouched
    assert changed >= 8


def test_lowers_to_integer_kernels(
    batches: list[Tensor], models: tuple[nn.Module, nn.Module, nn.Module, ReconstructReport]
) -> None:
    _, _, rec, _ = models
    low = lower(copy.deepcopy(rec), "reference", warn=False)
    assert all(isinstance(b, Int8Block) for b in low.blocks)
    with torch.no_grad():
        a, b = rec(batches[2]), low(batches[2])
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert float(cos) > 0.99


@pytest.mark.parametrize("preset", ["ft2", "repq"])
def test_other_presets(batches: list[Tensor], preset: str) -> None:
    """ft2 adds after-GEMM and softmax-input quantizers (refined too); repq has asymmetric
    activations and a log2 softmax quantizer (left as it is)."""
    float_model = make_model()
    plain = prepare(copy.deepcopy(float_model), QuantConfig(preset, wbits=4, abits=4))
    calibrate(plain, batches[:2], progress=False)
    rec = copy.deepcopy(plain)
    cfg = ReconstructConfig(iterations=80, batch_size=32, progress=False)
    report = reconstruct(float_model, rec, batches[:2], cfg)
    assert all(not b.kept and b.mse_after < b.mse_before for b in report.blocks)
    n_uniform = sum(
        q.role != "weight" and q.kind == "uniform" for _, q in named_quantizers(rec.blocks[0])
    )
    assert report.blocks[0].act_quantizers == n_uniform > (8 if preset == "ft2" else 6)
    plain_q = dict(named_quantizers(plain))
    for name, q in named_quantizers(rec):
        if q.kind != "uniform":
            assert torch.equal(q.scale, plain_q[name].scale)
            assert torch.equal(q.zero_point, plain_q[name].zero_point)
        elif q.role != "weight":
            assert torch.equal(q.zero_point, plain_q[name].zero_point)
    for lin in weight_quantizers(rec).values():
        q, w = lin.weight_quantizer, lin.weight.detach()
        assert q is not None
        assert torch.equal(
            (q.int_codes(w) - q.expanded(q.zero_point, w)) * q.expanded(q.scale, w), w
        )


def test_no_gain_keeps_round_to_nearest(batches: list[Tensor]) -> None:
    """Steps too small to change anything: every block keeps round-to-nearest and the model is
    restored exactly (weights and ranges)."""
    float_model = make_model()
    plain = prepare(copy.deepcopy(float_model), W4A4)
    calibrate(plain, batches[:1], progress=False)
    rec = copy.deepcopy(plain)
    cfg = ReconstructConfig(iterations=3, lr=1e-12, act_lr=1e-12, progress=False)
    report = reconstruct(float_model, rec, batches[:1], cfg)
    assert all(b.kept and b.flipped == 0 and b.mse_after == b.mse_before for b in report.blocks)
    for k, v in plain.state_dict().items():
        if isinstance(v, Tensor):
            assert torch.equal(v, rec.state_dict()[k]), k


def test_same_seed_same_model(batches: list[Tensor]) -> None:
    float_model = make_model(1)
    plain = prepare(copy.deepcopy(float_model), W4A4)
    calibrate(plain, batches[:1], progress=False)
    runs = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        m = copy.deepcopy(plain)
        cfg = ReconstructConfig(iterations=60, batch_size=16, seed=seed, progress=False)
        reconstruct(float_model, m, batches[:1], cfg)
        runs[key] = {k: v for k, v in m.state_dict().items() if isinstance(v, Tensor)}
    same = all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    other = all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])
    assert same and not other


def test_parts_and_progress(batches: list[Tensor], capsys: pytest.CaptureFixture[str]) -> None:
    float_model = make_model()
    plain = prepare(copy.deepcopy(float_model), W4A4)
    calibrate(plain, batches[:1], progress=False)
    acts_only = copy.deepcopy(plain)
    rep = reconstruct(
        float_model, acts_only, batches[:1], ReconstructConfig(iterations=3, weights=False)
    )
    assert "reconstruct" in capsys.readouterr().err  # the tqdm bar
    assert all(b.weights == 0 and b.flipped == 0 for b in rep.blocks)
    for (_, p), (_, q) in zip(plain.named_parameters(), acts_only.named_parameters()):
        assert torch.equal(p, q)
    weights_only = copy.deepcopy(plain)
    cfg = ReconstructConfig(iterations=3, activations=False, progress=False)
    rep = reconstruct(float_model, weights_only, batches[:1], cfg)
    assert all(b.act_quantizers == 0 for b in rep.blocks)
    for (n, p), (_, q) in zip(named_quantizers(plain), named_quantizers(weights_only)):
        assert torch.equal(p.scale, q.scale), n


def test_bad_input(batches: list[Tensor]) -> None:
    float_model = make_model()
    with pytest.raises(ConfigError, match="not prepared"):
        reconstruct(float_model, copy.deepcopy(float_model), batches[:1], FAST)
    uncalibrated = prepare(copy.deepcopy(float_model), W4A4)
    with pytest.raises(ConfigError, match="never calibrated"):
        reconstruct(float_model, uncalibrated, batches[:1], FAST)
    plain = calibrate(prepare(copy.deepcopy(float_model), W4A4), batches[:1], progress=False)
    with pytest.raises(DataError, match="no batches"):
        reconstruct(float_model, copy.deepcopy(plain), [], FAST)
    with pytest.raises(ConfigError, match="not one model"):
        reconstruct(plain, plain, batches[:1], FAST)
    with pytest.raises(ConfigError, match="active quantizers"):
        reconstruct(copy.deepcopy(plain), plain, batches[:1], FAST)
    with pytest.raises(ConfigError, match="no block"):
        reconstruct(nn.Linear(2, 2), copy.deepcopy(plain), batches[:1], FAST)
    wide = calibrate(
        prepare(copy.deepcopy(float_model), QuantConfig("ft1", wbits=8, abits=8)),
        batches[:1],
        progress=False,
    )
    with pytest.raises(ConfigError, match="8-bit weights.*max_bits"):
        reconstruct(float_model, wide, batches[:1], ReconstructConfig(max_bits=4))
    for bad in (
        {"max_bits": 9},
        {"max_bits": 1},
        {"iterations": 0},
        {"batch_size": -1},
        {"lr": 0.0},
        {"drop_prob": 1.0},
        {"weights": False, "activations": False},
    ):
        with pytest.raises(ConfigError):
            ReconstructConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ReconstructConfig"):
        reconstruct(float_model, plain, batches[:1], {"iterations": 3})  # type: ignore[arg-type]
