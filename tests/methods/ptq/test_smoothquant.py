"""SmoothQuant (vitquant.methods.ptq.smoothquant): the migration keeps the float function and
folds exactly into the LayerNorms, the factors are the paper's, the search picks each layer's
best factors, W8A8 per-tensor PTQ of models with outliers gets much better, and the smoothed
model lowers to int8 kernels and round-trips through the packed export."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from helpers import digits_batches, random_nano_vit, randomize_affine
from vitquant.errors import ConfigError, DataError
from vitquant.export.io import load_quantized, save_quantized
from vitquant.methods.ptq import smooth, smooth_and_calibrate, smoothing_report
from vitquant.models.activation_stats import output_agreement
from vitquant.models.outliers import inject_outliers
from vitquant.quant import QuantConfig, calibrate, prepare, quantization_disabled
from vitquant.runtime import lower, lowering_report, onednn_available

BACKENDS = ["reference", "intmm"] + (["onednn"] if onednn_available() else [])
CFG = QuantConfig("ft1", wbits=8, abits=8)


make_model = random_nano_vit


@pytest.fixture(scope="module")
def batches() -> list[Tensor]:
    return digits_batches()


@pytest.fixture(scope="module")
def outlier_model(batches: list[Tensor]) -> nn.Module:
    """Post-LayerNorm channels x20 in every block and a massive post-GELU channel in block 1."""
    model = make_model()
    inject_outliers(model, batches, kinds=("ln", "gelu"))
    return model


def captured(model: nn.Module, name: str, batches: list[Tensor]) -> Tensor:
    """The first input of module ``name`` over all batches (float forward), ``[rows, C]``."""
    seen: list[Tensor] = []
    hook = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad(), quantization_disabled(model):
        for x in batches:
            model(x)
    hook.remove()
    return torch.cat(seen)


def logits(model: nn.Module, batches: list[Tensor]) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(x) for x in batches])


def rel(y: Tensor, ref: Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def paper_factors(x: Tensor, w: Tensor, alpha: float) -> Tensor:
    """``max|X_j|^α / max|W_:,j|^(1-α)``, computed here from the captured input."""
    return x.abs().amax(0) ** alpha / w.abs().amax(0) ** (1 - alpha)


@pytest.mark.parametrize("kind", ["ln", "act"])
def test_migration_keeps_the_float_function(
    outlier_model: nn.Module, batches: list[Tensor], kind: str
) -> None:
    ref = logits(outlier_model, batches)
    model = prepare(copy.deepcopy(outlier_model), CFG)
    done = smooth(model, batches, 0.5, kinds=(kind,), progress=False)
    want = ["attn.qkv", "mlp.fc1"] if kind == "ln" else ["mlp.fc2"]
    assert [d.name for d in done] == [f"blocks.{i}.{n}" for i in (0, 1) for n in want]
    assert all(d.kind == kind and d.alpha == 0.5 for d in done)
    assert smoothing_report(model) == done
    assert not any(q.is_calibrated for q in model.modules() if hasattr(q, "is_calibrated"))
    assert rel(logits(model, batches), ref) < 1e-5


def test_ln_fold_is_exact(outlier_model: nn.Module, batches: list[Tensor]) -> None:
    """gamma' = gamma / s, beta' = beta / s, W' = W diag(s), with s the paper's factors from the
    layer's captured input: the LayerNorm's output is divided by s, the layer's output kept."""
    before = prepare(copy.deepcopy(outlier_model), CFG)
    model = copy.deepcopy(before)
    names = ("blocks.0.attn.qkv", "blocks.1.mlp.fc1")
    x_before = {n: captured(before, n, batches) for n in names}
    smooth(model, batches, 0.5, kinds=("ln",), progress=False)
    for name, norm_name in zip(names, ("blocks.0.norm1", "blocks.1.norm2"), strict=True):
        w = before.get_submodule(name).weight.detach()
        s = paper_factors(x_before[name], w, 0.5)
        norm0, norm1 = before.get_submodule(norm_name), model.get_submodule(norm_name)
        torch.testing.assert_close(norm1.weight, norm0.weight / s, rtol=1e-6, atol=0)
        torch.testing.assert_close(norm1.bias, norm0.bias / s, rtol=1e-6, atol=0)
        lin = model.get_submodule(name)
        torch.testing.assert_close(lin.weight, w * s, rtol=1e-6, atol=0)
        assert lin.smooth_scale is None  # folded: nothing left on the layer
        x_after = captured(model, name, batches)
        torch.testing.assert_close(x_after, x_before[name] / s, rtol=1e-5, atol=1e-6)
        # the outlier channels (x20 by the injection) are flattened
        spread = x_after.abs().amax(0).max() / x_after.abs().amax(0).min()
        assert spread < x_before[name].abs().amax(0).max() / x_before[name].abs().amax(0).min()


