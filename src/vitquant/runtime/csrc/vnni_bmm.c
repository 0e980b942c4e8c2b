/* Exact batched int8 matmuls for attention on AVX512-VNNI (vpdpbusd), int32 results.
 *
 * C[b, h] (M x N, int32) = A[b, h] (M x K) @ B[b, h] (K x N) for every batch entry b and head h,
 * the products of multi-head attention (q.k^T: 197x64 @ 64x197; attn.v: 197x197 @ 197x64 for a
 * ViT at 224 px). One call covers all heads, split across the OpenMP threads of the process (the
 * same libgomp as torch's, so torch.set_num_threads applies).
 *
 * vpdpbusd multiplies unsigned bytes by signed bytes and adds groups of four into int32 lanes.
 * Signed int8 A is shifted to unsigned (a ^ 0x80 == a + 128) and 128 * (column sums of B) is
 * subtracted from the result, which is exact: |sum| <= K * 255 * 128 stays far inside int32 for
 * any K below 65,000. B is repacked per head into the VNNI layout [K/4][N][4] (zero padded to a
 * multiple of 4 rows and 16 columns), about 13 KB for a ViT head, which stays in L1 while the
 * micro-kernel sweeps A's rows in tiles of up to 6 rows x 64 columns (24 accumulators).
 *
 * Layouts: A(i, k) = A[b*sab + h*sah + i*sam + k]; B(k, n) = B[b*sbb + h*sbh + n*sbr + k] when
 * b_trans (B stored as its transpose, rows of K: the keys of q.k^T), else B[... + k*sbr + n];
 * C(i, n) = C[b*scb + h*sch + i*scm + n]. Element strides of the innermost dimension are 1.
 */
#include "common.h"

#include <float.h>

/* vpdpbusd in place: GCC's intrinsic makes it copy (and spill) every accumulator in loops; the
 * in-place form keeps each accumulator in its register. */
#define DPBUSD(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))

#define MR 6 /* rows of A per tile */
#define NB 4 /* 16-column blocks per tile */
#define PAD 256 /* bytes read past a packed B row by a tile at its right edge */

/* A quantizing epilogue: codes = clamp(rint((float)acc * mul * inv) + zp, lo, hi), one byte each
 * (int8 or uint8 storage: the clamped value's low byte). */
typedef struct {
    float mul, inv;
    int zp, lo, hi;
} Epi;

/* One tile: rows[0..5] of A (pointers; rows past the edge point at zeros), nblk blocks of 16
 * columns (a compile-time constant after inlining), accumulators in named registers. */
