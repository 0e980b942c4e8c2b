/* Helpers shared by vitquant's native kernels (vnni_bmm.c: attention; rows.c: row-wise ops). */
#ifndef VQ_COMMON_H
#define VQ_COMMON_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The lanes of a 16-float vector that lie before the end of a row, `left` elements away. */
static inline __mmask16 tail_mask(int64_t left)
{
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* x[j..j+16) of one row as float32: kind 0 float32; 1 bfloat16 (widened: a bfloat16 is the
 * high half); 2 int32 (converted). */
static inline __m512 load_row(const void *x, int64_t j, __mmask16 m, int kind)
{
    if (kind == 1) {
        const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + j);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (kind == 2)
        return _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, (const int32_t *)x + j));
    return _mm512_maskz_loadu_ps(m, (const float *)x + j);
}

/* The low bytes of 16 int32 lanes to y[0..16) (the lanes of m): the register form of vpmovdb
 * for full vectors, since vpmovdb to memory is slow on Zen 4. */
static inline void store_bytes(uint8_t *y, __m512i k, __mmask16 m)
{
    if (m == (__mmask16)0xFFFF)
        _mm_storeu_si128((__m128i *)y, _mm512_cvtepi32_epi8(k));
    else
        _mm512_mask_cvtepi32_storeu_epi8(y, m, k);
}

/* e^x for x <= 0 (Cephes expf: exponent split, degree-5 polynomial; within 2 ulp of expf). */
static inline __m512 exp_neg(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

#endif