def test_act_factors_divide_the_quantizer_input(
    outlier_model: nn.Module, batches: list[Tensor]
) -> None:
    before = prepare(copy.deepcopy(outlier_model), CFG)
    model = copy.deepcopy(before)
    name = "blocks.1.mlp.fc2"
    x = captured(before, name, batches)
    smooth(model, batches, 0.7, kinds=("act",), progress=False)
    lin = model.get_submodule(name)
    s = paper_factors(x, before.get_submodule(name).weight.detach(), 0.7)
    torch.testing.assert_close(lin.smooth_scale, s, rtol=1e-5, atol=0)
    torch.testing.assert_close(lin.weight, before.get_submodule(name).weight * s, rtol=1e-6, atol=0)
    torch.testing.assert_close(captured(model, name, batches), x)  # fc2's own input is kept
    q_in = captured(model, f"{name}.input_quantizer", batches)
    torch.testing.assert_close(q_in, x / s, rtol=1e-5, atol=1e-6)


def test_torch_encoder_layers_are_smoothed() -> None:
    """``nn.TransformerEncoderLayer`` (norm_first): the packed ``self_attn`` input projection and
    ``linear1`` take folds, ``linear2`` an explicit factor; the float function is kept."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        32, 4, 64, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    randomize_affine(enc)
    with torch.no_grad():
        enc.layers[0].norm1.weight[3] *= 20.0
    data = [torch.randn(8, 10, 32) for _ in range(2)]
    ref = logits(enc, data)
    prepare(enc, CFG)
    done = smooth(enc, data, 0.5, progress=False)
    names = [f"layers.{i}.{n}" for i in (0, 1) for n in ("self_attn", "linear1", "linear2")]
    assert [d.name for d in done] == names
    assert [d.kind for d in done] == ["ln", "ln", "act"] * 2
    w = enc.layers[0].self_attn.in_proj_weight.detach()
    assert float(w[:, 3].abs().max()) > 2 * float(w[:, 4].abs().max())  # the outlier moved in
    with quantization_disabled(enc):
        assert rel(logits(enc, data), ref) < 1e-5


def test_smoothed_state_loads_into_a_fresh_model(
    outlier_model: nn.Module, batches: list[Tensor]
) -> None:
    fresh = prepare(copy.deepcopy(outlier_model), CFG)
    assert not any(k.endswith("smooth_scale") for k in fresh.state_dict())  # off: state as before
    model = smooth_and_calibrate(copy.deepcopy(outlier_model), batches, CFG, progress=False)
    state = model.state_dict()
    assert "blocks.1.mlp.fc2.smooth_scale" in state
    other = prepare(copy.deepcopy(outlier_model), CFG)
    other.load_state_dict(state)  # strict: the fresh linears make room for the factors
    assert torch.equal(logits(other, batches), logits(model, batches))


@pytest.mark.parametrize(
    ("outliers", "kinds"), [(("ln",), ("ln",)), (("gelu",), ("act",)), (("ln", "gelu"), None)]
)
@pytest.mark.parametrize("alpha", [0.5, "search"])
def test_smoothing_cuts_w8a8_per_tensor_error(
    batches: list[Tensor], outliers: tuple[str, ...], kinds: tuple[str, ...] | None, alpha: object
) -> None:
    model = make_model()
    inject_outliers(model, batches, kinds=outliers)
    plain = calibrate(prepare(copy.deepcopy(model), CFG), batches, progress=False)
    opts = None if kinds is None else {"kinds": kinds}
    smoothed = smooth_and_calibrate(
        copy.deepcopy(model), batches, CFG, alpha, smooth_options=opts, progress=False
    )
    err_plain = output_agreement(model, plain, batches)["rel_error"]
    err_smooth = output_agreement(model, smoothed, batches)["rel_error"]
    assert err_smooth < err_plain / 2


def _layer_error(model: nn.Module, name: str, batches: list[Tensor]) -> float:
    """Relative error of one calibrated layer's quantized output on its float input, the other
    layers out of the way (the bias left out, as in the search)."""
    lin = model.get_submodule(name)
    x = captured(model, name, batches)
    with torch.no_grad():
        y_q = lin(x)
        with quantization_disabled(model):
            y_f = lin(x)
    return rel(y_q, y_f) * float(y_f.norm()) / float((y_f - lin.bias.detach()).norm())


def test_search_picks_each_layers_best_alpha(
    outlier_model: nn.Module, batches: list[Tensor]
) -> None:
    """With the max calibrator and every token in the search, each layer's chosen factors give
    the lowest error, measured here on the calibrated models, among the grid and no smoothing."""
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    opts = {"alphas": grid, "max_rows": None}

    def run(alpha: object) -> nn.Module:
        m = copy.deepcopy(outlier_model)
        if alpha is None:
            return calibrate(prepare(m, CFG), batches, method="max", progress=False)
        return smooth_and_calibrate(
            m, batches, CFG, alpha, smooth_options=opts, method="max", progress=False
        )

    searched = run("search")
    report = {d.name: d for d in smoothing_report(searched)}
    assert len(report) == 6 and {d.alpha for d in report.values()} <= {None, *grid}
    others = {a: run(a) for a in (None, *grid)}
    for name, d in report.items():
        err = _layer_error(searched, name, batches)
        assert err == pytest.approx(d.error, rel=1e-3)
        for a, m in others.items():
            assert err <= _layer_error(m, name, batches) * (1 + 1e-4), (name, d.alpha, a)
        assert d.unsmoothed_error == pytest.approx(_layer_error(others[None], name, batches), 1e-3)
    assert any(d.error < d.unsmoothed_error / 2 for d in report.values())


def test_smooth_and_calibrate_is_prepare_smooth_calibrate(
    outlier_model: nn.Module, batches: list[Tensor]
) -> None:
    a = smooth_and_calibrate(copy.deepcopy(outlier_model), batches, CFG, 0.5, progress=False)
    b = prepare(copy.deepcopy(outlier_model), CFG)
    smooth(b, batches, 0.5, progress=False)
    calibrate(b, batches, progress=False)

    def once() -> Iterator[Tensor]:  # read once: smooth_and_calibrate keeps the batches
        yield from batches

    c = smooth_and_calibrate(copy.deepcopy(outlier_model), once(), CFG, 0.5, progress=False)
    ref = logits(b, batches)
    assert torch.equal(logits(a, batches), ref) and torch.equal(logits(c, batches), ref)


def test_calibration_pass_smooths_inside_calibrate(
    outlier_model: nn.Module, batches: list[Tensor]
) -> None:
    """``passes=["smooth"]``: plain ``calibrate`` smooths first, as smooth_and_calibrate does;
    the config travels with the model, so a recalibration is refused, not smoothed twice."""
    cfg = QuantConfig(
        "ft1", wbits=8, abits=8, passes=["smooth"], pass_options={"smooth": {"alpha": 0.6}}
    )
    model = calibrate(prepare(copy.deepcopy(outlier_model), cfg), batches, progress=False)
    assert [d.alpha for d in smoothing_report(model)] == [0.6] * 6
    ref = smooth_and_calibrate(copy.deepcopy(outlier_model), batches, CFG, 0.6, progress=False)
    assert torch.equal(logits(model, batches), logits(ref, batches))
    again = smooth_and_calibrate(copy.deepcopy(outlier_model), batches, cfg, progress=False)
    assert torch.equal(logits(again, batches), logits(ref, batches))  # the pass did it
    with pytest.raises(ConfigError, match="between prepare"):
        calibrate(model, batches, progress=False)
    with pytest.raises(ConfigError, match="pass_options"):
        smooth_and_calibrate(copy.deepcopy(outlier_model), batches, cfg, 0.5)
    bad = QuantConfig("ft1", passes=["smooth"], pass_options={"smooth": {"beta": 1}})
    with pytest.raises(ConfigError, match="unknown option"):
        calibrate(prepare(copy.deepcopy(outlier_model), bad), batches, progress=False)
    bad = QuantConfig("ft1", passes=["smooth"], pass_options={"smooth": {"alpha": 2.0}})
    with pytest.raises(ConfigError, match="alpha"):
        calibrate(prepare(copy.deepcopy(outlier_model), bad), batches, progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fuse", [True, False])
def test_smoothed_model_lowers(
    outlier_model: nn.Module, batches: list[Tensor], backend: str, fuse: bool
) -> None:
    model = smooth_and_calibrate(copy.deepcopy(outlier_model), batches, CFG, progress=False)
    fc2 = [d.name for d in smoothing_report(model) if d.kind == "act" and d.alpha is not None]
    assert fc2  # the massive post-GELU channel is smoothed
    ref = logits(model, batches)
    low = lower(copy.deepcopy(model), backend, fuse=fuse, warn=False)
    assert set(fc2) <= set(lowering_report(low)["smoothed"])
    y = logits(low, batches)
    assert float(torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)) > 0.99
    assert float((y.argmax(1) == ref.argmax(1)).float().mean()) >= 0.95


def test_smoothed_model_exports_and_reloads(
    outlier_model: nn.Module, batches: list[Tensor], tmp_path: Path
) -> None:
    model = smooth_and_calibrate(copy.deepcopy(outlier_model), batches, CFG, progress=False)
    path = save_quantized(model, tmp_path / "smoothed.safetensors")
    ref = logits(model, batches)
    assert torch.equal(logits(load_quantized(path), batches), ref)
    y = logits(load_quantized(path, lower=True), batches)
    assert float(torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)) > 0.99


def test_bad_input_is_a_clear_error(outlier_model: nn.Module, batches: list[Tensor]) -> None:
    float_model = copy.deepcopy(outlier_model)
    with pytest.raises(ConfigError, match="prepared model"):
        smooth(float_model, batches)
    prepared = prepare(copy.deepcopy(outlier_model), CFG)
    for alpha in (1.5, -0.1, "auto", True):
        with pytest.raises(ConfigError, match="alpha"):
            smooth(prepared, batches, alpha, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="smoothing kind"):
        smooth(prepared, batches, kinds=("tokens",), progress=False)
    with pytest.raises(ConfigError, match="calibration method"):
        smooth(prepared, batches, method="median", progress=False)
    with pytest.raises(DataError, match="no batches"):
        smooth(prepared, [], progress=False)
    calibrate(prepared, batches, progress=False)
    with pytest.raises(ConfigError, match="between prepare"):
        smooth(prepared, batches, progress=False)
    with pytest.raises(ConfigError, match="another QuantConfig"):
        smooth_and_calibrate(
            prepare(copy.deepcopy(outlier_model), CFG), batches, QuantConfig("ft2"), 0.5
        )


def test_the_default_config_is_the_robust_path(
    outlier_model: nn.Module, batches: list[Tensor]
) -> None:
    # QuantConfig(wbits=8, abits=8) with calibrate()'s defaults smooths; ft1 (the same points
    # without smoothing) does not, and loses far more on the outlier model
    default = prepare(copy.deepcopy(outlier_model), QuantConfig(wbits=8, abits=8))
    calibrate(default, batches, progress=False)
    plain = prepare(copy.deepcopy(outlier_model), QuantConfig("ft1", wbits=8, abits=8))
    calibrate(plain, batches, progress=False)
    assert smoothing_report(default) and not smoothing_report(plain)
    e_default = output_agreement(outlier_model, default, batches)["rel_error"]
    e_plain = output_agreement(outlier_model, plain, batches)["rel_error"]
    assert e_default < 0.5 * e_plain, (e_default, e_plain)


def test_act_error_ratio_smooths_only_the_fc2_with_the_outlier(batches: list[Tensor]) -> None:
    """The robust preset smooths an ``fc2`` input only where that halves the layer's error (its
    factor costs the int8 runtime a per-channel division): the block with the injected massive
    GELU channel, not the plain ones."""
    from vitquant.models.outliers import inject_gelu_outliers

    model = make_model()
    inject_gelu_outliers(model, batches, block=1, target_ratio=100.0)
    q = calibrate(prepare(copy.deepcopy(model), QuantConfig(wbits=8, abits=8)), batches,
                  progress=False)  # fmt: skip
    act = {d.name: d for d in smoothing_report(q) if d.kind == "act"}
    assert act["blocks.1.mlp.fc2"].alpha == 0.5
    assert q.blocks[1].mlp.fc2.smooth_scale is not None
    plain = [n for n in act if n != "blocks.1.mlp.fc2"]
    assert plain and all(act[n].alpha is None for n in plain)
    assert all(q.get_submodule(n).smooth_scale is None for n in plain)
    assert all(act[n].error == act[n].unsmoothed_error for n in plain)
    with pytest.raises(ConfigError, match="act_error_ratio"):
        smooth(prepare(copy.deepcopy(model), CFG), batches, 0.5, act_error_ratio=2.0)
