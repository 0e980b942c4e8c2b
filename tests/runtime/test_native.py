"""vitquant.runtime.native: the C AVX512-VNNI attention and LayerNorm kernels, built on first use.

Checked against int64 ``torch.matmul`` (exact integer products) and ``torch.softmax`` followed
by ``torch.quantize_per_tensor`` (the eager runtime's own path) and ATen's LayerNorm followed by
rounding, on shapes that hit every edge of the kernels (rows past the 6-row tile, columns past
16/64, inner sizes that are not multiples of 4, strided views like the qkv epilogue's, batch
dimensions of any rank, stride-0 broadcasts).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from vitquant.errors import ConfigError
from vitquant.quant import QuantConfig, calibrate, prepare
from vitquant.runtime import Int8Block, lower, lowering_report, native, rows
from vitquant.runtime.kernels import int_bmm

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.why_unavailable()}"
)


def _ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.long() @ b.long()).int()


def _codes(*shape: int, dtype: torch.dtype = torch.int8, gen: torch.Generator) -> torch.Tensor:
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
    return torch.randint(lo, hi, shape, dtype=dtype, generator=gen)


@needs_native
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 3, 17), (6, 4, 16), (7, 8, 64), (13, 7, 65),
                                   (197, 64, 197), (197, 197, 64), (12, 130, 5)])  # fmt: skip
@pytest.mark.parametrize("a_dtype", [torch.int8, torch.uint8])
def test_vnni_bmm_is_exact_in_both_layouts(m: int, k: int, n: int, a_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = _codes(2, 3, m, k, dtype=a_dtype, gen=gen)
    b = _codes(2, 3, k, n, gen=gen)
    ref = _ref(a, b)
    assert torch.equal(native.vnni_bmm(a, b), ref)  # rows of b contiguous
    bt = b.transpose(-2, -1).contiguous().transpose(-2, -1)  # columns contiguous (k.mT)
    assert torch.equal(native.vnni_bmm(a, bt), ref)
    assert torch.equal(native.vnni_bmm(a, b[:, :, :, :].flip(-1).flip(-1)), ref)
    every_other = torch.cat([b, b], -1)[..., ::2]  # neither rows nor columns contiguous
    assert torch.equal(native.vnni_bmm(a, every_other), _ref(a, every_other))


@needs_native
def test_vnni_bmm_reads_the_qkv_epilogues_strided_views() -> None:
    gen = torch.Generator().manual_seed(0)
    b, n, h, d = 2, 197, 3, 64
    codes = _codes(b, n, 3, h, d, gen=gen).permute(2, 0, 3, 1, 4)  # what Int8Attention slices
    q, k, v = codes[0], codes[1], codes[2]
    p = _codes(b, h, n, n, gen=gen)
    assert torch.equal(native.vnni_bmm(q, k.transpose(-2, -1)), _ref(q, k.transpose(-2, -1)))
    assert torch.equal(native.vnni_bmm(p, v), _ref(p, v))
    # heads last: [B, N, H, D], the order proj reads attention's output in
    last = native.vnni_bmm(p, v, heads_last=True)
    assert last.is_contiguous() and torch.equal(last, _ref(p, v).permute(0, 2, 1, 3))
    with pytest.raises(ConfigError, match="heads_last"):
        native.vnni_bmm(p[0], v[0], heads_last=True)
    # the int_bmm entry point takes the same route and broadcasts batch dimensions
    w = _codes(1, 1, 64, 8, gen=gen)
    assert torch.equal(int_bmm(q, w, method="vnni"), _ref(q, w.expand(b, h, 64, 8)))


@needs_native
@pytest.mark.parametrize("batch", [(), (4,), (2, 3), (2, 2, 2)])
def test_vnni_bmm_any_batch_rank(batch: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(batch))
    a, b = _codes(*batch, 9, 12, gen=gen), _codes(*batch, 12, 20, gen=gen)
    out = native.vnni_bmm(a, b)
    assert out.shape == (*batch, 9, 20) and torch.equal(out, _ref(a, b))


@needs_native
@pytest.mark.parametrize(
    "dtype,zp,lo,hi",
    [(torch.uint8, 128, 0, 255), (torch.uint8, 3, 1, 200), (torch.int8, 0, -128, 127),
     (torch.int8, -5, -100, 90)],
)  # fmt: skip
def test_vnni_bmm_quant_codes_in_both_layouts(
    dtype: torch.dtype, zp: int, lo: int, hi: int
) -> None:
    """The quantizing epilogue equals rescale-then-quantize of the exact product, also written
    heads-last (``[B, M, H, N]``: the transposing pass attention's output needs for proj)."""
    gen = torch.Generator().manual_seed(zp)
    p, v = _codes(2, 3, 197, 197, gen=gen).abs(), _codes(2, 3, 197, 64, gen=gen)
    mul, scale = 1 / 127 * 0.05, 0.013
    acc = _ref(p, v).float() * mul
    want = (torch.round(acc * (1.0 / scale)) + zp).clamp(lo, hi).to(dtype)
    got = native.vnni_bmm_quant(p, v, mul, scale, zp, lo, hi, dtype)
    assert got.dtype == dtype and got.shape == want.shape
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-4  # float rounding order only
    last = native.vnni_bmm_quant(p, v, mul, scale, zp, lo, hi, dtype, heads_last=True)
    assert last.shape == (2, 197, 3, 64) and last.is_contiguous()
    assert torch.equal(last, got.transpose(1, 2))
    with pytest.raises(ConfigError, match="quantizer"):
        native.vnni_bmm_quant(p, v, mul, scale, 0, -1, 255, torch.uint8)


def _softmax_codes(q: torch.Tensor, kt: torch.Tensor, alpha: float, scale: float, zp: int,
                   lo: int, hi: int) -> torch.Tensor:  # fmt: skip
    """What the unfused eager runtime computes: rescale, torch.softmax, quantize, clamp."""
    p = torch.softmax(_ref(q, kt).float().mul_(alpha), -1)
    codes = torch.round(p * (1.0 / scale)) + zp
    return codes.clamp_(lo, hi).to(torch.int8)


@needs_native
@pytest.mark.parametrize(
    "n,alpha,scale,zp,lo,hi",
    [(197, 2e-4, 1 / 127, 0, -128, 127), (33, 1e-3, 1 / 255, -128, -128, 127),
     (5, 5e-3, 0.02, 0, 0, 15), (64, 0.0, 1 / 127, 0, -127, 127)],
)  # fmt: skip
def test_qk_softmax_matches_softmax_then_quantize(
    n: int, alpha: float, scale: float, zp: int, lo: int, hi: int
) -> None:
    gen = torch.Generator().manual_seed(n)
    q = _codes(2, 3, n, 64, gen=gen)
    k = _codes(2, 3, n, 64, gen=gen)
    got = native.qk_softmax(q, k.transpose(-2, -1), alpha, scale, zp, lo, hi)
    want = _softmax_codes(q, k.transpose(-2, -1), alpha, scale, zp, lo, hi)
    diff = (got.int() - want.int()).abs()
    # the exponential differs from torch's by an ulp or two: a code may move by one step only
    # where a probability sits on a rounding midpoint
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert got.min() >= lo and got.max() <= hi


@needs_native
def test_lowered_blocks_normalise_with_the_native_kernel(monkeypatch) -> None:  # noqa: ANN001
    """Eager, each fused block's LayerNorm-and-quantize is the native pass; its codes are those
    of ATen's LayerNorm then ``quantize_per_tensor`` (the path under ``torch.compile``)."""
    from vitquant.runtime.fused import LayerNormQuant
    from vitquant.runtime.kernels import quantize_fast

    m = lower(_calibrated(), warn=False)
    lns = [x for x in m.modules() if isinstance(x, LayerNormQuant)]
    assert lns
    calls = []
    kernel = rows.layernorm_quant
    monkeypatch.setattr(rows, "layernorm_quant", lambda *a: calls.append(1) or kernel(*a))
    x = torch.randn(8, 17, lns[0].shape[0]) * 4
    with torch.no_grad():
        m(torch.randn(2, 1, 28, 28))
    assert len(calls) == len(lns)  # every fused LayerNorm of the forward ran natively
    for ln in lns:
        got = ln(x)
        y = torch.nn.functional.layer_norm(x, ln.shape, ln.weight, ln.bias, ln.eps)
        want = quantize_fast(y, ln.act, ln.dtype, prescaled=True)
        assert got.dtype == want.dtype
        assert (got.int() - want.int()).abs().max() <= 1


def test_the_sources_build_where_the_cpu_and_a_compiler_allow() -> None:
    """A compile error in the shipped C sources must fail here, not skip every native test."""
    why = native.why_unavailable()
    assert not why.startswith("build failed"), why


def test_bad_operands_are_refused() -> None:
    if not native.available():
        with pytest.raises(ConfigError, match="unavailable"):
            z = torch.zeros(2, 2, dtype=torch.int8)
            native.vnni_bmm(z, z)
        return
    a = torch.zeros(2, 3, 4, dtype=torch.int8)
    with pytest.raises(ConfigError, match="int8"):
        native.vnni_bmm(a.float(), a.transpose(-2, -1))
    with pytest.raises(ConfigError, match="do not match"):
        native.vnni_bmm(a, torch.zeros(2, 5, 4, dtype=torch.int8))
    with pytest.raises(ConfigError, match="quantizer"):
        native.qk_softmax(a, a.transpose(-2, -1), 1.0, 0.1, 0, 0, 255)


def _calibrated() -> torch.nn.Module:
    from vitquant.models import create_model

    torch.manual_seed(0)
    m = create_model("vit_micro_patch7_28", num_classes=10).eval()
    q = prepare(m, QuantConfig(preset="ft1"))
    calibrate(q, [torch.randn(32, 1, 28, 28)], method="max", progress=False)
    return q


@needs_native
def test_lowered_model_with_native_attention_agrees_with_the_loop() -> None:
    """``attention="vnni"`` fuses q·kᵀ, softmax and quantization into one kernel in every block;
    its logits agree with the per-head loop's (same integers but for rare one-step codes)."""
    m = _calibrated()
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        fake = m(x)
        loop = lower(copy.deepcopy(m), attention="loop", warn=False)
        vnni = lower(copy.deepcopy(m), attention="vnni", warn=False)
        y_loop, y_vnni = loop(x), vnni(x)
    assert lowering_report(vnni)["attention"] == "vnni"
    blocks = [b for b in vnni.modules() if isinstance(b, Int8Block)]
    assert blocks and all(b.attn.softmax_codes is not None for b in blocks)
    assert all(b.attn.av_codes is not None for b in blocks)
    for b in loop.modules():
        if isinstance(b, Int8Block):
            assert b.attn.softmax_codes is None and b.attn.av_codes is None
    cos = torch.nn.functional.cosine_similarity(y_vnni.flatten(), y_loop.flatten(), dim=0)
    assert cos > 0.9999
    assert (y_vnni.argmax(1) == y_loop.argmax(1)).float().mean() >= 0.98
    assert (y_vnni.argmax(1) == fake.argmax(1)).float().mean() >= 0.9


_SUBPROCESS = """
import torch, warnings
from vitquant.runtime import native, lower, lowering_report
from vitquant.runtime.isa import cpu_isa
print("available", native.available())
print("why", native.why_unavailable())
print("path", native.library_path())
print("level", cpu_isa().level)
"""


def _run(env: dict[str, str], code: str = _SUBPROCESS) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=300, check=True,
    ).stdout  # fmt: skip
    return dict(line.split(" ", 1) for line in out.strip().splitlines())


