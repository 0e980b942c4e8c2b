"""vitquant's own CPU kernels in C, built on first use with the system C compiler.

Attention kernels on AVX512-VNNI ``vpdpbusd``, all batch entries and heads in one call split
over torch's OpenMP threads (``csrc/vnni_bmm.c`` says how):

* :func:`vnni_bmm`: the exact batched int8 products of attention (q·kᵀ, attn·v), int32 out. It
  replaces a loop of one ``torch._int_mm`` per head on one thread, which on Zen 5 spends most of
  its time outside the GEMM (see ``docs/int8.md``);
* :func:`vnni_bmm_quant`: the same product with each result quantized to one byte in the
  kernel's epilogue, written in any layout: attn·v goes straight to the uint8 codes of
  ``proj``'s input in ``[B, N, H·D]`` order (no int32 tensor, no transposing pass);
* :func:`qk_softmax`: q·kᵀ, rescale, softmax and quantization of the probabilities in one pass,
  the scores of six rows at a time kept in L1: the int32 scores are never written out (15 MB per
  layer for ViT-B at batch 8). The probabilities are those of ``torch.softmax`` up to float
  rounding (the exponential is Cephes' ``expf`` polynomial, within 2 ulp), so a code may differ
  by one step where a probability lies within an ulp of a rounding midpoint;
* :func:`qk_softmax_log2`: the same with the probabilities on RepQ-ViT's log-√2 grid, as two
  int8 code tensors (even and odd exponents) whose products with v are exact integer GEMMs.

The row-wise kernels of the same library (LayerNorm-and-quantize, per-token quantization, the
epilogue of a GEMM on per-token codes; ``csrc/rows.c``) have their Python side in
:mod:`vitquant.runtime.rows`.

The sources ship with the package; the first call compiles them (``$CC``, else ``cc``/``gcc``;
about a second) into ``$VITQUANT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/vitquant`` or
``~/.cache/vitquant``; a per-user temporary folder where that is not writable), named by a
hash of the sources, flags and compiler, written to a temporary file and renamed, so
concurrent first calls are safe and later processes reuse it. The library is loaded with
``ctypes``; it links the OpenMP runtime torch has already loaded (the same ``libgomp.so.1``), so
``torch.set_num_threads`` sets its thread count too.

Where the CPU lacks AVX512-VNNI, no compiler is found, the build fails or ``VITQUANT_NATIVE=0``
is set, :func:`available` is False, :func:`why_unavailable` says why, and the runtime uses its
``torch._int_mm`` loop; results are the same integers either way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from vitquant.errors import ConfigError
from vitquant.runtime.isa import cpu_flags

__all__ = [
    "available", "why_unavailable", "vnni_bmm", "vnni_bmm_quant", "qk_softmax",
    "qk_softmax_log2", "library", "library_path",
]  # fmt: skip

#: the C sources (compiled into one library) and the header they share
_SOURCES = ("vnni_bmm.c", "rows.c")
_HEADERS = ("common.h",)
#: -ffp-contract=off: a multiply then an add stay two roundings (GCC's intrinsics are vector
#: expressions it would fuse), so the epilogues are bit-exact with torch's op chains
_FLAGS = ("-O3", "-std=gnu11", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512vnni", "-fopenmp", "-fPIC", "-shared")  # fmt: skip
_NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
_ENV = "VITQUANT_NATIVE"


def _cache_dir() -> Path:
    root = os.environ.get("VITQUANT_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vitquant"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str, files: dict[str, bytes], out: Path) -> None:
    """Compiles the sources ``files`` (name: text; headers beside them) into ``out`` atomically
    (temporary folder in the same folder, rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_bytes(text)
        c_files = [str(Path(tmp) / name) for name in _SOURCES]
        lib = Path(tmp) / out.name
        proc = subprocess.run(
            [cc, *_FLAGS, *c_files, "-o", str(lib)], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-400:]}")
        os.replace(lib, out)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why)."""
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {_ENV}=0"
    missing = [f for f in _NEEDS if f not in cpu_flags()]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC)"
    csrc = resources.files("vitquant.runtime").joinpath("csrc")
    files = {name: csrc.joinpath(name).read_bytes() for name in (*_SOURCES, *_HEADERS)}
    src = b"".join(files.values())
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"cannot run {cc}: {e}"
    key = hashlib.sha1(src + " ".join((*_FLAGS, version)).encode()).hexdigest()[:16]
    name = f"vnni_bmm-{key}.so"
    # the cache folder, else a per-user temporary folder (a read-only home must not cost speed)
    folders = [_cache_dir(), Path(tempfile.gettempdir()) / f"vitquant-{os.getuid()}"]
    errors = []
    lib = None
    for folder in folders:
        path = folder / name
        try:
            if not path.exists():
                _build(cc, files, path)
            lib = ctypes.CDLL(str(path))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors.append(f"{folder}: {e}")
    if lib is None:
        return None, "build failed: " + "; ".join(errors)
    lib.vq_bmm.restype = ctypes.c_int
    lib.vq_bmm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 14 + [ctypes.c_int] * 2
    lib.vq_bmm_quant.restype = ctypes.c_int
    lib.vq_bmm_quant.argtypes = (
        [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 14 + [ctypes.c_int] * 2
        + [ctypes.c_float] * 2 + [ctypes.c_int] * 3
    )  # fmt: skip
    lib.vq_qk_softmax.restype = ctypes.c_int
    lib.vq_qk_softmax.argtypes = (
        [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 14 + [ctypes.c_float] * 2 + [ctypes.c_int] * 3
    )
    lib.vq_qk_softmax_log2.restype = ctypes.c_int
    lib.vq_qk_softmax_log2.argtypes = (
        [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 14 + [ctypes.c_float] * 2
        + [ctypes.c_int, ctypes.c_int64]
    )  # fmt: skip
    lib.vq_layernorm_quant.restype = None
    lib.vq_layernorm_quant.argtypes = (
        [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_int] + [ctypes.c_void_p] * 2
        + [ctypes.c_float] + [ctypes.c_int] * 2
    )  # fmt: skip
    lib.vq_row_quant.restype = None
    lib.vq_row_quant.argtypes = (
        [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int] * 5 + [ctypes.c_float] * 3
    )
    lib.vq_layernorm_row_quant.restype = None
    lib.vq_layernorm_row_quant.argtypes = (
        [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int] + [ctypes.c_void_p] * 2
        + [ctypes.c_float] + [ctypes.c_int] * 4 + [ctypes.c_float] * 2
    )  # fmt: skip
    lib.vq_row_epilogue_gelu_quant.restype = None
    lib.vq_row_epilogue_gelu_quant.argtypes = (
        [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 6 + [ctypes.c_int64]
        + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 4 + [ctypes.c_float] * 2
    )  # fmt: skip
    lib.vq_row_epilogue.restype = None
    lib.vq_row_epilogue.argtypes = (
        [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_int64]
        + [ctypes.c_int] + [ctypes.c_void_p] + [ctypes.c_int64] + [ctypes.c_int] * 3
    )  # fmt: skip
    return lib, ""


def available() -> bool:
    """True when :func:`vnni_bmm` runs the native kernel (builds it on the first call)."""
    return _load()[0] is not None


def why_unavailable() -> str:
    """Why the native kernel is not used ("" when it is)."""
    return _load()[1]


def library_path() -> str | None:
    """The loaded shared library's path (None when unavailable)."""
    lib = _load()[0]
    return None if lib is None else str(lib._name)


