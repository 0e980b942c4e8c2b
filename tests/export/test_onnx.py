"""ONNX QDQ export (``vitquant.export.onnx``), checked in onnxruntime against the fake-quant model.

Two references: onnxruntime with its graph optimizations off runs every QuantizeLinear /
DequantizeLinear as written (float emulation: it must match the fake-quant model up to float
rounding), and with them on it fuses the QDQ graph into its integer kernels (the deployment
path: cosine > 0.999 and top-1 agreement >= 99.5 % with the fake-quant logits). The graph's
nodes are counted against the model's own quantizers.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

import vitquant
from helpers import digits_batches, random_vit
from vitquant.errors import ConfigError
from vitquant.quant import QuantConfig, calibrate, prepare
from vitquant.quant.quantizers import Quantizer

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from vitquant.export.onnx import qdq_module, qdq_points, to_onnx  # noqa: E402
from vitquant.export.onnx_run import compare_onnx, count_qdq, run_onnx  # noqa: E402


def _micro(seed: int = 0) -> torch.nn.Module:
    """``vit_micro_patch7_28`` (10 classes, grey images) as :func:`helpers.random_vit` makes it."""
    return random_vit("vit_micro_patch7_28", seed, num_classes=10, in_chans=1)


@pytest.fixture(scope="module")
def data() -> list[torch.Tensor]:
    return digits_batches(192, 64)


def _quantized(data: list[torch.Tensor], model: torch.nn.Module | None = None, **cfg: object):
    model = _micro() if model is None else model
    prepare(model, QuantConfig(**cfg))  # type: ignore[arg-type]
    calibrate(model, data[:1], method="max", progress=False)
    return model


@pytest.fixture(scope="module", params=["ft1", "ft2", "robust"])
def exported(request, data, tmp_path_factory) -> tuple[str, torch.nn.Module, Path]:
    """A calibrated W8A8 model of each preset and its ONNX file."""
    model = _quantized(data, preset=request.param)
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    to_onnx(model, path, data[0][:1])
    return request.param, model, path


def test_onnxruntime_int8_agrees_with_fake_quant(exported, data) -> None:
    preset, model, path = exported
    r = compare_onnx(model, path, data[1])  # onnxruntime's integer kernels (QDQ fused)
    assert r["cosine"] > 0.999, (preset, r)
    assert r["top1_agreement"] >= 0.995, (preset, r)


def test_onnx_graph_computes_the_fake_quant_function(exported, data) -> None:
    """Unfused (every Q/DQ node run as written): equal to the fake-quant model up to float
    rounding of the float ops between the quantizers."""
    preset, model, path = exported
    r = compare_onnx(model, path, data[1], optimize=False)
    assert r["cosine"] > 0.99999, (preset, r)
    assert r["top1_agreement"] == 1.0, (preset, r)


def test_every_quantizer_is_one_qdq_point(exported) -> None:
    preset, model, path = exported
    active = [(n, q) for n, q in model.named_modules() if isinstance(q, Quantizer) and q.active]
    weights = [n for n, q in active if q.role == "weight"]
    counts = count_qdq(path)
    assert counts["weight_dequantize"] == len(weights) > 0
    assert counts["qdq_pairs"] == counts["quantize"] == len(active) - len(weights)
    assert counts["dequantize"] == len(active)
    assert counts["clip"] == 0  # 8-bit grids fill int8 / uint8
    kinds = {q.point for _, q in active}
    assert {"matmul_input", "softmax_output", "linear_input", "weight"} <= kinds
    if preset == "ft2":
        assert {"softmax_input", "aftergemm"} <= kinds


def _producers(path: Path) -> tuple[object, dict[str, object], set[str]]:
    g = onnx.load(str(path)).graph
    prod = {o: n for n in g.node for o in n.output}
    return g, prod, {i.name for i in g.initializer}


def test_attention_operands_and_softmax_are_dequantized(data, tmp_path) -> None:
    """q·kᵀ, attn·v and every Linear read DequantizeLinear outputs; the softmax input too."""
    model = _quantized(data, preset="ft2")
    path = tmp_path / "ft2.onnx"
    to_onnx(model, path, data[0][:1])
    g, prod, _ = _producers(path)

    def source(name: str) -> str:
        node = prod.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape"):
            node = prod.get(node.input[0])
        return "" if node is None else node.op_type

    matmuls = [n for n in g.node if n.op_type in ("MatMul", "Gemm")]
    softmax = [n for n in g.node if n.op_type == "Softmax"]
    depth = len(model.blocks)
    assert len(softmax) == depth
    # per block: qkv, q·kᵀ, attn·v, proj, fc1, fc2 (the head stays float: quantize_head=False)
    quantized = [n for n in matmuls if source(n.input[0]) == "DequantizeLinear"]
    assert len(quantized) == 6 * depth
    for n in quantized:
        assert source(n.input[1]) == "DequantizeLinear", n.name
    for n in softmax:
        assert source(n.input[0]) == "DequantizeLinear"


def test_per_channel_weights_are_axis0_int8(data, tmp_path) -> None:
    model = _quantized(data, preset="ft1")  # per-channel weights
    path = tmp_path / "ft1.onnx"
    to_onnx(model, path, data[0][:1])
    g, _, inits = _producers(path)
    init = {i.name: i for i in g.initializer}
    weight_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dq
    for n in weight_dq:
        codes = onnx.numpy_helper.to_array(init[n.input[0]])
        scale = onnx.numpy_helper.to_array(init[n.input[1]])
        axis = {a.name: a.i for a in n.attribute}.get("axis")
        assert codes.dtype.name == "int8" and axis == 0
        assert scale.shape == (codes.shape[0],)
    # the stored codes are the quantizers' own int_codes
    lin = model.blocks[0].mlp.fc1
    want = lin.weight_quantizer.int_codes(lin.weight).to(torch.int8)
    stored = [
        onnx.numpy_helper.to_array(init[n.input[0]])
        for n in weight_dq
        if tuple(init[n.input[0]].dims) == tuple(want.shape)
    ]
    assert any(torch.equal(torch.from_numpy(s.copy()), want) for s in stored)


def test_low_bit_activations_are_int8_qdq_with_an_exact_clip(data, tmp_path) -> None:
    model = _quantized(data, preset="ft1", wbits=4, abits=4)
    path = tmp_path / "w4a4.onnx"
    rep = to_onnx(model, path, data[0][:1])
    assert rep.counts["clip"] == rep.activation_points > 0
    assert all(p.clip and p.qmax - p.qmin == 15 for p in rep.points if p.role == "activation")
    exact = compare_onnx(model, path, data[1], optimize=False)
    assert exact["cosine"] > 0.99999, exact
    fused = compare_onnx(model, path, data[1])
    assert fused["cosine"] > 0.999, fused


def test_asymmetric_activations_are_uint8_with_zero_points(data, tmp_path) -> None:
    model = _quantized(data, preset="ft1", act_symmetric=False)
    points = [p for p in qdq_points(model) if p.role == "activation"]
    assert points and all(p.dtype == "uint8" for p in points)
    zps = [q.zero_point for _, q in model.named_modules() if isinstance(q, Quantizer) and q.active]
    assert any(float(z.abs().max()) > 0 for z in zps)
    path = tmp_path / "asym.onnx"
    to_onnx(model, path, data[0][:1])
    r = compare_onnx(model, path, data[1], optimize=False)
    assert r["cosine"] > 0.99999, r


def test_qdq_module_is_the_fake_quant_model_exactly(data) -> None:
    for cfg in ({"preset": "ft2"}, {"preset": "ft1", "wbits": 4, "abits": 4}):
        model = _quantized(data, **cfg)
        graph, _ = qdq_module(model)
        with torch.no_grad():
            assert torch.equal(graph(data[1]), model(data[1])), cfg
        # the user's model keeps its quantizers
        assert isinstance(model.blocks[0].attn.qkv.input_quantizer, Quantizer)


def test_log2_softmax_is_an_error_or_stays_float(data, tmp_path) -> None:
    model = _quantized(data, preset="repq")  # log-sqrt2 softmax-output quantizers
    with pytest.raises(ConfigError, match="cannot be ONNX QDQ.*unsupported='float'"):
        to_onnx(model, tmp_path / "repq.onnx", data[0][:1])
    with pytest.warns(UserWarning, match="stay float"):
        rep = to_onnx(model, tmp_path / "repq.onnx", data[0][:1], unsupported="float")
    left = [p for p in rep.points if p.export == "float"]
    assert len(left) == len(model.blocks) and all(p.point == "softmax_output" for p in left)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, _ = qdq_module(model, unsupported="float")
    with torch.no_grad():
        ref = graph(data[1])
    out = run_onnx(rep.path, data[1])
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


def test_bad_input_is_a_clear_error(data, tmp_path) -> None:
    model = _micro()
    with pytest.raises(ConfigError, match="no quantizers"):
        to_onnx(model, tmp_path / "m.onnx", data[0][:1])
    prepare(model, QuantConfig("ft1"))
    with pytest.raises(ConfigError, match="never calibrated"):
        to_onnx(model, tmp_path / "m.onnx", data[0][:1])
    calibrate(model, data[:1], method="max", progress=False)
    with pytest.raises(ConfigError, match="exporter"):
        to_onnx(model, tmp_path / "m.onnx", data[0][:1], exporter="tflite")
    with pytest.raises(ConfigError, match="opset"):
        to_onnx(model, tmp_path / "m.onnx", data[0][:1], opset=11)
    assert not (tmp_path / "m.onnx").exists()


def test_disabled_quantizers_stay_float(data, tmp_path) -> None:
    model = _quantized(data, preset="ft1")
    model.blocks[0].mlp.fc1.input_quantizer.enabled = False
    model.blocks[0].mlp.fc1.weight_quantizer.enabled = False
    rep = to_onnx(model, tmp_path / "m.onnx", data[0][:1])
    names = {p.name for p in rep.points}
    assert "blocks.0.mlp.fc1.input_quantizer" not in names
    active = sum(isinstance(q, Quantizer) and q.active for q in model.modules())
    assert rep.counts["dequantize"] == active == len(rep.points)
    r = compare_onnx(model, rep.path, data[1], optimize=False)
    assert r["cosine"] > 0.99999, r


def test_timm_vit_exports(timm, data, tmp_path) -> None:
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=2,
        num_heads=2, mlp_ratio=2.0,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight *= 3.0
    model = _quantized(data, copy.deepcopy(model), preset="robust")
    rep = to_onnx(model, tmp_path / "timm.onnx", data[0][:1])
    assert rep.counts["qdq_pairs"] == rep.activation_points > 0
    r = compare_onnx(model, rep.path, data[1])
    assert r["cosine"] > 0.999 and r["top1_agreement"] >= 0.995, r


@pytest.mark.slow
def test_dynamo_exporter_and_per_group_weights(data, tmp_path) -> None:
    """The dynamo exporter writes the same QDQ structure; at opset 21 per-group weights are
    blocked DequantizeLinear nodes (``block_size``)."""
    pytest.importorskip("onnxscript")
    model = _quantized(
        data, vitquant.create_model("vit_nano_patch4_28").eval(), preset="ft2",
        weight_granularity="group:16",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="opset=21"):
        to_onnx(model, tmp_path / "t.onnx", data[0][:1])
    rep = to_onnx(model, tmp_path / "d.onnx", data[0][:1], exporter="dynamo", opset=21)
    active = [q for q in model.modules() if isinstance(q, Quantizer) and q.active]
    weights = [q for q in active if q.role == "weight"]
    assert rep.counts["weight_dequantize"] == len(weights) == rep.weight_points
    assert rep.counts["qdq_pairs"] == len(active) - len(weights) == rep.activation_points
    g = onnx.load(str(rep.path)).graph
    blocks = [
        {a.name: a.i for a in n.attribute}.get("block_size")
        for n in g.node
        if n.op_type == "DequantizeLinear"
    ]
    assert blocks.count(16) == len(weights)
    assert compare_onnx(model, rep.path, data[1], optimize=False)["cosine"] > 0.99999
    assert compare_onnx(model, rep.path, data[1])["cosine"] > 0.999


def test_cli_writes_onnx_from_a_calibrated_file(data, tmp_path, capsys) -> None:
    from vitquant import cli
    from vitquant.quant import save_calibrated

    model = _quantized(data, preset="ft2")
    kwargs = {"num_classes": 10, "in_chans": 1}
    calib = save_calibrated(
        model, tmp_path / "c.pth", model_name="vit_micro_patch7_28", model_kwargs=kwargs
    )
    out = tmp_path / "m.onnx"
    argv = ["export", "--quantized", str(calib), "--format", "onnx", "--check", "-o", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "activation QuantizeLinear/DequantizeLinear pairs" in text and "cosine" in text
    active = sum(isinstance(q, Quantizer) and q.active for q in model.modules())
    assert count_qdq(out)["dequantize"] == active
    with torch.no_grad():
        want = model(data[1])
    assert (
        torch.nn.functional.cosine_similarity(
            run_onnx(out, data[1]).flatten(), want.flatten(), dim=0
        )
        > 0.999
    )
    # a log2 softmax is refused with the flag that leaves it float
    repq = _quantized(data, preset="repq")
    calib = save_calibrated(
        repq, tmp_path / "r.pth", model_name="vit_micro_patch7_28", model_kwargs=kwargs
    )
    argv = ["export", "--quantized", str(calib), "--format", "onnx", "-o", str(out)]
    assert cli.main(argv) == 2
    assert "--unsupported float" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["lsq", "qvit"])
def test_qat_models_export(data, tmp_path, scheme: str) -> None:
    """LSQ (learned steps, LSQ+ offsets after GELU) and Q-ViT (learned zero points, per-head
    attention steps, IRM) W4A4 models: 4-bit points are int8 QDQ with a Clip."""
    from vitquant.methods.qat.quantize import QATScheme, build_qat_model, init_qat

    kw = {"input_quantizer": "qvit", "attn_quantizer": "qvit", "attn_granularity": "head"}
    model = build_qat_model(_micro(), QATScheme(**(kw if scheme == "qvit" else {})))
    init_qat(model, data[:1], num_batches=1)
    model.eval()
    rep = to_onnx(model, tmp_path / f"{scheme}.onnx", data[0][:1])
    four_bit = [p for p in rep.points if p.role == "activation" and p.qmax - p.qmin == 15]
    assert rep.counts["clip"] == len(four_bit) > 0
    if scheme == "qvit":
        assert any(p.axis is not None for p in rep.points if p.point == "matmul_input")
    exact = compare_onnx(model, rep.path, data[1], optimize=False)
    assert exact["cosine"] > 0.99999, exact
    fused = compare_onnx(model, rep.path, data[1])
    assert fused["cosine"] > 0.999 and fused["top1_agreement"] >= 0.995, fused


def test_onnx_quantize_linear_rounds_as_vitquant(tmp_path) -> None:
    """ONNX QuantizeLinear (onnxruntime) gives vitquant's codes, ties included: it divides by
    the scale and rounds half to even, as ``primitives.quantize`` does."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from vitquant.quant.primitives import quantize

    scale, zp = np.float32(0.0123457), np.int8(3)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    inits = [numpy_helper.from_array(np.array(v), n) for v, n in ((scale, "s"), (zp, "z"))]
    graph = helper.make_graph(
        [node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [None])], inits,
    )  # fmt: skip
    path = tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = torch.randn(200_000) * 0.6
    x[:400] = (torch.arange(400) - 200 + 0.5) * float(scale)  # (near-)ties of x / scale
    from vitquant.export.onnx_run import onnx_session

    got = onnx_session(path).run(None, {"x": x.numpy()})[0].astype(np.int32)
    want = quantize(x, torch.tensor(scale), int(zp), -128, 127).int().numpy()
    assert (got == want).all()


def test_per_token_dynamic_inputs_are_named_as_not_qdq(data, tmp_path) -> None:
    dyn = _quantized(data, preset="ft1", act_dynamic=True)
    with pytest.raises(ConfigError, match="per-token dynamic scales"):
        to_onnx(dyn, tmp_path / "dyn.onnx", data[0][:1])