static inline __attribute__((always_inline)) void tile(
    const uint8_t *const *rows, const uint8_t *bp, int64_t np, int64_t kfull, int64_t ktail,
    const int32_t *comp, int32_t *c, int64_t ldc, int mr, int64_t ncols, int xor_a,
    const Epi *ep, const int nblk)
{
#define ACC(r) __m512i c##r##0, c##r##1, c##r##2, c##r##3
    ACC(0); ACC(1); ACC(2); ACC(3); ACC(4); ACC(5);
#define ZERO(r)                                                                               \
    c##r##0 = _mm512_setzero_si512(); c##r##1 = c##r##0; c##r##2 = c##r##0; c##r##3 = c##r##0
    ZERO(0); ZERO(1); ZERO(2); ZERO(3); ZERO(4); ZERO(5);
    const __m512i flip = _mm512_set1_epi32(xor_a ? (int32_t)0x80808080u : 0);
    __m512i b0, b1, b2, b3, av;
#define LOADB(bk)                                                                             \
    b0 = _mm512_loadu_si512((const void *)(bk));                                              \
    if (nblk > 1) b1 = _mm512_loadu_si512((const void *)((bk) + 64));                         \
    if (nblk > 2) b2 = _mm512_loadu_si512((const void *)((bk) + 128));                        \
    if (nblk > 3) b3 = _mm512_loadu_si512((const void *)((bk) + 192))
#define DOT(r)                                                                                \
    DPBUSD(c##r##0, av, b0);                                                                  \
    if (nblk > 1) DPBUSD(c##r##1, av, b1);                                                    \
    if (nblk > 2) DPBUSD(c##r##2, av, b2);                                                    \
    if (nblk > 3) DPBUSD(c##r##3, av, b3)
#define ROW(r)                                                                                \
    do {                                                                                      \
        int32_t w;                                                                            \
        memcpy(&w, rows[r] + k4 * 4, 4);                                                      \
        av = _mm512_xor_si512(_mm512_set1_epi32(w), flip);                                    \
        DOT(r);                                                                               \
    } while (0)
    for (int64_t k4 = 0; k4 < kfull; k4++) {
        LOADB(bp + k4 * np * 4);
        ROW(0); ROW(1); ROW(2); ROW(3); ROW(4); ROW(5);
    }
    if (ktail) { /* A's last K % 4 columns, copied into zero-padded words (no read past a row) */
        LOADB(bp + kfull * np * 4);
#define TAIL(r)                                                                               \
    do {                                                                                      \
        uint8_t t[4] = {0, 0, 0, 0};                                                          \
        memcpy(t, rows[r] + kfull * 4, (size_t)(ktail & 3));                                  \
        for (int64_t i = 0; i < (ktail & 3); i++) t[i] ^= xor_a ? 0x80 : 0;                   \
        int32_t w;                                                                            \
        memcpy(&w, t, 4);                                                                     \
        av = _mm512_set1_epi32(w);                                                            \
        DOT(r);                                                                               \
    } while (0)
        TAIL(0); TAIL(1); TAIL(2); TAIL(3); TAIL(4); TAIL(5);
    }
    __mmask16 m[NB];
    for (int j = 0; j < NB; j++) {
        int64_t left = ncols - 16 * j;
        m[j] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
    }
    const __m512i k0 = _mm512_loadu_si512((const void *)comp);
    const __m512i k1 = _mm512_loadu_si512((const void *)(comp + 16));
    const __m512i k2 = _mm512_loadu_si512((const void *)(comp + 32));
    const __m512i k3 = _mm512_loadu_si512((const void *)(comp + 48));
#define STORE(r)                                                                              \
    if (mr > r) {                                                                             \
        int32_t *o = c + (r) * ldc;                                                           \
        _mm512_mask_storeu_epi32(o, m[0], _mm512_sub_epi32(c##r##0, k0));                     \
        if (nblk > 1) _mm512_mask_storeu_epi32(o + 16, m[1], _mm512_sub_epi32(c##r##1, k1));  \
        if (nblk > 2) _mm512_mask_storeu_epi32(o + 32, m[2], _mm512_sub_epi32(c##r##2, k2));  \
        if (nblk > 3) _mm512_mask_storeu_epi32(o + 48, m[3], _mm512_sub_epi32(c##r##3, k3));  \
    }
#define QV(acc, kk)                                                                           \
    _mm512_min_epi32(                                                                         \
        _mm512_max_epi32(                                                                     \
            _mm512_add_epi32(                                                                 \
                _mm512_cvtps_epi32(_mm512_roundscale_ps(                                      \
                    _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, kk)), \
                                                qmul),                                        \
                                  qinv),                                                      \
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)),                          \
                qzp),                                                                         \
            qlo),                                                                             \
        qhi)
#define QSTORE(r)                                                                             \
    if (mr > r) {                                                                             \
        int8_t *o = (int8_t *)c + (r) * ldc;                                                  \
        _mm512_mask_cvtepi32_storeu_epi8(o, m[0], QV(c##r##0, k0));                           \
        if (nblk > 1) _mm512_mask_cvtepi32_storeu_epi8(o + 16, m[1], QV(c##r##1, k1));        \
        if (nblk > 2) _mm512_mask_cvtepi32_storeu_epi8(o + 32, m[2], QV(c##r##2, k2));        \
        if (nblk > 3) _mm512_mask_cvtepi32_storeu_epi8(o + 48, m[3], QV(c##r##3, k3));        \
    }
    if (ep) {
        const __m512 qmul = _mm512_set1_ps(ep->mul), qinv = _mm512_set1_ps(ep->inv);
        const __m512i qzp = _mm512_set1_epi32(ep->zp), qlo = _mm512_set1_epi32(ep->lo),
                      qhi = _mm512_set1_epi32(ep->hi);
        QSTORE(0) QSTORE(1) QSTORE(2) QSTORE(3) QSTORE(4) QSTORE(5)
        return;
    }
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
}

/* The tile for 1..4 blocks of 16 columns, each a function with nblk a constant. */
#define TILE_FN(J)                                                                            \
    static void tile##J(const uint8_t *const *r, const uint8_t *bp, int64_t np, int64_t kf,   \
                        int64_t kt, const int32_t *cp, int32_t *c, int64_t ldc, int mr,       \
                        int64_t nc, int x, const Epi *ep)                                     \
    {                                                                                         \
        tile(r, bp, np, kf, kt, cp, c, ldc, mr, nc, x, ep, J);                                \
    }
TILE_FN(1)
TILE_FN(2)
TILE_FN(3)
TILE_FN(4)

/* One row strip (up to MR rows of A) against every column tile of the packed B. C is int32
 * (ldc in elements) or, with an epilogue, bytes (ldc in bytes). */
static void strip(const uint8_t *const *rows, const uint8_t *bp, int64_t np, int64_t k,
                  int64_t n, const int32_t *comp, int32_t *c, int64_t ldc, int mr, int x,
                  const Epi *ep)
{
    for (int64_t n0 = 0; n0 < n; n0 += NB * 16) {
        const int64_t nc = n - n0;
        const int blocks = (int)(nc >= NB * 16 ? NB : (nc + 15) / 16);
        const uint8_t *bpn = bp + n0 * 4;
        int32_t *cn = ep ? (int32_t *)((int8_t *)c + n0) : c + n0;
        if (blocks == 4) tile4(rows, bpn, np, k / 4, k % 4, comp + n0, cn, ldc, mr, nc, x, ep);
        else if (blocks == 3) tile3(rows, bpn, np, k / 4, k % 4, comp + n0, cn, ldc, mr, nc, x, ep);
        else if (blocks == 2) tile2(rows, bpn, np, k / 4, k % 4, comp + n0, cn, ldc, mr, nc, x, ep);
        else tile1(rows, bpn, np, k / 4, k % 4, comp + n0, cn, ldc, mr, nc, x, ep);
    }
}

/* Packs one head's B into 32-bit words [Kp/4][Np] (word (k4, j) holds B(4 k4 .. 4 k4 + 3, j),
 * zero padded) and 128 * its column sums (zeros when A is unsigned) into comp[Np]. */
static void pack_b(const int8_t *b, int64_t sbr, int b_trans, int64_t k, int64_t n, int64_t np,
                   uint8_t *bp, int32_t *comp, const int8_t *zeros, int signed_a)
{
    const int64_t k4n = (k + 3) / 4, kfull = k / 4;
    uint32_t *bw = (uint32_t *)bp;
    memset(bp, 0, (size_t)(k4n * np * 4));
    memset(comp, 0, (size_t)(np * 4));
    if (b_trans) { /* rows of B^T are contiguous runs of K: copy 4-byte words */
        for (int64_t j = 0; j < n; j++) {
            const int8_t *row = b + j * sbr;
            int32_t s = 0;
            for (int64_t t = 0; t < k; t++) s += row[t];
            comp[j] = s;
            for (int64_t t4 = 0; t4 < kfull; t4++) {
                uint32_t w;
                memcpy(&w, row + t4 * 4, 4);
                bw[t4 * np + j] = w;
            }
            for (int64_t t = kfull * 4; t < k; t++)
                bp[(kfull * np + j) * 4 + (t - kfull * 4)] = (uint8_t)row[t];
        }
    } else { /* rows of B are runs of N: interleave four rows into words */
        for (int64_t t4 = 0; t4 < k4n; t4++) {
            const int8_t *r0 = b + t4 * 4 * sbr;
            const int8_t *r1 = t4 * 4 + 1 < k ? r0 + sbr : zeros;
            const int8_t *r2 = t4 * 4 + 2 < k ? r0 + 2 * sbr : zeros;
            const int8_t *r3 = t4 * 4 + 3 < k ? r0 + 3 * sbr : zeros;
            uint32_t *dst = bw + t4 * np;
            for (int64_t j = 0; j < n; j++) {
                dst[j] = (uint32_t)(uint8_t)r0[j] | ((uint32_t)(uint8_t)r1[j] << 8) |
                         ((uint32_t)(uint8_t)r2[j] << 16) | ((uint32_t)(uint8_t)r3[j] << 24);
                comp[j] += r0[j] + r1[j] + r2[j] + r3[j];
            }
        }
    }
    for (int64_t j = 0; j < n; j++) comp[j] = signed_a ? 128 * comp[j] : 0;
}

/* Per-thread buffers: packed B, its column sums, zeros for rows past A's edge, and for the
 * fused softmax the scores of one row strip and one row of exponentials. */
typedef struct {
    int64_t np, lds;
    uint8_t *bp;
    int32_t *comp, *sbuf;
    float *ebuf;
    int8_t *zeros;
} Work;

static size_t up64(int64_t bytes) { return (size_t)((bytes + 63) / 64 * 64); }

static int work_alloc(Work *w, int64_t k, int64_t n, int softmax)
{
    memset(w, 0, sizeof *w);
    w->np = (n + 15) / 16 * 16;
    w->lds = w->np + 64;
    w->bp = (uint8_t *)aligned_alloc(64, up64((k + 3) / 4 * 4 * w->np + PAD));
    w->comp = (int32_t *)aligned_alloc(64, up64(w->np * 4 + PAD));
    w->zeros = (int8_t *)calloc((size_t)((n > k ? n : k) + 64), 1);
    if (softmax) {
        w->sbuf = (int32_t *)aligned_alloc(64, up64(MR * w->lds * 4));
        w->ebuf = (float *)aligned_alloc(64, up64(w->np * 4));
    }
    return w->bp && w->comp && w->zeros && (!softmax || (w->sbuf && w->ebuf));
}

static void work_free(Work *w)
{
    free(w->bp);
    free(w->comp);
    free(w->sbuf);
    free(w->ebuf);
    free(w->zeros);
}

/* Row pointers of one strip of A (rows past the edge read zeros). */
static int strip_rows(const uint8_t **rows, const uint8_t *a, int64_t i0, int64_t m, int64_t lda,
                      const int8_t *zeros)
{
    const int mr = (int)(m - i0 < MR ? m - i0 : MR);
    for (int r = 0; r < MR; r++) rows[r] = r < mr ? a + (i0 + r) * lda : (const uint8_t *)zeros;
    return mr;
}

/* Softmax of each row of scores alpha * (A @ B), quantized: clamp(rint(p * inv) + zp, lo, hi);
 * or, with lbits > 0, on RepQ-ViT's log-sqrt2 grid of lbits bits (see softmax_row), written as
 * two rows of codes, the second `odd` bytes after the first. */
typedef struct {
    float alpha, inv;
    int zp, lo, hi;
    int lbits;
    int64_t odd;
} Sm;

static void softmax_row(const int32_t *s, int64_t n, const Sm *sm, float *e, int8_t *out);

/* The driver of every kernel: all (batch, head) pairs split over the threads; per pair B is
 * packed once, then A's row strips run against it. C gets int32 results, or bytes through the
 * quantizing epilogue ``ep``, or (``sm``) the int8 codes of each row's softmax, the scores of
 * one strip kept in a per-thread buffer. C's strides count its elements. */
static int bmm(const int8_t *A, const int8_t *B, int32_t *C, int64_t nb, int64_t nh, int64_t m,
               int64_t k, int64_t n, int64_t sab, int64_t sah, int64_t sam, int64_t sbb,
               int64_t sbh, int64_t sbr, int64_t scb, int64_t sch, int64_t scm, int b_trans,
               int a_signed, const Epi *ep, const Sm *sm)
{
    const int64_t tasks = nb * nh;
    const int bytes = ep != NULL || sm != NULL;
    int failed = 0;
#pragma omp parallel
    {
        Work w;
        const int ok = work_alloc(&w, k, n, sm != NULL);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (!ok) continue;
            const int64_t ib = t / nh, ih = t % nh;
            const uint8_t *a = (const uint8_t *)(A + ib * sab + ih * sah);
            int32_t *c = bytes ? (int32_t *)((int8_t *)C + ib * scb + ih * sch) : C + ib * scb + ih * sch;
            pack_b(B + ib * sbb + ih * sbh, sbr, b_trans, k, n, w.np, w.bp, w.comp, w.zeros,
                   a_signed);
            for (int64_t i0 = 0; i0 < m; i0 += MR) {
                const uint8_t *rows[MR];
                const int mr = strip_rows(rows, a, i0, m, sam, w.zeros);
                if (sm) {
                    strip(rows, w.bp, w.np, k, n, w.comp, w.sbuf, w.lds, mr, a_signed, NULL);
                    for (int r = 0; r < mr; r++)
                        softmax_row(w.sbuf + r * w.lds, n, sm, w.ebuf,
                                    (int8_t *)c + (i0 + r) * scm);
                } else {
                    int32_t *ci = bytes ? (int32_t *)((int8_t *)c + i0 * scm) : c + i0 * scm;
                    strip(rows, w.bp, w.np, k, n, w.comp, ci, scm, mr, a_signed, ep);
                }
            }
        }
        work_free(&w);
    }
    return failed;
}

/* Returns 0, or 1 when a buffer could not be allocated (C is then incomplete). */
int vq_bmm(const int8_t *A, const int8_t *B, int32_t *C, int64_t nb, int64_t nh, int64_t m,
           int64_t k, int64_t n, int64_t sab, int64_t sah, int64_t sam, int64_t sbb, int64_t sbh,
           int64_t sbr, int64_t scb, int64_t sch, int64_t scm, int b_trans, int a_signed)
{
    return bmm(A, B, C, nb, nh, m, k, n, sab, sah, sam, sbb, sbh, sbr, scb, sch, scm, b_trans,
               a_signed, NULL, NULL);
}

/* The same product, each result quantized to one byte: clamp(rint(acc * mul * inv) + zp, lo,
 * hi) (C's strides in bytes): attn.v straight to the codes of proj's input, in any layout. */
int vq_bmm_quant(const int8_t *A, const int8_t *B, int8_t *C, int64_t nb, int64_t nh, int64_t m,
                 int64_t k, int64_t n, int64_t sab, int64_t sah, int64_t sam, int64_t sbb,
                 int64_t sbh, int64_t sbr, int64_t scb, int64_t sch, int64_t scm, int b_trans,
                 int a_signed, float mul, float inv, int zp, int lo, int hi)
{
    const Epi ep = {mul, inv, zp, lo, hi};
    return bmm(A, B, (int32_t *)C, nb, nh, m, k, n, sab, sah, sam, sbb, sbh, sbr, scb, sch, scm,
               b_trans, a_signed, &ep, NULL);
}

/* ---- q.k^T fused with rescale, softmax and quantization of the probabilities ------------ */

/* The log-sqrt2 codes of one row of probabilities p = e * rs: q = clamp(round(-2 log2(p / s)),
 * 0, qmax), qmax = 2^bits - 1 standing for zero (RepQ-ViT; vitquant.quant.primitives.
 * log2_quantize), without a logarithm: with r = p / s = 2^E * M, M in [1, 2), q = -2E - [M >=
 * 2^(1/4)] - [M >= 2^(3/4)]. The value s * 2^(-q/2) is s * 2^-M0 * c for even q and that over
 * sqrt(2) for odd q, with the integer c = 2^(M0 - floor(q/2)), M0 = (qmax - 1) / 2 (<= 7 for
 * bits <= 4). The codes -c go to `even` or `odd` (negated, so that c = 128 fits int8; 0 elsewhere
 * and for the zero code), and attn.v becomes two exact integer products. */
static void log2_sqrt2_codes(const float *e, int64_t n, __m512 rs, __m512 vinv, int bits,
                             int8_t *even, int8_t *odd)
{
    const int qmax = (1 << bits) - 1;
    const __m512i vqmax = _mm512_set1_epi32(qmax), one = _mm512_set1_epi32(1),
                  zero = _mm512_setzero_si512(), vm0 = _mm512_set1_epi32((qmax - 1) >> 1);
    const __m512 t1 = _mm512_set1_ps(1.18920711500272107f), /* 2^(1/4) */
        t3 = _mm512_set1_ps(1.68179283050742909f),          /* 2^(3/4) */
        tiny = _mm512_set1_ps(FLT_MIN), minus2 = _mm512_set1_ps(-2.0f);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = tail_mask(n - j);
        const __m512 r = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(e + j), rs), vinv);
        const __m512 ex = _mm512_getexp_ps(r);
        const __m512 mt = _mm512_getmant_ps(r, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(ex, minus2));
        q = _mm512_mask_sub_epi32(q, _mm512_cmp_ps_mask(mt, t1, _CMP_GE_OQ), q, one);
        q = _mm512_mask_sub_epi32(q, _mm512_cmp_ps_mask(mt, t3, _CMP_GE_OQ), q, one);
        q = _mm512_min_epi32(_mm512_max_epi32(q, zero), vqmax);
        q = _mm512_mask_mov_epi32(q, _mm512_cmp_ps_mask(r, tiny, _CMP_LT_OQ), vqmax);
        const __m512i sh = _mm512_sub_epi32(vm0, _mm512_srli_epi32(q, 1));
        __m512i c = _mm512_sub_epi32(zero, _mm512_sllv_epi32(one, sh));
        c = _mm512_mask_mov_epi32(c, _mm512_cmpeq_epi32_mask(q, vqmax), zero);
        const __mmask16 is_odd = _mm512_test_epi32_mask(q, one);
        _mm512_mask_cvtsepi32_storeu_epi8(even + j, m, _mm512_mask_mov_epi32(c, is_odd, zero));
        _mm512_mask_cvtsepi32_storeu_epi8(odd + j, m, _mm512_maskz_mov_epi32(is_odd, c));
    }
}

/* One row: p = softmax(alpha * s), codes = clamp(rint(p * inv_scale) + zp, lo, hi) as int8. */
static void softmax_row(const int32_t *s, int64_t n, const Sm *sm, float *e, int8_t *out)
{
    const float alpha = sm->alpha, inv_scale = sm->inv;
    const int zp = sm->zp, lo = sm->lo, hi = sm->hi;
    const __m512 va = _mm512_set1_ps(alpha);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = tail_mask(n - j);
        const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, s + j)), va);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, x);
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = tail_mask(n - j);
        const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, s + j)), va);
        const __m512 v = exp_neg(_mm512_sub_ps(x, mx));
        _mm512_storeu_ps(e + j, v);
        vsum = _mm512_mask_add_ps(vsum, m, vsum, v);
    }
    const __m512 rs = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    const __m512 vinv = _mm512_set1_ps(inv_scale);
    const __m512i vzp = _mm512_set1_epi32(zp), vlo = _mm512_set1_epi32(lo),
                  vhi = _mm512_set1_epi32(hi);
    if (sm->lbits) {
        log2_sqrt2_codes(e, n, rs, vinv, sm->lbits, out, out + sm->odd);
        return;
    }
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = tail_mask(n - j);
        const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(e + j), rs);
        const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(p, vinv),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(q), vzp);
        c = _mm512_min_epi32(_mm512_max_epi32(c, vlo), vhi);
        _mm512_mask_cvtsepi32_storeu_epi8(out + j, m, c);
    }
}