def _as4d(t: Tensor) -> Tensor:
    """``t`` with exactly two batch dimensions (views; more are flattened when possible)."""
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[None]
    if t.dim() == 4:
        return t
    return t.reshape(-1, t.shape[-3], *t.shape[-2:])


def library() -> ctypes.CDLL:
    """The loaded kernel library (its functions' argument types declared).

    Raises:
        ConfigError: it is unavailable (see :func:`why_unavailable`).
    """
    lib, why = _load()
    if lib is None:
        raise ConfigError(f"the native int8 kernel is unavailable: {why}")
    return lib


def vnni_bmm(a: Tensor, b: Tensor, *, heads_last: bool = False) -> Tensor:
    """Exact ``a @ b`` of integer codes with int32 results, all batch entries in one call.

    Args:
        a: int8 or uint8 ``[..., M, K]`` (rows contiguous).
        b: int8 ``[..., K, N]`` with rows or columns contiguous (``k.transpose(-2, -1)`` of a
            row-major ``k`` is read in place); batch dimensions equal ``a``'s.
        heads_last: 4-D operands ``[B, H, M, K] @ [B, H, K, N]``; the result is laid out as
            ``[B, M, H, N]`` (contiguous), as :func:`vnni_bmm_quant`'s.

    Raises:
        ConfigError: the kernel is unavailable (see :func:`why_unavailable`), or the operands
            are not CPU integer codes of matching shapes.
    """
    if heads_last:
        if a.dim() != 4:
            raise ConfigError("vnni_bmm: heads_last takes [B, H, M, K] operands")
        out = torch.empty(a.shape[0], a.shape[2], a.shape[1], b.shape[-1], dtype=torch.int32)
        _bmm(a, b, out.permute(0, 2, 1, 3), None)
        return out
    out = torch.empty(*a.shape[:-1], b.shape[-1], dtype=torch.int32)
    _bmm(a, b, out, None)
    return out


