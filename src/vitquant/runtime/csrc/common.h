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

/* x[j..j+16) of one row as float32 (bfloat16 rows are widened: a bfloat16 is the high half). */
static inline __m512 load_row(const void *x, int64_t j, __mmask16 m, int bf16)
{
    if (bf16) {
        const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + j);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
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

#endif