def test_disabled_by_environment_falls_back_to_the_loop(tmp_path) -> None:  # noqa: ANN001
    code = (
        _SUBPROCESS
        + """
import copy
from vitquant.models import create_model
from vitquant.quant import QuantConfig, calibrate, prepare
q = prepare(create_model("vit_micro_patch7_28", num_classes=10).eval(), QuantConfig(preset="ft1"))
calibrate(q, [torch.randn(8, 1, 28, 28)], method="max", progress=False)
low = lower(copy.deepcopy(q), warn=False)
print("attention", lowering_report(low)["attention"])
print("note", lowering_report(low)["attention_note"] or "-")
try:
    lower(copy.deepcopy(q), attention="vnni", warn=False)
except Exception as e:
    print("forced", type(e).__name__, str(e))
"""
    )
    res = _run({"VITQUANT_NATIVE": "0", "VITQUANT_CACHE_DIR": str(tmp_path)}, code)
    assert res["available"] == "False" and "VITQUANT_NATIVE" in res["why"]
    assert res["forced"].startswith("ConfigError") and "unavailable" in res["forced"]
    if res["level"] in ("avx512_vnni", "amx"):  # the ISA's choice is native: it says why not
        want = ("loop",) if res["level"] == "avx512_vnni" else ("batched", "batched-bf16")
        assert res["attention"] in want and "VITQUANT_NATIVE" in res["note"]
    else:
        assert res["attention"] == "loop"
    assert not any(tmp_path.iterdir())  # nothing was built


