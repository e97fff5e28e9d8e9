/* The per-row float epilogue of a q-block, shared by the AVX-512 table-lookup kernels and
 * the AVX-512 dequantize baseline. Include after the file's `#pragma GCC target`.
 *
 *     out += s * (sum * unit * factor + (mid - z) * xsum)
 *
 * sum is the q-block's integer row sum, unit the value of one integer step of the
 * activation side (a table scale, or the int8 activations' scale), s and z the row's
 * group scale and zero, mid and factor from the Geometry. Summed over a group's q-blocks,
 * s and z apply once per group. Everything that does not change between q-blocks is
 * computed once per tile; the group index is counted, not divided.
 */
#ifndef LUTLM_EPILOGUE_AVX512_H
#define LUTLM_EPILOGUE_AVX512_H

#include <immintrin.h>

#include "internal.h"

namespace {

struct Epilogue {
    const uint16_t *scales; /* this tile's first group */
    const float *unit, *xsum;
    int64_t qblocks_per_group;
    __m512 mid;
    float factor, sum_offset;
    /* The group in progress: its q-blocks' unit-scaled sums and activation sums, which
     * its scale and zero multiply once, when it ends (or when the call does). */
    int64_t group = 0, in_group = 0;
    __m512 group_acc = _mm512_setzero_ps();
    float group_xsum = 0.0f;

    Epilogue() = default;
    Epilogue(const Geometry *g, int64_t tile, const uint8_t *act, float sum_offset_, int64_t qb0)
        : scales(g->w->scales + tile * g->n_groups * 2 * LUTLM_TILE_ROWS),
          unit((const float *)(act + g->act.table_scale)),
          xsum((const float *)(act + g->act.x_sum)),
          qblocks_per_group(g->qblocks_per_group),
          mid(_mm512_set1_ps(g->mid)),
          factor(g->factor),
          sum_offset(sum_offset_) {
        if (qb0) group = qb0 / qblocks_per_group, in_group = qb0 % qblocks_per_group;
    }

    __m512 apply(int64_t qb, __m512i sum, __m512 out) {
        const __m512 acc = _mm512_add_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(sum_offset));
        group_acc = _mm512_fmadd_ps(acc, _mm512_set1_ps(unit[qb] * factor), group_acc);
        group_xsum += xsum[qb];
        if (++in_group < qblocks_per_group) return out;
        out = finish(out);
        in_group = 0, group++;
        return out;
    }

    /* out += s * (group_acc + (mid - z) * group_xsum) for the group in progress. */
    __m512 finish(__m512 out) {
        const uint16_t *sc = scales + group * 2 * LUTLM_TILE_ROWS;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
        const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + LUTLM_TILE_ROWS)));
        const __m512 u = _mm512_fmadd_ps(_mm512_sub_ps(mid, z), _mm512_set1_ps(group_xsum), group_acc);
        group_acc = _mm512_setzero_ps();
        group_xsum = 0.0f;
        return _mm512_fmadd_ps(s, u, out);
    }

    /* At the end of a call: a group cut by the call's q-block range is finished here; its
     * remaining q-blocks add their share in a later call (the sum is linear in them). */
    __m512 end(__m512 out) { return in_group ? finish(out) : out; }
};

}  // namespace

#endif
