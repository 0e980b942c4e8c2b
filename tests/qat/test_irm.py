"""Q-ViT's IRM: the paper's dynamic re-normalisation and the fold of the fixed-statistics form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vitquant.errors import ConfigError
from vitquant.methods.qat.quantize import QATScheme, build_qat_model, init_qat
from vitquant.methods.qvit.irm import IRM_STATS, InformationRectification, fold_irm, irm_modules
from vitquant.methods.qvit.method import QViTConfig
from vitquant.models import create_model


def _skewed(b: int = 4, h: int = 2, n: int = 50, d: int = 8, seed: int = 0) -> torch.Tensor:
    """q/k-like input whose per-channel mean and spread are far from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    mean = 5.0 * torch.randn(1, h, 1, d, generator=g)
    std = torch.rand(1, h, 1, d, generator=g) * 4 + 0.5
    return mean + std * torch.randn(b, h, n, d, generator=g)


def _set_affine(irm: InformationRectification, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        irm.gamma.copy_(torch.rand(irm.gamma.shape, generator=g) * 2 + 0.5)
        irm.beta.copy_(torch.randn(irm.beta.shape, generator=g))
    return irm.gamma.detach().squeeze(1).numpy(), irm.beta.detach().squeeze(1).numpy()


def _channel_moments(y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per head and channel mean and std over images and tokens ([heads, head_dim])."""
    a = y.detach().double().numpy()
    return a.mean(axis=(0, 2)), a.std(axis=(0, 2))


def test_dynamic_irm_output_has_mean_beta_and_std_gamma_whatever_the_input() -> None:
    assert "dynamic" in IRM_STATS
    irm = InformationRectification(2, 8, stats="dynamic")
    gamma, beta = _set_affine(irm)
    for seed in (0, 1, 2):  # inputs of different statistics: the same output moments
        mean, std = _channel_moments(irm(_skewed(seed=seed)))
        np.testing.assert_allclose(mean, beta, atol=1e-4)
        np.testing.assert_allclose(std, gamma, rtol=1e-3)


def test_fixed_statistics_form_does_not_renormalise() -> None:
    irm = InformationRectification(2, 8, stats="channel")
    irm.start_calibration()
    irm(_skewed(seed=0))
    irm.finish_calibration()
    gamma, beta = _set_affine(irm)
    mean, std = _channel_moments(irm(_skewed(seed=3)))  # other statistics than calibrated on
    assert np.abs(mean - beta).max() > 0.1
    assert np.abs(std - gamma).max() > 0.1


def test_dynamic_irm_is_per_image_and_differentiable() -> None:
    irm = InformationRectification(2, 8, stats="dynamic")
    _set_affine(irm)
    x = _skewed(b=3)
    y = irm(x)
    # an image's output does not depend on the other images of its batch
    torch.testing.assert_close(irm(x[1:2]), y[1:2])
    x2 = x.clone().requires_grad_()
    (irm(x2) * torch.randn_like(x2)).sum().backward()
    assert x2.grad is not None and torch.isfinite(x2.grad).all()
    assert irm.gamma.grad is not None and irm.gamma.grad.abs().sum() > 0
    assert irm.beta.grad is not None and irm.beta.grad.abs().sum() > 0


def test_dynamic_irm_calibration_starts_at_the_float_function() -> None:
    # exact when every image has the same statistics (here: the same image, permuted tokens)
    irm = InformationRectification(2, 8, stats="dynamic")
    one = _skewed(b=1)
    batch = torch.cat([one[:, :, torch.randperm(one.shape[2])] for _ in range(3)])
    irm.start_calibration()
    assert torch.equal(irm(batch), batch)
    irm.finish_calibration()
    torch.testing.assert_close(irm(batch), batch, atol=1e-4, rtol=1e-4)


def test_config_accepts_dynamic_and_rejects_unknown() -> None:
    assert QViTConfig(irm_stats="dynamic").irm_stats == "dynamic"
    assert QATScheme(irm=True, irm_stats="dynamic").irm_stats == "dynamic"
    assert QViTConfig().irm_stats == "channel"  # the default is unchanged
    with pytest.raises(ConfigError):
        QViTConfig(irm_stats="batch")


def _qk_of_every_layer(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    out = []
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks:
            q, k, _ = blk.attn.split_qkv(blk.norm1(tokens))
            out.append((q, k))
            tokens = blk(tokens)
    return out


def _qat_model(stats: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_28").eval()
    build_qat_model(model, QATScheme(4, 4, input_quantizer="qvit", irm=True, irm_stats=stats))
    batches = [(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    init_qat(model, batches, num_batches=2)
    for i, irm in enumerate(irm_modules(model)):
        _set_affine(irm, seed=10 + i)  # a trained-looking IRM: the fold is not the identity
    return model.eval()


@pytest.mark.parametrize("quantized_weights", [True, False])
def test_fold_channel_irm_into_qkv_keeps_q_and_k(quantized_weights: bool) -> None:
    model = _qat_model("channel")
    if not quantized_weights:
        for m in model.modules():
            if getattr(m, "weight_quantizer", None) is not None:
                m.weight_quantizer.enabled = False
    x = torch.randn(4, 1, 28, 28)
    before = _qk_of_every_layer(model, x)
    logits = model(x)
    assert fold_irm(model) == 2 * len(model.blocks)
    assert not irm_modules(model)
    after = _qk_of_every_layer(model, x)
    for (qb, kb), (qa, ka) in zip(before, after):
        torch.testing.assert_close(qa, qb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
    if not quantized_weights:
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=1e-4)


def test_fold_plain_float_model_without_qkv_bias() -> None:
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_28", qkv_bias=False).eval()
    build_qat_model(model, QATScheme(irm=True))
    for m in model.modules():  # leave the float model: no quantizer active
        if hasattr(m, "enabled"):
            m.enabled = False
    for i, irm in enumerate(irm_modules(model)):
        _set_affine(irm, seed=i)
    x = torch.randn(2, 1, 28, 28)
    ref = model(x)
    fold_irm(model)
    assert model.blocks[0].attn.qkv.bias is not None
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stats", ["dynamic", "token"])
def test_fold_refuses_the_forms_with_statistics_of_the_current_tensor(stats: str) -> None:
    model = _qat_model(stats)
    with pytest.raises(ConfigError, match="cannot be folded"):
        fold_irm(model)


def test_fold_refuses_a_weight_grid_it_cannot_keep() -> None:
    model = _qat_model("channel")
    with torch.no_grad():
        model.blocks[0].attn.q_norm.gamma[0, 0, 0] = -1.0  # a sign flip: not exact on the grid
    with pytest.raises(ConfigError, match="negative"):
        fold_irm(model)
