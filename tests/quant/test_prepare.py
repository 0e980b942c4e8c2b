"""prepare/calibrate on vitquant, timm (ViT, DeiT), nn.TransformerEncoder and torchvision models:
exact point sets per preset, float equivalence with quantization disabled, error handling."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import vitquant
from vitquant.errors import ConfigError, DataError, VitquantError
from vitquant.quant import (
    QuantConfig,
    QuantMultiheadAttention,
    calibrate,
    enable_quantization,
    format_summary,
    named_quantizers,
    prepare,
    quant_summary,
    quantization_disabled,
)

# The FasterTransformer ViT example's quantizers (quant_utils.set_args), per block, written out
# from the seed's description with vitquant's fused qkv: one Linear quantizes q, k and v.
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
GEMM = {f"{l}.{p}_quantizer" for l in LINEARS for p in ("input", "weight")} | {
    "attn.qk_matmul.a_quantizer",  # q
    "attn.qk_matmul.b_quantizer",  # k
    "attn.av_matmul.a_quantizer",  # softmax output (FT matmul_a_input)
    "attn.av_matmul.b_quantizer",  # v
}
AFTERGEMM = {f"{l}.output_quantizer" for l in LINEARS}
EXPECTED = {
    "ft1": GEMM,
    "ft2": GEMM | AFTERGEMM | {"attn.softmax.input_quantizer"},
    "ft3": GEMM
    | AFTERGEMM
    | {"attn.softmax.input_quantizer", "add1.a_quantizer", "add2.a_quantizer"},
    "trt": GEMM | {f"add{i}.{s}_quantizer" for i in (1, 2) for s in "ab"},
}


def _names(model: nn.Module) -> set[str]:
    return {n for n, _ in named_quantizers(model)}


def _expected(preset: str, depth: int) -> set[str]:
    return {f"blocks.{i}.{p}" for i in range(depth) for p in EXPECTED[preset]}


def _timm_deit(timm):  # noqa: ANN001, ANN202
    return timm.models.deit.VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10
    ).eval()


@pytest.mark.parametrize("preset", ["ft1", "ft2", "ft3", "trt"])
def test_preset_points_vitquant_deit(preset: str) -> None:
    model = vitquant.create_model("deit_nano_distilled_patch4_28").eval()
    prepare(model, QuantConfig(preset))
    names = _names(model)
    assert len(names) == len(EXPECTED[preset]) * 2
    assert names == _expected(preset, 2)
    rows = {r["name"]: r for r in quant_summary(model)}
    wgran = "channel(0)" if preset == "ft1" else "tensor"
    assert all(r["granularity"] == wgran for r in rows.values() if r["kind"] == "weight")
    assert all(r["bits"] == 8 and r["enabled"] for r in rows.values())
    # patch embedding, heads and final norm stay float
    assert not any(n.startswith(("patch_embed", "head", "norm")) for n in names)


@pytest.mark.parametrize("preset", ["ft1", "ft2", "ft3", "trt"])
def test_preset_points_timm_deit(timm, preset: str) -> None:  # noqa: ANN001
    model = _timm_deit(timm)
    prepare(model, QuantConfig(preset))
    assert _names(model) == _expected(preset, 2)


def test_options_add_points_and_heads() -> None:
    model = vitquant.create_model("vit_nano_patch4_28")
    cfg = QuantConfig(
        "ft1",
        enable=["layernorm_input"],
        quantize_head=True,
        quantize_patch_embed=True,
        exclude=["blocks.1.*"],
    )
    names = _names(prepare(model, cfg))
    assert "blocks.0.norm1.input_quantizer" in names and "blocks.0.norm2.input_quantizer" in names
    assert {"head.input_quantizer", "head.weight_quantizer"} <= names
    assert {"patch_embed.proj.input_quantizer", "patch_embed.proj.weight_quantizer"} <= names
    assert not any(n.startswith("blocks.1.") for n in names)
    assert "norm.input_quantizer" not in names  # the final LayerNorm is never a point


def _check_float_equivalence(model: nn.Module, x: torch.Tensor, preset: str = "ft2") -> nn.Module:
    ref = model(x)
    tol = 2e-6 * max(1.0, ref.abs().max().item())  # explicit attention vs fused SDPA kernels
    float_state = copy.deepcopy(model.state_dict())
    prepare(model, QuantConfig(preset))
    for k, v in float_state.items():  # same parameter names and values
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=tol, rtol=0)  # uncalibrated: identity
        calibrate(model, [x, (x, torch.zeros(len(x)))], progress=False)
        with quantization_disabled(model):
            assert torch.allclose(model(x), ref, atol=tol, rtol=0)
        out = model(x)
    assert not torch.allclose(out, ref, atol=1e-6)  # quantization does something
    assert torch.allclose(out, ref, atol=0.25 * ref.abs().max().item() + 1e-3)
    assert all(r["calibrated"] for r in quant_summary(model))
    return model


def test_vitquant_model() -> None:
    # ft2: residual quantizers (ft3/trt) wipe out a random model's near-zero class token
    model = vitquant.create_model("deit_nano_distilled_patch4_28").eval()
    _check_float_equivalence(model, torch.randn(4, 1, 28, 28))


def test_timm_vit_and_deit(timm) -> None:  # noqa: ANN001
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10
    ).eval()
    _check_float_equivalence(vit, torch.randn(3, 3, 32, 32))
    _check_float_equivalence(_timm_deit(timm), torch.randn(3, 3, 32, 32), "ft1")


class EncoderClassifier(nn.Module):
    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        layer = nn.TransformerEncoderLayer(
            32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_classifier(norm_first: bool) -> None:
    model = EncoderClassifier(norm_first).eval()
    _check_float_equivalence(model, torch.randn(3, 7, 12), "ft3")
    names = _names(model)
    # the attention matmuls inside nn.MultiheadAttention are quantized (the fast path is off)
    assert "encoder.layers.0.self_attn.qk_matmul.a_quantizer" in names
    assert "encoder.layers.1.self_attn.av_matmul.b_quantizer" in names
    assert "encoder.layers.0.self_attn.in_proj_weight_quantizer" in names
    assert "encoder.layers.0.add1.a_quantizer" in names  # ft3: residual input
    seen = []
    h = model.encoder.layers[0].self_attn.qk_matmul.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        model(torch.randn(2, 7, 12))
    h.remove()
    assert seen


def test_torchvision_vit(timm) -> None:  # noqa: ANN001  (timm's fixture makes torchvision import)
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    ).eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)
    _check_float_equivalence(model, torch.randn(2, 3, 32, 32), "ft2")
    names = _names(model)
    assert "encoder.layers.encoder_layer_0.self_attention.qk_matmul.a_quantizer" in names
    assert not any(n.startswith(("heads", "conv_proj")) for n in names)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", ["self", "cross", "masks", "float_masks", "causal", "unbatched"])
def test_multihead_attention_matches_torch(batch_first: bool, case: str) -> None:
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    ref_mha = copy.deepcopy(mha)
    QuantMultiheadAttention.from_float(mha)
    b, l, s = 2, 5, 6
    shape = (lambda n: (b, n, 16)) if batch_first else (lambda n: (n, b, 16))
    q = torch.randn(shape(l))
    kwargs: dict = {}
    if case == "self":
        args = (q, q, q)
    elif case == "unbatched":
        u = torch.randn(l, 16)
        args = (u, u, u)
    else:
        kv = torch.randn(shape(s))
        args = (q, kv, kv) if case != "causal" else (q, q, q)
    if case == "masks":
        kwargs["attn_mask"] = torch.rand(l, s) > 0.8
        kwargs["key_padding_mask"] = torch.tensor([[False] * s, [False] * (s - 2) + [True] * 2])
    if case == "float_masks":
        kwargs["attn_mask"] = torch.randn(b * 4, l, s)
        kwargs["average_attn_weights"] = False
    if case == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(l)
        kwargs["is_causal"] = True
        kwargs["need_weights"] = False
    with torch.no_grad():
        out, w = mha(*args, **kwargs)
        ref, ref_w = ref_mha(*args, **kwargs)
    assert torch.allclose(out, ref, atol=1e-6)
    if ref_w is None:
        assert w is None
    else:
        assert torch.allclose(w, ref_w, atol=1e-6)


def test_enable_quantization_toggle() -> None:
    model = vitquant.create_model("vit_nano_patch4_28").eval()
    x = torch.randn(2, 1, 28, 28)
    ref = model(x)
    prepare(model, QuantConfig("ft2", wbits=4, abits=4))
    calibrate(model, [x], method="max", progress=False)
    enable_quantization(model, False)
    assert torch.allclose(model(x), ref, atol=1e-6)
    enable_quantization(model, True)
    assert not torch.allclose(model(x), ref, atol=1e-3)
    with quantization_disabled(model):
        assert torch.allclose(model(x), ref, atol=1e-6)
    assert all(q.enabled for _, q in named_quantizers(model))


def test_quantized_model_trains_with_ste() -> None:
    model = vitquant.create_model("vit_nano_patch4_28")
    prepare(model, QuantConfig("ft2", wbits=4, abits=4))
    calibrate(model, [torch.randn(4, 1, 28, 28)], progress=False)
    model.train()
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_errors() -> None:
    model = vitquant.create_model("vit_nano_patch4_28").eval()
    with pytest.raises(ConfigError, match="prepare"):
        calibrate(model, [torch.randn(1, 1, 28, 28)], progress=False)
    prepare(model, QuantConfig("ft1"))
    with pytest.raises(ConfigError, match="already prepared"):
        prepare(model, QuantConfig("ft1"))
    with pytest.raises(DataError, match="no batches"):
        calibrate(model, [], progress=False)
    with pytest.raises(ConfigError, match="calibration method"):
        calibrate(model, [torch.randn(1, 1, 28, 28)], method="kl", progress=False)
    with pytest.raises(DataError, match="input tensor"):
        calibrate(model, ["not a tensor"], progress=False)
    bad = torch.randn(2, 1, 28, 28)
    model.blocks[1].mlp.fc1.weight.data[0, 0] = float("inf")
    with pytest.raises(VitquantError, match=r"blocks\.1\.mlp\.fc2\.input_quantizer"):
        calibrate(model, [bad], progress=False)


def test_num_batches_and_summary_table() -> None:
    model = vitquant.create_model("vit_nano_patch4_28").eval()
    prepare(model, QuantConfig("ft2"))
    seen = []

    def data():  # noqa: ANN202
        for i in range(10):
            seen.append(i)
            yield torch.randn(2, 1, 28, 28)

    calibrate(model, data(), num_batches=3, progress=False)
    assert len(seen) <= 4
    text = format_summary(quant_summary(model))
    assert "blocks.0.attn.qkv.weight_quantizer" in text
    assert "34 quantizers" in text


def test_calibrate_under_torch_distributed(tmp_path) -> None:  # noqa: ANN001
    import torch.distributed as dist

    x = torch.randn(4, 1, 28, 28)
    ref_model = prepare(vitquant.create_model("vit_nano_patch4_28").eval(), QuantConfig("repq"))
    model = copy.deepcopy(ref_model)
    calibrate(ref_model, [x], progress=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        calibrate(model, [x], progress=False)  # statistics all-reduced (one rank: unchanged)
    finally:
        dist.destroy_process_group()
    for (n, a), (_, b) in zip(named_quantizers(ref_model), named_quantizers(model)):
        assert torch.equal(a.scale, b.scale), n


def test_from_float_keeps_parameters_hooks_and_output() -> None:
    from vitquant.models.layers import Add, MatMul
    from vitquant.quant import QuantAdd, QuantConv2d, QuantLayerNorm, QuantLinear, QuantMatMul

    cases = [
        (QuantLinear, nn.Linear(5, 3), (torch.randn(2, 5),)),
        (QuantConv2d, nn.Conv2d(2, 4, 3), (torch.randn(1, 2, 6, 6),)),
        (QuantLayerNorm, nn.LayerNorm(5), (torch.randn(2, 5),)),
        (QuantMatMul, MatMul(), (torch.randn(2, 3, 4), torch.randn(2, 4, 5))),
        (QuantAdd, Add(), (torch.randn(3), torch.randn(3))),
    ]
    for cls, m, inputs in cases:
        want = m(*inputs)
        params = dict(m.named_parameters())
        seen: list[int] = []
        m.register_forward_hook(lambda *a, seen=seen: seen.append(1))
        q = cls.from_float(m)
        assert q is m and type(q) is cls
        assert dict(q.named_parameters()) == params  # the same Parameter objects
        assert q.point_kinds() and all(getattr(q, slot) is None for slot in q.point_kinds())
        assert torch.equal(q(*inputs), want) and seen == [1]
