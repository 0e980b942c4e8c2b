/* Row-wise kernels of the int8 runtime on AVX512: each row of a [rows, c] operand is swept a few
 * times while it sits in L1, rows split over the OpenMP threads of the process.
 *
 * - vq_layernorm_quant: LayerNorm and the quantization of its output on a fixed grid;
 * - vq_row_quant: per-token (dynamic) quantization: each row's grid, then its codes;
 * - vq_layernorm_row_quant: LayerNorm, then the per-token quantization of its output;
 * - vq_row_epilogue: the epilogue of a GEMM whose input had one scale per row (per-token
 *   dynamic activations): row scale, zero-point correction, bias and residual, written as float32,
 *   bfloat16 or the codes of the next op.
 *
 * Rows are float32 or bfloat16 (widened to float32 on load; int32 products, scaled, for
 * vq_row_quant); statistics in float32 as torch's CPU kernels; rounding half to even. */
#include "common.h"

#define RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define PAR_ROWS(rows, c) if ((rows) * (c) >= 65536)

/* A LayerNorm's per-row affine map v = (x * rstd - mean * rstd) * w + b (a, b: rstd and
 * -mean * rstd of the row; w, bias: [c]). */
typedef struct {
    __m512 a, b;
    const float *w, *bias;
} Ln;

/* x[j..j+16) of a row, normalised when ln is given (masked lanes are 0). */
static inline __m512 row_value(const void *x, int64_t j, __mmask16 m, int bf16, const Ln *ln)
{
    const __m512 v = load_row(x, j, m, bf16);
    if (!ln)
        return v;
    return _mm512_fmadd_ps(_mm512_fmadd_ps(v, ln->a, ln->b), _mm512_maskz_loadu_ps(m, ln->w + j),
                           _mm512_maskz_loadu_ps(m, ln->bias + j));
}

/* Mean and 1 / sqrt(var + eps) of a row (biased variance; four accumulators up to c / 64 * 64,
 * as torch's CPU LayerNorm sums). */
static void ln_stats(const void *x, int64_t c, int bf16, float eps, Ln *ln)
{
    const int64_t c64 = c / 64 * 64;
    const __mmask16 all = 0xFFFF;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t j = 0;
    for (; j < c64; j += 64) {
        s0 = _mm512_add_ps(s0, load_row(x, j, all, bf16));
        s1 = _mm512_add_ps(s1, load_row(x, j + 16, all, bf16));
        s2 = _mm512_add_ps(s2, load_row(x, j + 32, all, bf16));
        s3 = _mm512_add_ps(s3, load_row(x, j + 48, all, bf16));
    }
    for (; j < c; j += 16) s0 = _mm512_add_ps(s0, load_row(x, j, tail_mask(c - j), bf16));
    const float mean =
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3))) /
        (float)c;
    const __m512 vm = _mm512_set1_ps(mean);
    s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#define SQ(acc, off)                                                                          \
    do {                                                                                      \
        const __m512 d = _mm512_sub_ps(load_row(x, j + (off), all, bf16), vm);                \
        acc = _mm512_fmadd_ps(d, d, acc);                                                     \
    } while (0)
    for (j = 0; j < c64; j += 64) {
        SQ(s0, 0); SQ(s1, 16); SQ(s2, 32); SQ(s3, 48);
    }
#undef SQ
    for (; j < c; j += 16) {
        const __mmask16 m = tail_mask(c - j);
        const __m512 d = _mm512_maskz_sub_ps(m, load_row(x, j, m, bf16), vm);
        s0 = _mm512_fmadd_ps(d, d, s0);
    }
    const float var =
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3))) /
        (float)c;
    const float rstd = 1.0f / sqrtf(var + eps);
    ln->a = _mm512_set1_ps(rstd);
    ln->b = _mm512_set1_ps(-mean * rstd);
}

/* Y[r, :] = clamp(rint((X[r, :] - mean) * rstd * w + b), lo, hi), one byte each, for every row
 * r: LayerNorm over the last dimension with the quantizer's 1 / scale and zero point folded into
 * w and b by the caller, so the normalised value is only rounded and saturated. X: rows of c
 * elements, row stride sx elements; Y: rows of c bytes, stride sy. */
