"""IRM, split q/k/v attention, q/k capture and the QAT model builder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitquant.errors import ConfigError
from vitquant.methods.lsq.quantizer import LSQQuantizer
from vitquant.methods.qat.quantize import QATScheme, build_qat_model, init_qat
from vitquant.methods.qvit.capture import QKCapture
from vitquant.methods.qvit.irm import InformationRectification
from vitquant.methods.qvit.quantizer import QViTQuantizer
from vitquant.methods.vvtq.split_attention import SplitAttention, split_fused_state_dict, split_qkv
from vitquant.models import create_model
from vitquant.quant import named_quantizers


def _batches(n: int = 2, b: int = 6) -> list:
    return [(torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,))) for _ in range(n)]


def test_irm_token_formula_against_layer_norm_and_calibrated_identity() -> None:
    irm = InformationRectification(2, 8, stats="token")
    x = torch.randn(3, 2, 5, 8)
    # γ = 1, β = 0: a LayerNorm over head_dim without affine
    ref = torch.nn.functional.layer_norm(x, (8,), eps=1e-5)
    torch.testing.assert_close(irm(x), ref, atol=1e-5, rtol=1e-5)
    # tokens that share mean and std: the calibrated module is the identity
    base = torch.randn(8)
    base = (base - base.mean()) / base.std(unbiased=False)
    y = (base * 2.5 + 0.7).expand(3, 2, 5, 8).clone()
    perm = torch.stack([y[..., torch.randperm(8)] for _ in range(1)])[0]
    irm.start_calibration()
    assert torch.equal(irm(perm), perm)
    irm.finish_calibration()
    torch.testing.assert_close(irm(perm), perm, atol=1e-4, rtol=1e-4)
    irm(x).sum().backward()
    assert irm.gamma.grad is not None and irm.beta.grad is not None


def test_irm_channel_statistics_against_numpy_and_exact_identity() -> None:
    irm = InformationRectification(2, 4)  # stats="channel" by default
    # γ = 1, β = 0, no statistics yet: the identity
    x = torch.randn(3, 2, 5, 4) * torch.tensor([1.0, 3.0, 0.5, 2.0]) + 1.5
    torch.testing.assert_close(irm(x), x)
    chunks = [x[:2], x[2:]]
    irm.start_calibration()
    for c in chunks:
        assert torch.equal(irm(c), c)
    irm.finish_calibration()
    a = x.numpy().astype(np.float64).transpose(1, 3, 0, 2).reshape(2, 4, -1)
    np.testing.assert_allclose(irm.mean.squeeze(1).numpy(), a.mean(-1), rtol=1e-5, atol=1e-6)
    sd = np.sqrt(a.var(-1) + irm.eps)
    np.testing.assert_allclose(irm.std.squeeze(1).numpy(), sd, rtol=1e-5, atol=1e-6)
    # calibrated: γ = σ, β = μ, the rectified q is the float q
    torch.testing.assert_close(irm(x), x, atol=1e-5, rtol=1e-5)
    # a learned γ and β change it affinely per channel, and get gradients
    with torch.no_grad():
        irm.gamma.mul_(2.0)
    torch.testing.assert_close(irm(x), 2 * x, atol=1e-4, rtol=1e-4)
    irm(x).sum().backward()
    assert irm.gamma.grad is not None and irm.beta.grad is not None
    assert "mean" in irm.state_dict() and "std" in irm.state_dict()
    with pytest.raises(ConfigError, match="token"):
        InformationRectification(2, 4, stats="batch")


def test_split_attention_matches_fused_and_loads_fused_state() -> None:
    model = create_model("vit_nano_patch4_28")
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    ref = model(x)
    fused_sd = {k: v.clone() for k, v in model.state_dict().items()}
    split_qkv(model)
    assert isinstance(model.blocks[0].attn, SplitAttention)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    fresh = split_qkv(create_model("vit_nano_patch4_28")).eval()
    fresh.load_state_dict(fused_sd)  # fused qkv entries are split on load
    torch.testing.assert_close(fresh(x), ref, atol=1e-5, rtol=1e-5)
    assert set(split_fused_state_dict(fused_sd)) == set(fresh.state_dict())


def test_capture_float_and_quantized() -> None:
    model = create_model("vit_nano_patch4_28").eval()
    x = torch.randn(2, 1, 28, 28)
    cap = QKCapture(model, detach=True)
    model(x)
    pairs = cap.pop()
    assert len(pairs) == 2
    attn = model.blocks[0].attn
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    q, k, _ = attn.split_qkv(model.blocks[0].norm1(h))
    torch.testing.assert_close(pairs[0][0], q * attn.scale)
    torch.testing.assert_close(pairs[0][1], k)
    cap.remove()
    build_qat_model(model, QATScheme(4, 4, attn_granularity="head"))
    init_qat(model, _batches(), 2)
    cap = QKCapture(model)
    model(x)
    qs, ks = cap.pop()[1]
    aq = model.blocks[1].attn.qk_matmul.a_quantizer
    # quantized queries: at most 2^4 distinct values per head
    assert qs.shape == (2, 2, 50, 16) and ks.shape == qs.shape
    assert all(qs[:, h].unique().numel() <= 16 for h in range(2))
    assert aq.is_calibrated


def test_qvit_scheme_places_quantizers() -> None:
    model = create_model("vit_nano_patch4_28")
    scheme = QATScheme(
        2,
        2,
        input_quantizer="qvit",
        input_granularity="channel",
        attn_quantizer="qvit",
        attn_granularity="head",
        irm=True,
    )
    build_qat_model(model, scheme)
    init_qat(model, _batches(), 2)
    qs = dict(named_quantizers(model))
    assert isinstance(qs["blocks.0.attn.qk_matmul.a_quantizer"], QViTQuantizer)
    assert qs["blocks.0.attn.qk_matmul.a_quantizer"].scale.shape == (2,)  # per head
    assert qs["blocks.0.attn.av_matmul.a_quantizer"].signed is False  # probabilities
    assert qs["blocks.0.mlp.fc2.input_quantizer"].method == "lsq+"
    assert qs["blocks.0.attn.qkv.weight_quantizer"].bits == 2
    assert qs["patch_embed.proj.weight_quantizer"].bits == 8
    assert qs["head.weight_quantizer"].bits == 8
    assert isinstance(model.blocks[0].attn.q_norm, InformationRectification)
    assert all(isinstance(q, LSQQuantizer) and q.is_calibrated for q in qs.values())


def test_scheme_rejects_bad_bits() -> None:
    for bits in (1, 9):
        with pytest.raises(ConfigError):
            QATScheme(wbits=bits)
    with pytest.raises(ConfigError):
        QATScheme(abits=16)


def test_registered_model_names(tmp_path) -> None:
    import vitquant.methods.qat  # noqa: F401  (registers the names)
    from vitquant.methods.qat.method import model_bits_hint
    from vitquant.methods.vvtq.models import load_fused_checkpoint
    from vitquant.models import list_models

    names = list_models("*bits_deit_*_patch16_224")
    assert len(names) == 9
    m = create_model("twobits_vit_micro_patch7_28")
    assert model_bits_hint(m) == 2
    assert list_models("deit_*_patch16_224_quant") == [
        "deit_base_patch16_224_quant",
        "deit_small_patch16_224_quant",
        "deit_tiny_patch16_224_quant",
    ]
    float_model = create_model("vit_micro_patch7_28").eval()
    torch.save({"model": float_model.state_dict()}, tmp_path / "f.pt")
    split = create_model("vit_micro_patch7_28_quant").eval()
    load_fused_checkpoint(split, str(tmp_path / "f.pt"))
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(split(x), float_model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stats", ["channel", "token"])
def test_calibrated_irm_keeps_the_float_function_only_with_channel_stats(stats: str) -> None:
    from vitquant.quant import quantization_disabled

    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_28").eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    build_qat_model(model, QATScheme(4, 4, irm=True, irm_stats=stats))
    init_qat(model, _batches(), 2)
    model.eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    q_norm = model.blocks[1].attn.q_norm
    q_norm.register_forward_hook(lambda _, i, o: seen.append((i[0], o)))
    with quantization_disabled(model), torch.no_grad():
        out = model(x)
    q_in, q_out = seen[0]
    q_err = ((q_out - q_in).norm() / q_in.norm()).item()
    if stats == "channel":
        assert q_err < 1e-5
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:  # per-token normalisation drops each token's norm: not the float queries
        assert q_err > 0.05
    with pytest.raises(ConfigError, match="irm_stats"):
        QATScheme(4, 4, irm=True, irm_stats="batch")