def vnni_bmm_quant(
    a: Tensor,
    b: Tensor,
    mul: float,
    scale: float,
    zero_point: int,
    lo: int,
    hi: int,
    dtype: torch.dtype = torch.uint8,
    *,
    heads_last: bool = False,
) -> Tensor:
    """The codes ``clamp(round(a @ b * mul / scale) + zero_point, lo, hi)`` in ``dtype``.

    ``heads_last`` (4-D operands ``[B, H, M, K] @ [B, H, K, N]``): the result is laid out as
    ``[B, M, H, N]`` (contiguous), the order ``proj`` reads attention's output in.
    """
    if dtype not in (torch.uint8, torch.int8):
        raise ConfigError(f"vnni_bmm_quant stores uint8 or int8 codes, not {dtype}")
    _check_grid("vnni_bmm_quant", scale, lo, hi, (0, 255) if dtype == torch.uint8 else (-128, 127))
    m, n = a.shape[-2], b.shape[-1]
    if heads_last:
        if a.dim() != 4:
            raise ConfigError("vnni_bmm_quant: heads_last takes [B, H, M, K] operands")
        out = torch.empty(a.shape[0], m, a.shape[1], n, dtype=dtype)
        view = out.permute(0, 2, 1, 3)
    else:
        out = view = torch.empty(*a.shape[:-1], n, dtype=dtype)
    _bmm(a, b, view, (mul, 1.0 / scale, zero_point, lo, hi))
    return out


def _check_grid(what: str, scale: float, lo: int, hi: int, bound: tuple[int, int]) -> None:
    if not bound[0] <= lo <= hi <= bound[1] or scale <= 0:
        raise ConfigError(f"{what}: bad quantizer (scale {scale}, range [{lo}, {hi}])")


def _operands(
    what: str, a: Tensor, b: Tensor, a_dtypes: tuple[torch.dtype, ...], *, trans_b: bool = False
) -> tuple[Tensor, Tensor, bool, int]:
    """Checks ``a @ b`` and returns ``(a4, b4, b_trans, b_row_stride)``: 4-D views with rows of
    ``a`` contiguous and ``b`` stored by rows (or, ``b_trans``, as its transpose by rows; always
    so with ``trans_b``), copying only operands in neither layout."""
    if a.dtype not in a_dtypes or b.dtype != torch.int8:
        names = "/".join(str(d).replace("torch.", "") for d in a_dtypes)
        raise ConfigError(f"{what} takes {names} @ int8 codes, got {a.dtype} @ {b.dtype}")
    if a.device.type != "cpu" or b.device.type != "cpu":
        raise ConfigError(f"{what} runs on the CPU")
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ConfigError(f"{what}: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not match")
    a4, b4 = _as4d(a), _as4d(b)
    if a4.stride(-1) != 1:
        a4 = a4.contiguous()
    if not trans_b and b4.stride(-1) == 1:
        trans = False
    elif b4.stride(-2) == 1 or b4.shape[-2] == 1:  # the transpose of a row-major matrix
        trans = True
    elif trans_b:
        b4, trans = b4.transpose(-2, -1).contiguous().transpose(-2, -1), True
    else:
        b4, trans = b4.contiguous(), False
    return a4, b4, trans, b4.stride(-1) if trans else b4.stride(-2)


def _bmm(a: Tensor, b: Tensor, out: Tensor, epi: tuple[float, float, int, int, int] | None) -> None:
    """Checks the operands and runs ``vq_bmm`` (int32 ``out``) or ``vq_bmm_quant`` (bytes)."""
    lib = library()
    a4, b4, trans, sbr = _operands("vnni_bmm", a, b, (torch.int8, torch.uint8))
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if out.numel() == 0:
        return
    if k == 0:
        out.zero_() if epi is None else out.fill_(min(max(epi[2], epi[3]), epi[4]))
        return
    c4 = _as4d(out)
    args = (
        a4.data_ptr(), b4.data_ptr(), c4.data_ptr(), c4.shape[0], c4.shape[1], m, k, n,
        a4.stride(0), a4.stride(1), a4.stride(2), b4.stride(0), b4.stride(1), sbr,
        c4.stride(0), c4.stride(1), c4.stride(2), int(trans), int(a.dtype == torch.int8),
    )  # fmt: skip
    failed = lib.vq_bmm(*args) if epi is None else lib.vq_bmm_quant(*args, *epi)
    if failed:
        raise MemoryError("vnni_bmm: could not allocate its packing buffers")