void vq_layernorm_quant(const void *X, uint8_t *Y, int64_t rows, int64_t c, int64_t sx,
                        int64_t sy, int x_bf16, const float *w, const float *b, float eps, int lo,
                        int hi)
{
    const size_t esize = x_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) PAR_ROWS(rows, c)
    for (int64_t r = 0; r < rows; r++) {
        const void *x = (const char *)X + (size_t)(r * sx) * esize;
        uint8_t *y = Y + r * sy;
        Ln ln = {.w = w, .bias = b};
        ln_stats(x, c, x_bf16, eps, &ln);
        const __m512i vlo = _mm512_set1_epi32(lo), vhi = _mm512_set1_epi32(hi);
        for (int64_t j = 0; j < c; j += 16) {
            const __mmask16 m = tail_mask(c - j);
            const __m512 q = row_value(x, j, m, x_bf16, &ln);
            __m512i k = _mm512_cvtps_epi32(_mm512_roundscale_ps(q, RNE));
            store_bytes(y + j, _mm512_min_epi32(_mm512_max_epi32(k, vlo), vhi), m);
        }
    }
}

/* A per-token grid: symmetric (s = max(clip * max|x|, 1e-12) / qdiv, z = 0) or the unsigned grid
 * [0, qdiv] over [min(clip * min x, 0), max(clip * max x, 0)] (qparams_from_minmax), in float32
 * as vitquant.quant.primitives.token_qparams computes it; codes clamp(rint(x / s) + z, qmin,
 * qmax) + off. */
typedef struct {
    int symmetric, qmin, qmax, off;
    float qdiv, clip;
    float mul; /* int32 rows (kind 2): their values are (float)x * mul */
} Dyn;

/* One row's grid (in *s, *z) and codes, its values normalised first when ln is given. Division
 * and rounding as torch's, so the codes of a plain row equal the fake quantizer's. */
static inline void dyn_row(const void *x, uint8_t *y, int64_t c, int kind, const Ln *ln,
                           const Dyn *d, float *s_out, float *z_out)
{
    const __m512 vmul = _mm512_set1_ps(d->mul);
#define VALUE(j, m)                                                                           \
    (kind == 2 ? _mm512_mul_ps(row_value(x, j, m, kind, ln), vmul) : row_value(x, j, m, kind, ln))
    __m512 vmax = _mm512_set1_ps(-INFINITY), vmin = _mm512_set1_ps(INFINITY);
    for (int64_t j = 0; j < c; j += 16) {
        const __mmask16 m = tail_mask(c - j);
        const __m512 v = VALUE(j, m);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
        vmin = _mm512_mask_min_ps(vmin, m, vmin, v);
    }
    const float mx = _mm512_reduce_max_ps(vmax), mn = _mm512_reduce_min_ps(vmin);
    float s, z;
    if (d->symmetric) {
        s = fmaxf(fmaxf(mx, -mn) * d->clip, 1e-12f) / d->qdiv;
        z = 0.0f;
    } else {
        const float lo = fminf(mn * d->clip, 0.0f), hi = fmaxf(mx * d->clip, 0.0f);
        s = fmaxf((hi - lo) / d->qdiv, 1e-12f);
        z = fminf(fmaxf(nearbyintf(0.0f - lo / s), 0.0f), d->qdiv);
    }
    *s_out = s;
    *z_out = z;
    const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
    const __m512i vlo = _mm512_set1_epi32(d->qmin), vhi = _mm512_set1_epi32(d->qmax);
    const __m512i voff = _mm512_set1_epi32(d->off);
    for (int64_t j = 0; j < c; j += 16) {
        const __mmask16 m = tail_mask(c - j);
        const __m512 v = VALUE(j, m);
        const __m512 q = _mm512_add_ps(_mm512_roundscale_ps(_mm512_div_ps(v, vs), RNE), vz);
        __m512i k = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(q), vlo), vhi);
        store_bytes(y + j, _mm512_add_epi32(k, voff), m);
    }
