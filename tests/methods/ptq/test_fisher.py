"""vitquant.methods.ptq.fisher and ``reconstruct(loss="fisher")``: the Fisher weights equal an
independent per-block autograd re-derivation, vanish where the logits do not depend on an output
(patch tokens after the last block of a class-token model), mix with the uniform weight as
documented, and Fisher-weighted reconstruction reports (and lowers) the weighted error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helpers import block_outputs, digits_batches, random_nano_vit
from vitquant.errors import ConfigError
from vitquant.methods.ptq.fisher import block_fisher_weights
from vitquant.methods.ptq.reconstruct import ReconstructConfig, reconstruct
from vitquant.quant import QuantConfig, calibrate, prepare


@pytest.fixture(scope="module")
def batches() -> list[Tensor]:
    return digits_batches(192)


def reference_weights(model: nn.Module, images: Tensor, k: int) -> Tensor:
    """``g^2 / mean(g^2)`` for block ``k``: the block's output made a leaf, the rest of the
    network run from it by hand, the cross-entropy against the float top-1 summed."""
    with torch.no_grad():
        labels = model(images).argmax(-1)
        z = block_outputs(model, images)[k]
    z = z.clone().requires_grad_(True)
    rest = z
    for block in model.blocks[k + 1 :]:
        rest = block(rest)
    logits = model.forward_head(model.norm(rest))
    F.cross_entropy(logits, labels, reduction="sum").backward()
    assert z.grad is not None
    g2 = z.grad.pow(2)
    return g2 / g2.mean()


def test_matches_a_per_block_autograd_reference(batches: list[Tensor]) -> None:
    model = random_nano_vit()
    images = torch.cat(batches[:2])[:100]  # two chunks of the module's batch (64 + 36)
    weights = block_fisher_weights(model, list(model.blocks), images)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients left
    assert len(weights) == len(model.blocks) == 2
    for k, w in enumerate(weights):
        ref = reference_weights(model, images, k)
        assert w.dtype == torch.bfloat16 and w.shape == ref.shape
        torch.testing.assert_close(w.float(), ref, rtol=1e-2, atol=1e-3)
        assert float(w.float().mean()) == pytest.approx(1.0, rel=1e-2)


def test_zero_where_the_logits_do_not_look_and_mix(batches: list[Tensor]) -> None:
    model = random_nano_vit()
    images = batches[0][:32]
    last = block_fisher_weights(model, list(model.blocks), images)[-1].float()
    assert bool((last[:, 1:] == 0).all())  # patch tokens of the last block: the head reads cls
    assert bool((last[:, 0] > 0).any())
    half = block_fisher_weights(model, list(model.blocks), images, mix=0.5)[-1].float()
    torch.testing.assert_close(half, 0.5 + 0.5 * last, rtol=1e-2, atol=1e-2)
    flat = block_fisher_weights(model, list(model.blocks), images, mix=0.0)
    assert all(bool((w == 1).all()) for w in flat)


def test_bad_input() -> None:
    model = random_nano_vit()
    with pytest.raises(ConfigError, match="mix"):
        block_fisher_weights(model, list(model.blocks), torch.zeros(2, 1, 28, 28), mix=1.5)
    with pytest.raises(ConfigError, match="once per forward"):
        block_fisher_weights(model, [nn.Linear(2, 2)], torch.zeros(2, 1, 28, 28))
    with pytest.raises(ConfigError, match="loss"):
        ReconstructConfig(loss="hessian")
    with pytest.raises(ConfigError, match="fisher_mix"):
        ReconstructConfig(loss="fisher", fisher_mix=-0.1)


def test_fisher_reconstruction_learns_the_weighted_error(batches: list[Tensor]) -> None:
    """The report of ``loss="fisher"`` is the Fisher-weighted error (re-derived here from the
    reference weights: it differs from the plain MSE), and no block ends above its start."""
    float_model = random_nano_vit()
    plain = prepare(copy.deepcopy(float_model), QuantConfig("ft1", wbits=4, abits=4))
    calibrate(plain, batches[:2], progress=False)
    images = torch.cat(batches[:2])
    rec = copy.deepcopy(plain)
    cfg = ReconstructConfig(iterations=60, batch_size=32, progress=False, loss="fisher")
    report = reconstruct(float_model, rec, batches[:2], cfg)
    assert report.config["loss"] == "fisher" and report.config["fisher_mix"] == 1.0
    assert all(b.mse_after <= b.mse_before for b in report.blocks)
    assert any(not b.kept and b.flipped > 0 for b in report.blocks)
    # block 0 reads the float embedding in both models: its "before" is plain's weighted error
    y = block_outputs(float_model, images)[0]
    err = (block_outputs(plain, images)[0] - y).pow(2)
    w = reference_weights(float_model, images, 0)
    weighted = float((err * w).mean() / y.pow(2).mean())
    assert report.blocks[0].mse_before == pytest.approx(weighted, rel=2e-2)
    assert abs(weighted - float(err.mean() / y.pow(2).mean())) > 0.05 * weighted