@needs_native
def test_built_once_into_the_cache_and_reused(tmp_path) -> None:  # noqa: ANN001
    env = {"VITQUANT_CACHE_DIR": str(tmp_path)}
    first = _run(env)
    assert first["available"] == "True"
    lib = first["path"]
    assert lib.startswith(str(tmp_path)) and os.path.exists(lib)
    mtime = os.stat(lib).st_mtime_ns
    second = _run(env)
    assert second["path"] == lib and os.stat(lib).st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(lib)]  # no temp files left


def test_a_failing_compiler_falls_back_with_the_reason(tmp_path) -> None:  # noqa: ANN001
    """A compiler that fails (here ``CC=false``) leaves the kernel unavailable with the reason,
    and ``lower`` still works (the ISA's fallback method)."""
    code = (
        _SUBPROCESS
        + """
import copy
from vitquant.models import create_model
from vitquant.quant import QuantConfig, calibrate, prepare
q = prepare(create_model("vit_nano_patch4_28").eval(), QuantConfig(preset="ft1"))
calibrate(q, [torch.randn(4, 1, 28, 28)], method="max", progress=False)
low = lower(copy.deepcopy(q), warn=False)
print("attention", lowering_report(low)["attention"])
print("shape", tuple(low(torch.randn(2, 1, 28, 28)).shape))
"""
    )
    false = "/bin/false" if os.path.exists("/bin/false") else "false"
    env = {"CC": false, "VITQUANT_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    res = _run(env, code)
    assert res["available"] == "False"
    if res["level"] in ("avx512_vnni", "amx"):  # the build was attempted, and its failure named
        assert "build failed" in res["why"] and res["attention"] != "vnni"
    assert res["shape"] == "(2, 10)"
