"""Fused integer transformer blocks: activations stay quantized between the ops of a block.

A pre-norm ViT block (timm / vitquant ``Block``: ``norm1, attn, ls1, drop_path1, add1, norm2,
mlp, ls2, drop_path2, add2``) lowered op by op spends much of its time quantizing float
activations in separate passes. :class:`Int8Block` removes most of them, in the way PyTorch
Inductor's x86 int8 path and FasterTransformer's int8 ViT kernels do:

* ``qkv``: when the GEMM output is float in the fake-quant model (ft1), the q/k/v quantizer scales
  are folded into the per-channel requantization of the GEMM epilogue, so the kernel writes the
  int8 codes of ``q·scale``, ``k`` and ``v`` directly;
* ``q·kᵀ`` and ``attn·v`` run as exact integer products of all heads at once
  (:func:`~vitquant.runtime.kernels.int8_bmm`) with int32 accumulation; the ``attn·v``
  result is rescaled and quantized for ``proj`` in one pass;
* ``proj`` and ``fc2`` add the residual in their epilogue (when the residual adds are not
  quantized), LayerScale is folded into their output scales;
* ``fc1`` applies GELU in its epilogue and requantizes straight to ``fc2``'s input grid (when it
  has no after-GEMM quantizer), so the 4x wider hidden activation only exists as uint8. A
  SmoothQuant factor on ``fc2``'s input (``smooth_scale``, which GELU keeps out of ``fc1``) is a
  per-channel divisor of that requantization (``round(gelu(y) / (s_c * scale))``; on oneDNN,
  whose epilogue has one output scale, GELU stays in the epilogue and the requantization is
  one pass after it).

A linear with per-token dynamic input scales (:class:`~vitquant.runtime.dynamic.
DynamicInt8Linear`) keeps the block fused: the LayerNorm before ``qkv``/``fc1`` quantizes each
row on its own grid (:class:`~vitquant.runtime.layernorm.LayerNormRowQuant`), ``attn·v`` and
GELU write float that one row pass quantizes; the row scale cannot enter oneDNN's one-scale
epilogue, so oneDNN writes float and one native pass applies it with the bias, the residual
and, after ``qkv``, the q/k/v grids (the codes go to the same fused attention kernels).

Smoothing factors of ``qkv``/``fc1`` inputs are folded into the LayerNorm-and-quantize pass
(:class:`LayerNormQuant`), those of ``proj`` into the quantization of the ``attn·v`` result.

Everything the fused path cannot express (log2 softmax quantizers, quantized residual adds,
after-GEMM quantizers before GELU) falls back to the block's own modules for that op, so the
function computed is always the fake-quant model's, up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitquant.runtime import native, ops
from vitquant.runtime.dynamic import DynamicInt8Linear, linear_from_quant
from vitquant.runtime.kernels import ActQ, quantize_act, quantize_fast
from vitquant.runtime.layernorm import LayerNormQuant, norm_quant
from vitquant.runtime.mlp import Int8Mlp
from vitquant.runtime.modules import (
    Int8Linear,
    Int8MatMul,
    _is_active,
    act_from_quantizer,
    linear_output,
    rescale,
)

__all__ = ["Int8Attention", "Int8Mlp", "Int8Block", "LayerNormQuant", "block_unsupported"]

_BLOCK_ATTRS = ("norm1", "attn", "ls1", "drop_path1", "add1", "norm2", "mlp", "ls2", "drop_path2")


_SQRT_HALF = 0.5**0.5


def _log2_sqrt2(m: nn.Module, backend: str) -> tuple[float, int] | None:
    """``(scale, bits)`` of an active per-tensor log-√2 quantizer of at most 4 bits on attn·v's
    probabilities (the native kernels' grid), else None."""
    q = getattr(m, "a_quantizer", None)
    if backend == "reference" or not _is_active(q) or not native.available():
        return None
    qp = q.qparams()  # type: ignore[union-attr,operator]
    if qp.kind != "log2_sqrt2" or qp.scale.numel() != 1 or qp.bits > 4:
        return None
    return float(qp.scale.reshape(-1)[0]), int(qp.bits)


def _identity_like(m: nn.Module | None) -> bool:
    """Modules that are the identity at inference (Identity, Dropout, DropPath)."""
    if m is None or isinstance(m, (nn.Identity, nn.Dropout)):
        return True
    return type(m).__name__ == "DropPath"


def _layer_scale(m: nn.Module) -> Tensor | None | bool:
    """None for identity, the gamma of a LayerScale, False for anything else."""
    if _identity_like(m):
        return None
    gamma = getattr(m, "gamma", None)
    if isinstance(gamma, Tensor) and type(m).__name__ == "LayerScale":
        return gamma.detach().float()
    return False


def _plain_add(m: nn.Module | None) -> bool:
    """True when a residual add has no active quantizer (it can go into a GEMM epilogue)."""
    if m is None:
        return False
    return not any(_is_active(getattr(m, s, None)) for s in ("a_quantizer", "b_quantizer"))


def block_unsupported(block: nn.Module) -> str:
    """Why ``block`` cannot become an :class:`Int8Block` ("" when it can)."""
    for attr in _BLOCK_ATTRS:
        if not hasattr(block, attr):
            return f"not a pre-norm block (no {attr})"
    attn = block.attn
    for attr in ("qkv", "qk_matmul", "softmax", "av_matmul", "proj", "num_heads", "head_dim"):
        if not hasattr(attn, attr):
            return f"attention has no {attr}"
    if getattr(attn, "gate", None) is not None:
        return "gated attention"
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        return "attention output norm"
    if not (_identity_like(attn.q_norm) and _identity_like(attn.k_norm)):
        return "q/k norms"
    for attr in ("fc1", "act", "fc2"):
        if not hasattr(block.mlp, attr):
            return f"MLP has no {attr}"
    for ls in (block.ls1, block.ls2):
        if _layer_scale(ls) is False:
            return f"unsupported layer scale {type(ls).__name__}"
    return ""


class Int8Attention(nn.Module):
    """Multi-head self-attention with int8 GEMMs (see the module docstring)."""

    def __init__(
        self,
        attn: nn.Module,
        qkv: Int8Linear | DynamicInt8Linear,
        proj: Int8Linear | DynamicInt8Linear,
        backend: str,
        proj_gamma: Tensor | None = None,
        *,
        method: str | None = None,
        bf16: bool = False,
        float_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.float_dtype = float_dtype
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scale)
        self.backend = backend
        self.qkv, self.proj = qkv, proj
        self.softmax = attn.softmax
        self.qk_float, self.av_float = attn.qk_matmul, attn.av_matmul
        self.qk, _ = Int8MatMul.from_quant(attn.qk_matmul, backend, method=method, bf16=bf16)
        self.av, _ = Int8MatMul.from_quant(attn.av_matmul, backend, method=method, bf16=bf16)
        #: (scale, bits) of log-√2 probabilities (RepQ-ViT) that the native kernels take
        self.p_log2 = None if self.av is not None else _log2_sqrt2(attn.av_matmul, backend)
        #: v's grid: attn·v's second operand
        self.v_act = self.av.b if self.av is not None else None
        if self.p_log2 is not None:
            self.v_act = act_from_quantizer(getattr(attn.av_matmul, "b_quantizer", None))[0]
        # LayerScale after proj folded into its epilogue (only without an after-GEMM quantizer)
        self.proj_scale: Tensor | None = None
        self.proj_bias = proj.bias
        if proj_gamma is not None:
            self.proj_scale = proj.weight.scale * proj_gamma
            self.proj_bias = None if proj.bias is None else proj.bias * proj_gamma
        self._fold_qkv()
        #: (alpha, scale, zero point, lo, hi) of the native q·kᵀ-softmax-quantize kernel
        self.softmax_codes = self._fused_softmax()
        #: (mul, scale, zero point, lo, hi, dtype) of the native attn·v kernel that quantizes
        #: for ``proj`` in its epilogue
        self.av_codes = self._fused_av()
        #: attn·v as int32 rows in ``[B, N, H·D]`` order for a per-token ``proj`` (native)
        self.av_rows = self._av_rows()
        #: (alpha, scale, bits) of :func:`~vitquant.runtime.native.qk_softmax_log2`
        self.log2_codes = self._fused_log2()
        # probabilities are in [0, 1]: their codes need no clamp when 1 maps inside the grid
        self.p_clamp = True
        if self.av is not None:
            a = self.av.a
            self.p_clamp = not (
                a.qmin <= a.zero_point and round(1 / a.scale) + a.zero_point <= a.qmax
            )

    def _fold_qkv(self) -> None:
        """Prepares the qkv epilogue that writes q/k/v int8 codes directly (ft1)."""
        self.qkv_codes: ActQ | None = None
        qk, v = self.qk, self.v_act
        if self.qkv.out_q is not None or qk is None or v is None:
            return
        sections = (qk.a, qk.b, v)
        if any(s.zero_point or s.offset(torch.int8) for s in sections):
            return
        lo, hi = max(s.qmin for s in sections), min(s.qmax for s in sections)
        if any((s.qmin, s.qmax) != (lo, hi) for s in sections):
            return
        c = self.num_heads * self.head_dim
        if self.qkv.out_features != 3 * c:
            return
        div = torch.cat(
            [torch.full((c,), s) for s in (qk.a.scale / self.scale, qk.b.scale, v.scale)]
        ).to(self.qkv.weight.scale.device)
        self.qkv_scale = self.qkv.weight.scale / div
        self.qkv_bias = None if self.qkv.bias is None else self.qkv.bias / div
        self.qkv_codes = ActQ(1.0, 0, lo, hi)

    def _fused_softmax(self) -> tuple[float, float, int, int, int] | None:
        """The arguments of :func:`~vitquant.runtime.native.qk_softmax` when q·kᵀ, softmax and
        the probabilities' quantization can run as that one kernel (q/k/v codes from the qkv
        epilogue, the ``vnni`` attention method, a plain softmax, no after-GEMM quantizers)."""
        qk, av = self.qk, self.av
        if self.qkv_codes is None or qk is None or av is None or qk.method != "vnni":
            return None
        if self.backend == "reference" or qk.output_quantizer is not None:
            return None
        sm = self.softmax
        if not isinstance(sm, nn.Softmax) or sm.dim not in (-1, 3):
            return None
        if _is_active(getattr(sm, "input_quantizer", None)) or av.output_quantizer is not None:
            return None
        a = av.a
        off = a.offset(torch.int8)
        zp, lo, hi = a.zero_point + off, a.qmin + off, a.qmax + off
        if not (-128 <= lo <= hi <= 127 and -128 <= zp <= 127):
            return None
        return qk.a.scale * qk.b.scale, a.scale, zp, lo, hi

    def _fused_av(self) -> tuple[float, float, int, int, int, torch.dtype] | None:
        """The arguments of :func:`~vitquant.runtime.native.vnni_bmm_quant` when attn·v can
        write ``proj``'s input codes directly (the ``vnni`` method, zero points of zero, no
        SmoothQuant divisors on ``proj``'s input)."""
        av, p = self.av, self.proj
        if av is None or av.method != "vnni" or self.backend == "reference" or p.dynamic:
            return None
        if av.output_quantizer is not None or p.in_div is not None:
            return None
        if not self._av_unshifted():
            return None
        pa = p.act
        off = pa.offset(p.dtype)
        lo, hi = pa.qmin + off, pa.qmax + off
        bound = (0, 255) if p.dtype == torch.uint8 else (-128, 127)
        if not bound[0] <= lo <= hi <= bound[1]:
            return None
        return av.a.scale * av.b.scale, pa.scale, pa.zero_point + off, lo, hi, p.dtype

    def _fused_log2(self) -> tuple[float, float, int] | None:
        """Log-√2 probabilities from one native kernel and attn·v as two exact integer
        products (:func:`~vitquant.runtime.native.qk_softmax_log2`), where q/k/v come as codes
        from the qkv epilogue (so with zero points of zero) and the softmax is plain."""
        qk, sm = self.qk, self.softmax
        if self.p_log2 is None or self.qkv_codes is None or qk is None or qk.method != "vnni":
            return None
        if qk.output_quantizer is not None:
            return None
        if not isinstance(sm, nn.Softmax) or sm.dim not in (-1, 3):
            return None
        if _is_active(getattr(sm, "input_quantizer", None)):
            return None
        return qk.a.scale * qk.b.scale, *self.p_log2

    def _av_log2(
        self, q8: Tensor, k8: Tensor, v8: Tensor, b: int, n: int, c: int, residual: Tensor | None
    ) -> Tensor:
        """Log-√2 attention: ``p·v = -(E·v + O·v / √2) · s_p · 2^-m0`` (``qk_softmax_log2``),
        the two products exact int32 sums, then ``proj``."""
        alpha, scale, bits = self.log2_codes  # type: ignore[misc]
        pp = native.qk_softmax_log2(q8, k8.transpose(-2, -1), alpha, scale, bits)
        even = native.vnni_bmm(pp[0], v8, heads_last=True)
        odd = native.vnni_bmm(pp[1], v8, heads_last=True)
        mul = -scale * 2.0 ** -((2**bits - 2) // 2) * self.v_act.scale  # type: ignore[union-attr]
        o = torch.mul(odd, mul * _SQRT_HALF).add_(even, alpha=mul)  # two passes, float32 out
        return self._proj(self.proj.quantize_input(o.reshape(b, n, c)), residual)

    def _av_rows(self) -> bool:
        av, p = self.av, self.proj
        if av is None or av.method != "vnni" or self.backend == "reference" or not p.dynamic:
            return False
        unshifted = self._av_unshifted()
        return unshifted and av.output_quantizer is None and p.smooth is None and native.available()

    def _av_unshifted(self) -> bool:
        """attn·v's operands are stored as int8 with zero points of zero (the native kernels'
        operands)."""
        av = self.av
        assert av is not None
        return not (
            av.a.zero_point + av.a.offset(torch.int8) or av.b.zero_point + av.b.offset(torch.int8)
        )

    def forward(
        self, x: Tensor, residual: Tensor | None = None, xq: Tensor | None = None
    ) -> Tensor:
        """Attention of ``x`` (float ``[B, N, C]``); ``xq``: its codes if already quantized;
        ``residual``: added to the output in the ``proj`` epilogue."""
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        if xq is None:
            xq = self.qkv.quantize_input(x)
        qk, av = self.qk, self.av
        fast = self.backend != "reference"
        if self.qkv_codes is not None and qk is not None and self.v_act is not None:
            codes = self.qkv.forward_codes(
                xq, bias=self.qkv_bias, out=self.qkv_codes, out_dtype=torch.int8,
                w_scale=self.qkv_scale,
            )  # fmt: skip
            # strided views: the per-head GEMMs read rows of any stride, no copy
            codes = codes.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
            q8, k8, v8 = codes[0], codes[1], codes[2]
            if not fast:
                v8 = v8.contiguous()
            if self.log2_codes is not None and not torch.compiler.is_compiling():
                return self._av_log2(q8, k8, v8, b, n, c, residual)
            if self.softmax_codes is not None:  # one native kernel up to the codes of p
                if torch.compiler.is_compiling():
                    pq = ops.qk_softmax(q8, k8.transpose(-2, -1), *self.softmax_codes)
                else:
                    pq = native.qk_softmax(q8, k8.transpose(-2, -1), *self.softmax_codes)
                return self._av(pq, v8, b, n, c, residual)
            scores = qk.product(q8, k8.transpose(-2, -1))
            attn = rescale(scores, qk.a.scale * qk.b.scale)
        else:
            qkv = self.qkv.float_from_codes(xq).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            if qk is not None:
                attn = qk(q * self.scale, k.transpose(-2, -1))
            else:
                attn = self.qk_float(q * self.scale, k.transpose(-2, -1))
            v8 = None
        if qk is not None and qk.output_quantizer is not None:
            attn = qk.output_quantizer(attn)
        attn = self.softmax(attn)
        if av is not None and av.output_quantizer is None:
            if fast:
                pq = quantize_fast(attn, av.a, torch.int8)
            else:
                pq = quantize_act(attn, av.a, torch.int8, clamp=self.p_clamp)
            if v8 is None:
                v8 = av.quantize(v, av.b)
            return self._av(pq, v8, b, n, c, residual)
        if v8 is not None:  # v was produced as codes: dequantize for the float matmul
            v = v8.float() * self.v_act.scale  # type: ignore[union-attr]
        o = (av or self.av_float)(attn, v).transpose(1, 2).reshape(b, n, c)
        oq = self.proj.quantize_input(o)
        return self._proj(oq, residual)

    def _av(
        self, pq: Tensor, v8: Tensor, b: int, n: int, c: int, residual: Tensor | None
    ) -> Tensor:
        """attn·v on the codes of p and v, quantized for ``proj``, then ``proj``."""
        av = self.av
        assert av is not None
        fast = self.backend != "reference"
        if self.av_codes is not None and v8.dtype == torch.int8:  # codes of proj's input
            if torch.compiler.is_compiling():
                oq = ops.vnni_bmm_quant(pq, v8, *self.av_codes, True)
            else:
                oq = native.vnni_bmm_quant(pq, v8, *self.av_codes, heads_last=True)
            return self._proj(oq.reshape(b, n, c), residual)
        if self.av_rows and not torch.compiler.is_compiling():  # int32 rows in proj order
            acc = native.vnni_bmm(pq, v8, heads_last=True).reshape(b * n, c)
            oq = self.proj.row_codes(acc, (b, n), mul=av.a.scale * av.b.scale)  # type: ignore[union-attr]
            return self._proj(oq, residual)
        acc = av.product(pq, v8)
        pa = self.proj.act
        if self.proj.dynamic or self.proj.in_div is not None:  # per-channel or per-token grids
            # int32 (or float64 reference) sums to float32, then the scale: the fake quant's
            # rounding (QuantMatMul.integer_product), which per-token grids depend on at ties
            o = torch.mul(acc.float(), av.a.scale * av.b.scale).transpose(1, 2)
            oq = self.proj.quantize_input(o.reshape(b, n, c))
            return self._proj(oq, residual)
        if fast:  # rescale, then one transposing quantize pass into [B, N, H, D]
            o = rescale(acc, av.a.scale * av.b.scale)
            oq = quantize_fast(o.transpose(1, 2), pa, self.proj.dtype).reshape(b, n, c)
            return self._proj(oq, residual)
        shift = pa.zero_point + pa.offset(self.proj.dtype)
        # (acc * s_p * s_v) / s_proj + zero point + storage offset in one pass
        o = torch.add(self._shift(shift, acc), acc, alpha=av.a.scale * av.b.scale / pa.scale)
        oq = quantize_act(
            o.transpose(1, 2), pa, self.proj.dtype, scaled=True, shifted=True, offset_in=True
        ).reshape(b, n, c)
        return self._proj(oq, residual)

    @staticmethod
    def _shift(value: int, like: Tensor) -> Tensor:
        """A 0-d float tensor (float64 beside the reference backend's float64 products)."""
        dtype = torch.float64 if like.is_floating_point() else torch.float32
        return torch.tensor(float(value), dtype=dtype, device=like.device)

    def _proj(self, oq: Tensor, residual: Tensor | None) -> Tensor:
        return linear_output(
            self.proj, oq, self.proj_bias, self.proj_scale, residual, self.float_dtype
        )


class Int8Block(nn.Module):
    """A pre-norm transformer block on int8 kernels (LayerNorms and softmax stay float).

    Build with :meth:`from_block`; the LayerNorms, softmax and quantized residual adds are the
    original modules (with their fake quantizers, if any).
    """

    def __init__(
        self,
        block: nn.Module,
        attn: Int8Attention,
        mlp: Int8Mlp,
        *,
        float_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        #: dtype of the residual stream inside the block (bfloat16: GEMMs write it, LayerNorms
        #: read it; they compute in float32)
        self.float_dtype = float_dtype
        #: cast the output back to float32 (set by ``lower`` on the last block of a run)
        self.cast_out = float_dtype != torch.float32
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.attn, self.mlp = attn, mlp
        self.add1, self.add2 = block.add1, block.add2
        self.fuse_add1 = _plain_add(block.add1) and attn.proj.out_q is None
        self.fuse_add2 = _plain_add(block.add2) and mlp.fc2.out_q is None
        self.gamma1, self.gamma2 = _layer_scale(block.ls1), _layer_scale(block.ls2)
        self.ln1, self.ln2 = norm_quant(block.norm1, attn.qkv), norm_quant(block.norm2, mlp.fc1)

    @classmethod
    def from_block(
        cls,
        block: nn.Module,
        backend: str,
        *,
        attention: str | None = None,
        bf16_matmul: bool = False,
        float_dtype: torch.dtype = torch.float32,
    ) -> tuple[Int8Block | None, str]:
        """The fused integer block, or ``(None, reason)`` when it cannot be built.

        Args:
            block: a pre-norm block with quantized linears.
            backend: the int8 backend.
            attention: :func:`~vitquant.runtime.kernels.int_bmm`'s method for q·kᵀ and attn·v.
            bf16_matmul: run a batched attention matmul in bfloat16 (exact; AMX CPUs).
            float_dtype: dtype of the residual stream and the float GEMM outputs.
        """
        why = block_unsupported(block)
        if why:
            return None, why
        a, m = block.attn, block.mlp
        layers = {}
        for name, mod in (("qkv", a.qkv), ("proj", a.proj), ("fc1", m.fc1), ("fc2", m.fc2)):
            lin, why = linear_from_quant(mod, backend)
            if lin is None:
                return None, f"{name}: {why}"
            layers[name] = lin
        g1, g2 = _layer_scale(block.ls1), _layer_scale(block.ls2)
        g1 = g1 if isinstance(g1, Tensor) and layers["proj"].out_q is None else None
        g2 = g2 if isinstance(g2, Tensor) and layers["fc2"].out_q is None else None
        attn = Int8Attention(
            a, layers["qkv"], layers["proj"], backend, g1, method=attention, bf16=bf16_matmul,
            float_dtype=float_dtype,
        )  # fmt: skip
        mlp = Int8Mlp(m, layers["fc1"], layers["fc2"], g2, float_dtype=float_dtype)
        new = cls(block, attn, mlp, float_dtype=float_dtype)
        # gammas folded into the epilogue are not applied again
        new.folded1, new.folded2 = g1 is not None, g2 is not None
        return new, ""

    def _branch_scale(self, y: Tensor, gamma: Tensor | None | bool, folded: bool) -> Tensor:
        return y * gamma if isinstance(gamma, Tensor) and not folded else y

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.float_dtype)
        hq = self.ln1(x) if self.ln1 is not None else None
        h = x if hq is not None else self.norm1(x)
        if self.fuse_add1 and (self.gamma1 is None or self.folded1):
            x = self.attn(h, residual=x, xq=hq)
        else:
            x = self.add1(x, self._branch_scale(self.attn(h, xq=hq), self.gamma1, self.folded1))
        hq = self.ln2(x) if self.ln2 is not None else None
        h = x if hq is not None else self.norm2(x)
        if self.fuse_add2 and (self.gamma2 is None or self.folded2):
            x = self.mlp(h, residual=x, xq=hq)
        else:
            x = self.add2(x, self._branch_scale(self.mlp(h, xq=hq), self.gamma2, self.folded2))
        return x.float() if self.cast_out else x