#undef VALUE
}

/* Per-token quantization of the rows of X ([rows, c], row stride sx; x_kind as load_row's,
 * int32 values times mul): grids in S[r], Z[r] and codes in Y (row stride sy), as Dyn says. */
void vq_row_quant(const void *X, uint8_t *Y, float *S, float *Z, int64_t rows, int64_t c,
                  int64_t sx, int64_t sy, int x_kind, int symmetric, int qmin, int qmax, int off,
                  float qdiv, float clip, float mul)
{
    const size_t esize = x_kind == 1 ? 2 : 4;
    const Dyn d = {symmetric, qmin, qmax, off, qdiv, clip, mul};
#pragma omp parallel for schedule(static) PAR_ROWS(rows, c)
    for (int64_t r = 0; r < rows; r++)
        dyn_row((const char *)X + (size_t)(r * sx) * esize, Y + r * sy, c, x_kind, NULL, &d, S + r,
                Z + r);
}

/* LayerNorm of each row (affine w, b: [c]) and the per-token quantization of the result, as
 * vq_row_quant of layer_norm(X): one pass for the statistics, one for the grid, one for the
 * codes; no float tensor is written. */
void vq_layernorm_row_quant(const void *X, uint8_t *Y, float *S, float *Z, int64_t rows,
                            int64_t c, int64_t sx, int64_t sy, int x_bf16, const float *w,
                            const float *b, float eps, int symmetric, int qmin, int qmax, int off,
                            float qdiv, float clip)
{
    const size_t esize = x_bf16 ? 2 : 4;
    const Dyn d = {symmetric, qmin, qmax, off, qdiv, clip, 1.0f};
#pragma omp parallel for schedule(static) PAR_ROWS(rows, c)
    for (int64_t r = 0; r < rows; r++) {
        const void *x = (const char *)X + (size_t)(r * sx) * esize;
        Ln ln = {.w = w, .bias = b};
        ln_stats(x, c, x_bf16, eps, &ln);
        dyn_row(x, Y + r * sy, c, x_bf16, &ln, &d, S + r, Z + r);
    }
}

/* float32 to bfloat16, rounding to nearest even (NaN to a quiet NaN), as torch converts. */
static inline __m256i to_bf16(__m512 v)
{
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb,
                                  _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

/* (y[j..j+16) - z * WS[j..]) * s + B[j..] (Z/WS and B optional), the row-scale epilogue's value
 * in the order of torch's sub_, mul_, add_. */
static inline __m512 epi_value(const float *y, int64_t j, __mmask16 m, __m512 vs, __m512 vz,
                               const float *Z, const float *WS, const float *B)
{
    __m512 t = _mm512_maskz_loadu_ps(m, y + j);
    if (Z)
        t = _mm512_sub_ps(t, _mm512_mul_ps(vz, _mm512_maskz_loadu_ps(m, WS + j)));
    t = _mm512_mul_ps(t, vs);
    if (B)
        t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(m, B + j));
    return t;
}

/* The epilogue of a GEMM on per-token codes, for every row r and column n:
 *   t = (Y[r, n] - Z[r] * WS[n]) * S[r] + B[n] + R[r, n]
 * (Z and WS, B, R optional: NULL), in the order of torch's sub_, mul_, add_, add, so mode 0 is
 * bit-exact with them. Y: float32 rows of n (stride sy); R: float32 or bfloat16 (r_bf16), stride
 * sr. mode 0: float32 to O (stride so; O may be Y); 1: bfloat16; 2: bytes clamp(rint(t), lo, hi)
 * (a grid's 1 / scale and zero point folded into S, WS and B by the caller). */
