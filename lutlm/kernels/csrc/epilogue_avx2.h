/* Float code shared by the AVX2 table-lookup kernels and the AVX2 dequantize baseline:
 * horizontal reductions, and the per-q-block epilogue of 8 rows (the same formula as
 * epilogue_avx512.h). Include after the file's `#pragma GCC target`.
 *
 *     out += s * (sum * unit * factor + (mid - z) * xsum)
 *
 * sum is the q-block's integer row sum, unit the value of one integer step of the
 * activation side (a table scale, or the int8 activations' scale), s and z the row's
 * group scale and zero, mid and factor from the Geometry (the dequantize baseline has
 * mid = 0, factor = 1).
 */
#ifndef LUTLM_EPILOGUE_AVX2_H
#define LUTLM_EPILOGUE_AVX2_H

#include <immintrin.h>

#include "internal.h"

namespace {

inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* For the 8 rows of half h (rows 8h .. 8h + 7 of the tile) of q-block qb in group gi. */
inline __m256 epilogue(const Geometry *g, const uint16_t *tile_scales, const uint8_t *act, int64_t qb, int64_t gi,
                       int h, __m256i sum, float sum_offset, __m256 out) {
    const float *unit = (const float *)(act + g->act.table_scale);
    const float *xsum = (const float *)(act + g->act.x_sum);
    const uint16_t *sc = tile_scales + gi * 2 * LUTLM_TILE_ROWS + 8 * h;
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sc));
    const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + LUTLM_TILE_ROWS)));
    const __m256 zs = _mm256_mul_ps(_mm256_sub_ps(_mm256_set1_ps(g->mid), z), _mm256_set1_ps(xsum[qb]));
    const __m256 acc = _mm256_add_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(sum_offset));
    const __m256 u = _mm256_fmadd_ps(acc, _mm256_set1_ps(unit[qb] * g->factor), zs);
    return _mm256_fmadd_ps(s, u, out);
}

}  // namespace

#endif
