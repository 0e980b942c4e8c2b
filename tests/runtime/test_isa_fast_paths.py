"""ISA-driven kernel choice, forced fallbacks, one-pass quantization, the bfloat16 residual
stream and torch.compile of lowered models, each against an independent reference (int64
matmuls, the division-based quantizer, the fake-quant model, the eager lowered model)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import vitquant
from helpers import randomize_affine
from vitquant.errors import ConfigError
from vitquant.quant import QuantConfig, calibrate, prepare
from vitquant.runtime import Int8Block, lower, lowering_report, native, onednn_available
from vitquant.runtime.isa import ISA_LEVELS, cpu_flags, cpu_isa
from vitquant.runtime.kernels import ActQ, int_bmm, quantize_act, quantize_fast

FAST_BACKENDS = ["intmm"] + (["onednn"] if onednn_available() else [])


def _calibrated(preset: str = "ft1") -> torch.nn.Module:
    torch.manual_seed(0)
    m = vitquant.create_model("vit_micro_patch4_28", num_classes=10, init_values=0.5).eval()
    randomize_affine(m)
    prepare(m, QuantConfig(preset=preset))  # type: ignore[arg-type]
    calibrate(m, [torch.randn(16, 1, 28, 28) for _ in range(2)], method="max", progress=False)
    return m


def _agreement(ref: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    rel = float((y - ref).abs().max() / ref.abs().max())
    return rel, float((y.argmax(1) == ref.argmax(1)).float().mean())


# ---- ISA detection and forcing -------------------------------------------------------------


def test_detected_level_follows_the_cpu_flags() -> None:
    isa = cpu_isa()
    flags = cpu_flags()
    assert isa.level in ISA_LEVELS and not isa.forced
    if {"amx_int8", "amx_tile"} <= flags:
        assert isa.detected == "amx" and isa.attention_method == "vnni"
        assert isa.attention_fallback == "batched"
    elif "avx512_vnni" in flags:
        assert isa.detected == "avx512_vnni" and isa.attention_method == "vnni"
        assert isa.attention_fallback == "loop"
        assert isa.bf16 == ("avx512_bf16" in flags)


def test_forcing_lower_levels_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    detected = cpu_isa().detected
    lower_levels = ISA_LEVELS[ISA_LEVELS.index(detected) :]
    for level in lower_levels:
        forced = cpu_isa(level)
        assert forced.level == level and forced.forced == (level != detected)
        if level in ("avx2", "default"):
            assert not forced.bf16 and not any(f.startswith("avx512") for f in forced.flags)
    monkeypatch.setenv("VITQUANT_ISA", "default")
    assert cpu_isa().level == "default"
    with pytest.raises(ConfigError, match="unknown ISA"):
        cpu_isa("sse9")
    higher = ISA_LEVELS[: ISA_LEVELS.index(detected)]
    for level in higher:
        with pytest.raises(ConfigError, match="cannot force"):
            cpu_isa(level)


@pytest.mark.parametrize("level", ["avx2", "default"])
def test_forced_fallbacks_lower_and_match_fake_quant(level: str) -> None:
    m = _calibrated()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        ref = m(x)
        low = lower(copy.deepcopy(m), isa=level, warn=False)
        y = low(x)
    rep = lowering_report(low)
    assert rep["isa"]["level"] == level and rep["attention"] == "loop"
    assert rep["backend"] == ("intmm" if level == "default" or not onednn_available() else "onednn")
    rel, agree = _agreement(ref, y)
    assert rel < 0.1 and agree >= 0.9


def test_report_names_isa_attention_and_float_dtype() -> None:
    m = lower(_calibrated(), warn=False)
    rep = lowering_report(m)
    isa = cpu_isa()
    assert rep["isa"]["level"] == isa.level and rep["float_dtype"] == "float32"
    if isa.attention_method == "vnni" and native.available():
        assert rep["attention"] == "vnni" and rep["attention_note"] == ""
    elif isa.attention_fallback == "batched":
        assert rep["attention"] == ("batched-bf16" if isa.bf16 else "batched")
    else:
        assert rep["attention"] == "loop"
    ref = lower(_calibrated(), "reference", warn=False)
    assert lowering_report(ref)["attention"] == "reference"


# ---- exact batched attention products ------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True])
def test_batched_float_product_of_codes_is_exact(bf16: bool) -> None:
    """197 tokens x 64 channels, full int8 range: the (bfloat16) float GEMM on the codes equals
    the int64 product exactly, as does the per-head loop."""
    torch.manual_seed(0)
    q = torch.randint(-128, 128, (2, 3, 197, 64), dtype=torch.int8)
    k = torch.randint(-128, 128, (2, 3, 197, 64), dtype=torch.int8)
    ref = q.long() @ k.long().transpose(-2, -1)
    got = int_bmm(q, k.transpose(-2, -1), method="batched", bf16=bf16)
    assert got.dtype == torch.int32 and torch.equal(got.long(), ref)
    p = torch.randint(0, 256, (2, 3, 197, 197), dtype=torch.uint8)  # unsigned probabilities
    v = torch.randint(-128, 128, (2, 3, 197, 64), dtype=torch.int8)
    got = int_bmm(p, v, method="batched", bf16=bf16)
    assert torch.equal(got.long(), p.long() @ v.long())
    assert torch.equal(int_bmm(q, v.transpose(-2, -1)).long(), q.long() @ v.long().mT)


# ---- one-pass quantization -----------------------------------------------------------------


@pytest.mark.parametrize(
    "act",
    [
        ActQ(0.05, 0, -128, 127),
        ActQ(0.02, 17, 0, 255),
        ActQ(0.1, 0, -8, 7),
        ActQ(1 / 255, 0, 0, 255),
    ],
)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_quantize_fast_matches_the_division_quantizer(act: ActQ, dtype: torch.dtype) -> None:
    """Same codes as the fake quantizer's ``round(x / s)`` but where ``x / s`` is within an ulp
    of a midpoint: at most one step apart, and rarely."""
    torch.manual_seed(0)
    x = torch.randn(512, 96) * 3
    ref = quantize_act(x, act, dtype)
    got = quantize_fast(x, act, dtype)
    diff = (got.long() - ref.long()).abs()
    assert got.dtype == dtype and diff.max() <= 1 and diff.float().mean() < 1e-3
    lo, hi = act.qmin + act.offset(dtype), act.qmax + act.offset(dtype)
    assert int(got.min()) >= lo and int(got.max()) <= hi


def test_quantize_fast_prescaled_transposed_and_fallback() -> None:
    a = ActQ(0.07, 3, 0, 255)
    x = torch.randn(4, 6, 10, 8)
    pre = x / a.scale + a.zero_point
    assert torch.equal(quantize_fast(pre, a, torch.uint8, prescaled=True), quantize_act(x, a))
    t = quantize_fast(x.transpose(1, 2), a, torch.uint8)
    assert t.is_contiguous() and torch.equal(t, quantize_fast(x.transpose(1, 2).contiguous(), a))
    b = x.bfloat16()  # not float32: the exact chain
    assert torch.equal(quantize_fast(b, a), quantize_act(b, a))


# ---- bfloat16 residual stream --------------------------------------------------------------


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bfloat16_residual_stream_agrees_with_fake_quant(backend: str) -> None:
    m = _calibrated()
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        ref = m(x)
        low = lower(copy.deepcopy(m), backend, float_dtype=torch.bfloat16, warn=False)
        y = low(x)
    assert y.dtype == torch.float32
    blocks = [b for b in low.modules() if isinstance(b, Int8Block)]
    assert [b.cast_out for b in blocks] == [False] * (len(blocks) - 1) + [True]
    rel, agree = _agreement(ref, y)
    assert lowering_report(low)["float_dtype"] == "bfloat16"
    assert rel < 0.1 and agree >= 0.9
    with pytest.raises(ConfigError, match="float_dtype"):
        lower(_calibrated(), float_dtype=torch.float16)


# ---- deepcopy and torch.compile ------------------------------------------------------------


def test_lowered_model_deepcopies() -> None:
    low = lower(_calibrated(), warn=False)
    twin = copy.deepcopy(low)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), low(x), rtol=0, atol=0)


def test_lowered_model_traces_in_one_graph() -> None:
    """Dynamo traces the whole lowered model (fullgraph: no graph break; the kernels are custom
    operators with fake implementations) and the traced graph computes the eager function."""
    torch._dynamo.reset()
    low = lower(_calibrated(), warn=False)
    x = torch.randn(4, 1, 28, 28)
    compiled = torch.compile(low, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        eager = low(x)
        traced = compiled(x)
    # eager quantizes with torch.quantize_per_tensor, the graph with the division chain
    rel, agree = _agreement(eager, traced)
    assert rel < 0.02 and agree == 1.0


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("VITQUANT_INDUCTOR_TESTS"),
    reason="Inductor C++ compilation takes about a minute on 2 cores: VITQUANT_INDUCTOR_TESTS=1",
)
@pytest.mark.parametrize("float_dtype", [torch.float32, torch.bfloat16])
def test_lowered_model_compiles_with_inductor(float_dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    low = lower(_calibrated(), float_dtype=float_dtype, warn=False)
    x = torch.randn(4, 1, 28, 28)
    compiled = torch.compile(low)
    with torch.no_grad():
        eager = low(x)
        rel, agree = _agreement(eager, compiled(x))
    assert rel < 0.02 and agree == 1.0


@pytest.mark.parametrize("attention", ["batched", "batched-bf16", "vnni"])
def test_batched_attention_computes_the_loops_integers(attention: str) -> None:
    """The AMX path (one exact float GEMM for all heads, bfloat16 on CPUs that have it), the
    native VNNI kernel and the per-head int8 loop produce identical integer products, hence
    identical logits."""
    if attention == "vnni" and not native.available():
        pytest.skip(f"native kernel unavailable: {native.why_unavailable()}")
    m = _calibrated()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        loop = lower(copy.deepcopy(m), attention="loop", warn=False)
        batched = lower(copy.deepcopy(m), attention=attention, warn=False)
        assert lowering_report(batched)["attention"] == attention
        torch.testing.assert_close(batched(x), loop(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="attention"):
        lower(copy.deepcopy(m), attention="sdpa")