def qk_softmax(
    q: Tensor, kt: Tensor, alpha: float, scale: float, zero_point: int, lo: int, hi: int
) -> Tensor:
    """int8 codes of ``softmax(alpha * (q @ kt), -1)`` quantized with ``scale``/``zero_point``
    and clamped to ``[lo, hi]`` (``round(p / scale) + zero_point``, half to even), in one pass.

    Args:
        q: int8 ``[..., M, K]`` (rows contiguous).
        kt: int8 ``[..., K, N]``, the transpose of a matrix with contiguous rows (``k.mT``).
        alpha: the scores' scale (the two operands' scales).
        scale, zero_point, lo, hi: the probabilities' quantizer, in int8 storage.

    Raises:
        ConfigError: the kernel is unavailable, or the operands do not fit.
    """
    _check_grid("qk_softmax", scale, lo, hi, (-128, 127))
    out = torch.empty(*q.shape[:-1], kt.shape[-1], dtype=torch.int8)
    return _qk_softmax_into(
        "qk_softmax", library().vq_qk_softmax, q, kt, out, out, (zero_point, lo, hi), alpha, scale
    )


def _qk_softmax_into(
    what: str,
    fn: Callable[..., int],
    q: Tensor,
    kt: Tensor,
    out: Tensor,
    p: Tensor,
    grid: tuple[int, ...],
    alpha: float,
    scale: float,
) -> Tensor:
    """Runs a fused q·kᵀ-softmax kernel ``fn`` writing the codes into ``p`` (a view of
    ``out``, which it returns); ``grid``: the kernel's arguments after ``alpha, 1 / scale``."""
    q4, k4, _, skr = _operands(what, q, kt, (torch.int8,), trans_b=True)
    if out.numel() == 0:
        return out
    p4 = _as4d(p)
    m, k, n = q4.shape[2], q4.shape[3], p4.shape[3]
    failed = fn(
        q4.data_ptr(), k4.data_ptr(), p4.data_ptr(), p4.shape[0], p4.shape[1], m, k, n,
        q4.stride(0), q4.stride(1), q4.stride(2), k4.stride(0), k4.stride(1), skr,
        p4.stride(0), p4.stride(1), p4.stride(2), alpha, 1.0 / scale, *grid,
    )  # fmt: skip
    if failed:
        raise MemoryError(f"{what}: could not allocate its buffers")
    return out


def qk_softmax_log2(q: Tensor, kt: Tensor, alpha: float, scale: float, bits: int) -> Tensor:
    """``softmax(alpha * (q @ kt), -1)`` on RepQ-ViT's log-√2 grid of ``bits`` (at most 4) bits
    and ``scale``, in one pass, as two int8 code tensors stacked in front, ``[2, ..., M, N]``.

    The log-√2 value ``scale * 2^(-c/2)`` of code ``c`` (the top code is zero; as
    :func:`vitquant.quant.primitives.log2_quantize`) is ``scale * 2^-m0 * e`` for even ``c`` and
    ``scale * 2^-m0 * o / √2`` for odd ``c``, with integers ``e`` and ``o`` of magnitude at most
    ``2^m0 = 2^((2^bits - 2) // 2)``; out ``[0]`` holds ``-e`` and ``[1]`` ``-o`` (negated so
    that 128 fits int8; zero where the code is of the other parity or zero). So ``p @ v`` is
    ``-(out[0] @ v + out[1] @ v / √2) * scale * 2^-m0``, two exact integer products.

    Raises:
        ConfigError: the kernel is unavailable, the operands do not fit, or more than 4 bits.
    """
    if not 1 <= bits <= 4 or scale <= 0:
        raise ConfigError(f"qk_softmax_log2: bad quantizer (scale {scale}, {bits} bits)")
    out = torch.empty(2, *q.shape[:-1], kt.shape[-1], dtype=torch.int8)
    odd = out[1].data_ptr() - out[0].data_ptr()  # bytes from the even codes to the odd ones
    return _qk_softmax_into(
        "qk_softmax_log2", library().vq_qk_softmax_log2, q, kt, out, out[0], (bits, odd), alpha,
        scale,
    )  # fmt: skip