void vq_row_epilogue(const float *Y, int64_t rows, int64_t n, int64_t sy, const float *S,
                     const float *Z, const float *WS, const float *B, const void *R, int64_t sr,
                     int r_bf16, void *O, int64_t so, int mode, int lo, int hi)
{
    const size_t resize = r_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) PAR_ROWS(rows, n)
    for (int64_t r = 0; r < rows; r++) {
        const float *y = Y + r * sy;
        const void *res = R ? (const char *)R + (size_t)(r * sr) * resize : NULL;
        const __m512 vs = _mm512_set1_ps(S[r]);
        const __m512 vz = _mm512_set1_ps(Z ? Z[r] : 0.0f);
        const __m512i vlo = _mm512_set1_epi32(lo), vhi = _mm512_set1_epi32(hi);
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = tail_mask(n - j);
            __m512 t = epi_value(y, j, m, vs, vz, Z, WS, B);
            if (res)
                t = _mm512_add_ps(t, load_row(res, j, m, r_bf16));
            if (mode == 0) {
                _mm512_mask_storeu_ps((float *)O + r * so + j, m, t);
            } else if (mode == 1) {
                _mm256_mask_storeu_epi16((uint16_t *)O + r * so + j, m, to_bf16(t));
            } else {
                const __m512i k = _mm512_cvtps_epi32(_mm512_roundscale_ps(t, RNE));
                store_bytes((uint8_t *)O + r * so + j, _mm512_min_epi32(_mm512_max_epi32(k, vlo),
                            vhi), m);
            }
        }
    }
}

/* GELU (erf form) as torch's CPU kernel computes it: (x * 0.5) * (1 + erf(x * sqrt(1/2))), erf
 * by the Abramowitz-Stegun 7.1.26 form of ATen's Vectorized<float>::erf with the same operations
 * in the same order (its exponential is Cephes' here, Sleef's there: within an ulp or two). */
static inline __m512 xor_ps(__m512 a, __m512 b) /* without AVX512DQ */
{
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}

static inline __m512 gelu_erf(__m512 x)
{
    const __m512 neg0 = _mm512_set1_ps(-0.0f), one = _mm512_set1_ps(1.0f);
    const __m512 u = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752440f));
    const __m512 sign = _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_castps_si512(neg0), _mm512_castps_si512(u)));
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f),
                                                        _mm512_abs_ps(u), one));
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    const __m512 e = xor_ps(neg0, exp_neg(xor_ps(neg0, _mm512_mul_ps(u, u))));
    const __m512 erf = xor_ps(sign, _mm512_fmadd_ps(_mm512_mul_ps(e, t), r, one));
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(one, erf));
}

/* fc1's epilogue on per-token codes fused with fc2's per-token input quantization, per row r:
 *   h = gelu((Y[r, :] - Z[r] * WS) * S[r] + B) / D
 * (Z and WS, B, D optional: NULL; D a SmoothQuant divisor of fc2's input), written over Y's row
 * while it sits in L1, then quantized as vq_row_quant does (grid in S2[r], Z2[r], codes in O with
 * row stride so). No float hidden activation leaves the cache. */
void vq_row_epilogue_gelu_quant(float *Y, int64_t rows, int64_t n, int64_t sy, const float *S,
                                const float *Z, const float *WS, const float *B, const float *D,
                                uint8_t *O, int64_t so, float *S2, float *Z2, int symmetric,
                                int qmin, int qmax, int off, float qdiv, float clip)
{
    const Dyn d = {symmetric, qmin, qmax, off, qdiv, clip, 1.0f};
#pragma omp parallel for schedule(static) PAR_ROWS(rows, n)
    for (int64_t r = 0; r < rows; r++) {
        float *y = Y + r * sy;
        const __m512 vs = _mm512_set1_ps(S[r]);
        const __m512 vz = _mm512_set1_ps(Z ? Z[r] : 0.0f);
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = tail_mask(n - j);
            __m512 t = epi_value(y, j, m, vs, vz, Z, WS, B);
            t = gelu_erf(t);
            if (D)
                t = _mm512_div_ps(t, _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, D + j));
            _mm512_mask_storeu_ps(y + j, m, t);
        }
        dyn_row(y, O + r * so, n, 0, NULL, &d, S2 + r, Z2 + r);
    }
}