/* P[b, h] = int8 codes of softmax(alpha * (Q[b, h] @ Kt[b, h]^T)) along the last dimension,
 * Q int8 [M, K] rows (stride sqm), Kt int8 [N, K] rows (stride skr). Returns 0, or 1 when a
 * buffer could not be allocated. */
int vq_qk_softmax(const int8_t *Q, const int8_t *Kt, int8_t *P, int64_t nb, int64_t nh, int64_t m,
                  int64_t k, int64_t n, int64_t sqb, int64_t sqh, int64_t sqm, int64_t skb,
                  int64_t skh, int64_t skr, int64_t spb, int64_t sph, int64_t spm, float alpha,
                  float inv_scale, int zp, int lo, int hi)
{
    const Sm sm = {alpha, inv_scale, zp, lo, hi, 0, 0};
    return bmm(Q, Kt, (int32_t *)P, nb, nh, m, k, n, sqb, sqh, sqm, skb, skh, skr, spb, sph, spm,
               1, 1, NULL, &sm);
}

/* As vq_qk_softmax, with the probabilities on the log-sqrt2 grid of `bits` bits and scale
 * 1 / inv_scale: the codes of even exponents in P, those of odd ones `odd` bytes after
 * (log2_sqrt2_codes). */
int vq_qk_softmax_log2(const int8_t *Q, const int8_t *Kt, int8_t *P, int64_t nb, int64_t nh,
                       int64_t m, int64_t k, int64_t n, int64_t sqb, int64_t sqh, int64_t sqm,
                       int64_t skb, int64_t skh, int64_t skr, int64_t spb, int64_t sph,
                       int64_t spm, float alpha, float inv_scale, int bits, int64_t odd)
{
    const Sm sm = {alpha, inv_scale, 0, 0, 0, bits, odd};
    return bmm(Q, Kt, (int32_t *)P, nb, nh, m, k, n, sqb, sqh, sqm, skb, skh, skr, spb, sph, spm,
               1, 1, NULL, &sm);
}
