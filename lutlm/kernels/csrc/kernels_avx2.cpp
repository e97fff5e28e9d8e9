/* AVX2 kernels: the same layout and tables as the AVX-512 ones, for CPUs without
 * AVX-512 VBMI/VNNI.
 *
 * A 64-byte block is handled as two 32-byte halves (rows 0-7 and 8-15). vpshufb looks up
 * 16-entry tables per 128-bit lane, so a lane must read one table: the 4-plane blocks do
 * as stored; the 2-plane blocks are regrouped in registers (pair_indices) so that they do;
 * where all four bytes of a row index different chunks' tables (the 1-plane section,
 * ternary) each table is looked up in full and the results are blended by byte position.
 * Without vpdpbusd the weighted sum of a row's bytes is vpmaddubsw (pairs, weighted, to
 * int16), summed in int16 over a q-block, and widened by vpmaddwd once per q-block (Sums).
 * GEMM reads each weight block and makes its indices once for LUTLM_GEMM_TOKENS tokens.
 */
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "epilogue_avx2.h"

namespace {

struct SignVectors {
    __m256 v[4][2]; /* sign of input j for table entries 0-7 and 8-15 */
};

SignVectors make_signs(bool ternary) {
    SignVectors s;
    for (int j = 0; j < 4; j++) {
        float d[16];
        for (int e = 0; e < 16; e++)
            d[e] = ternary ? (j < 3 ? (float)lutlm_ternary_digits[e][j] : 0.0f) : (e >> j & 1 ? 1.0f : -1.0f);
        s.v[j][0] = _mm256_loadu_ps(d);
        s.v[j][1] = _mm256_loadu_ps(d + 8);
    }
    return s;
}

void build_act(const Geometry *g, const float *x, uint8_t *act) {
    const lutlm_weight *w = g->w;
    const ActLayout &L = g->act;
    const bool ternary = w->kind == LUTLM_TERNARY;
    const int chunk = ternary ? 3 : 4, inputs = ternary ? 3 : 4;
    const int64_t per_block = w->q_block / chunk;
    const SignVectors signs = make_signs(ternary);
    const __m128i bias = _mm_set1_epi8(g->mode == LUTLM_FAST_AGG ? (char)0x80 : 0);
    int8_t *tables = (int8_t *)(act + L.tables);
    int8_t *pairs = L.has_pairs ? (int8_t *)(act + L.pair_tables) : nullptr;
    float *scale = (float *)(act + L.table_scale);
    float *xsum = (float *)(act + L.x_sum);
    __m256 block_tables[LUTLM_MAX_QBLOCK_CHUNKS][2];

    for (int64_t qb = 0; qb < g->n_qblocks; qb++) {
        const float *xb = x + qb * w->q_block;
        __m256 amax = _mm256_setzero_ps();
        const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (int64_t c = 0; c < per_block; c++) {
            for (int h = 0; h < 2; h++) {
                __m256 t = _mm256_mul_ps(_mm256_set1_ps(xb[c * chunk]), signs.v[0][h]);
                for (int j = 1; j < inputs; j++) t = _mm256_fmadd_ps(_mm256_set1_ps(xb[c * chunk + j]), signs.v[j][h], t);
                block_tables[c][h] = t;
                amax = _mm256_max_ps(amax, _mm256_and_ps(t, abs_mask));
            }
        }
        /* Eight running sums: one scalar chain of q_block dependent adds took as long as
         * building the tables. */
        __m256 sums = _mm256_setzero_ps();
        for (int64_t i = 0; i < w->q_block; i += 8) sums = _mm256_add_ps(sums, _mm256_loadu_ps(xb + i));
        const float m = hmax(amax);
        const __m256 inv = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
        scale[qb] = m / 127.0f;
        xsum[qb] = hsum(sums);
        for (int64_t c = 0; c < per_block; c++) {
            const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(block_tables[c][0], inv));
            const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(block_tables[c][1], inv));
            const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
            const __m128i bytes = _mm_xor_si128(
                _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1)), bias);
            const int64_t ci = qb * per_block + c;
            _mm_storeu_si128((__m128i *)(tables + ci * 16), bytes);
            if (pairs) {
                int8_t *dst = pairs + (ci >> 1) * 64 + (ci & 1) * 32;
                _mm_storeu_si128((__m128i *)dst, bytes);
                _mm_storeu_si128((__m128i *)(dst + 16), bytes);
            }
        }
    }
}

inline __m256i table(const int8_t *tables, int64_t chunk) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tables + chunk * 16)));
}

/* Lookup where byte position p uses table t[p]. */
inline __m256i lookup4(const int8_t *tables, int64_t chunk0, __m256i idx) {
    const __m256i odd_bytes = _mm256_set1_epi16((short)0xFF00);
    const __m256i l01 = _mm256_blendv_epi8(_mm256_shuffle_epi8(table(tables, chunk0), idx),
                                           _mm256_shuffle_epi8(table(tables, chunk0 + 1), idx), odd_bytes);
    const __m256i l23 = _mm256_blendv_epi8(_mm256_shuffle_epi8(table(tables, chunk0 + 2), idx),
                                           _mm256_shuffle_epi8(table(tables, chunk0 + 3), idx), odd_bytes);
    return _mm256_blend_epi16(l01, l23, 0xAA);
}

/* The int16 sums of byte pairs of two looked-up vectors, weighted per byte: FAST averages
 * them first (tables are then biased unsigned bytes) and multiplies once, not twice. */
template <bool FAST>
inline __m256i weigh(__m256i weights, __m256i lo, __m256i hi) {
    if (FAST) return _mm256_maddubs_epi16(_mm256_avg_epu8(lo, hi), weights);
    return _mm256_add_epi16(_mm256_maddubs_epi16(weights, lo), _mm256_maddubs_epi16(weights, hi));
}

inline __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i high_nibbles(__m256i v) { return low_nibbles(_mm256_srli_epi16(v, 4)); }

/* -1 bytes where the sign bit of that byte's lookup is set: bit i of the 32 bits read. */
inline __m256i sign_bytes(const uint8_t *bits) {
    uint32_t b;
    memcpy(&b, bits, 4);
    const __m256i rep = _mm256_shuffle_epi8(_mm256_set1_epi32((int)b),
                                            _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                                               0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(rep, bit), bit);
}

inline __m256i negate_where(__m256i v, __m256i m) { return _mm256_sub_epi8(_mm256_xor_si256(v, m), m); }

/* See the AVX-512 file: FAST's offset per unit of byte weight in one average. */
inline float fast_offset(int64_t averages_times_weight) { return -(128.0f + 0.25f) * (float)averages_times_weight; }

/* One token's int16 row sums over a q-block, by section; widened to int32 once, at its end.
 *   s4[h]: 4-plane section, rows 8h + i in 32-bit lane i: int16 (p0 + 2 p1, p2 + 2 p3)
 *   s2:    2-plane section, 32-bit lane i: int16 (row i, row 8 + i), each p0 + 2 p1
 *   s1[h]: 1-plane section and ternary, rows 8h + i in lane i: unweighted pairs
 * Bound: a table entry is at most 127 in magnitude (a FAST average at most 255, unsigned),
 * a vpmaddubsw pair with weights (1, 2) at most 3 * 255 = 765. An int16 lane adds at most
 * 8 pairs per K-step (4 j x lo/hi in s4; 2 j x X/Y x lo/hi in s2; ternary's 4 j x lo/hi
 * in s1), FAST half as many, over at most 4 K-steps per q-block: 32 * 381 = 12192 and
 * 16 * 765 = 12240, both below 2^15. */
struct Sums {
    __m256i s4[2], s2, s1[2];
};

/* Each 128-bit lane of vpshufb reads one table, so the 2-plane blocks (where a row's bytes
 * 0, 1 read chunk 4j and its bytes 2, 3 chunk 4j + 1, lutlm.h) are regrouped first: X
 * holds the (0, 1) byte pairs of rows i and 8 + i in lane i, Y their (2, 3) pairs. */
struct PairIndices {
    __m256i xl, xh, yl, yh;
};

inline PairIndices pair_indices(const uint8_t *block) {
    const __m256i v0 = _mm256_loadu_si256((const __m256i *)block);        /* rows 0-7 */
    const __m256i v1 = _mm256_loadu_si256((const __m256i *)(block + 32)); /* rows 8-15 */
    const __m256i x = _mm256_blend_epi16(v0, _mm256_slli_epi32(v1, 16), 0xAA);
    const __m256i y = _mm256_blend_epi16(_mm256_srli_epi32(v0, 16), v1, 0xAA);
    return {low_nibbles(x), high_nibbles(x), low_nibbles(y), high_nibbles(y)};
}

/* One K-step (32 inputs) of one tile for NT tokens: the weights are read and turned into
 * indices once, then looked up in each token's tables (token n's step tables at
 * t + n * stride). */
template <int BITS, bool FAST, int NT>
__attribute__((always_inline)) inline void plane_step(const uint8_t *wp, const int8_t *t, size_t stride,
                                                      Sums (&a)[NT]) {
    const __m256i w12 = _mm256_set1_epi16(0x0201), ones = _mm256_set1_epi8(1);
    if (BITS == 4) {
        for (int j = 0; j < 4; j++)
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 64 * j + 32 * h));
                const __m256i il = low_nibbles(v), ih = high_nibbles(v);
                for (int n = 0; n < NT; n++) {
                    const int8_t *tn = t + n * stride;
                    a[n].s4[h] = _mm256_add_epi16(
                        a[n].s4[h], weigh<FAST>(w12, _mm256_shuffle_epi8(table(tn, 2 * j), il),
                                                _mm256_shuffle_epi8(table(tn, 2 * j + 1), ih)));
                }
            }
    }
    if (BITS == 2 || BITS == 3) {
        for (int j = 0; j < 2; j++) {
            const PairIndices p = pair_indices(wp + 64 * j);
            for (int n = 0; n < NT; n++) {
                const int8_t *tn = t + n * stride + 4 * j * 16;
                const __m256i x = weigh<FAST>(w12, _mm256_shuffle_epi8(table(tn, 0), p.xl),
                                              _mm256_shuffle_epi8(table(tn, 2), p.xh));
                const __m256i y = weigh<FAST>(w12, _mm256_shuffle_epi8(table(tn, 1), p.yl),
                                              _mm256_shuffle_epi8(table(tn, 3), p.yh));
                a[n].s2 = _mm256_add_epi16(a[n].s2, _mm256_add_epi16(x, y));
            }
        }
    }
    if (BITS == 1 || BITS == 3) {
        for (int h = 0; h < 2; h++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 64 * (BITS == 3 ? 2 : 0) + 32 * h));
            const __m256i il = low_nibbles(v), ih = high_nibbles(v);
            for (int n = 0; n < NT; n++) {
                const int8_t *tn = t + n * stride;
                a[n].s1[h] = _mm256_add_epi16(a[n].s1[h], weigh<FAST>(ones, lookup4(tn, 0, il), lookup4(tn, 4, ih)));
            }
        }
    }
}

/* Ternary K-step (96 inputs): magnitudes in the 1-plane arrangement, then a sign bit per
 * lookup (negation is also right for FAST's biased bytes: -(a + 128) wraps to -a + 128). */
template <bool FAST, int NT>
__attribute__((always_inline)) inline void ternary_step(const uint8_t *wp, const int8_t *t, size_t stride,
                                                        Sums (&a)[NT]) {
    const __m256i ones = _mm256_set1_epi8(1);
    for (int j = 0; j < 4; j++)
        for (int h = 0; h < 2; h++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 64 * j + 32 * h));
            const __m256i il = low_nibbles(v), ih = high_nibbles(v);
            const __m256i sl = sign_bytes(wp + 256 + 16 * j + 4 * h), sh = sign_bytes(wp + 256 + 16 * j + 8 + 4 * h);
            for (int n = 0; n < NT; n++) {
                const int8_t *tn = t + n * stride + 8 * j * 16;
                const __m256i lo = negate_where(lookup4(tn, 0, il), sl), hi = negate_where(lookup4(tn, 4, ih), sh);
                a[n].s1[h] = _mm256_add_epi16(a[n].s1[h], weigh<FAST>(ones, lo, hi));
            }
        }
}

/* A q-block's int32 row sums of half h from its int16 section sums. */
template <int BITS, bool TERNARY, bool FAST>
inline __m256i widen(const Sums &s, int h) {
    __m256i sum = _mm256_setzero_si256();
    if (!TERNARY && BITS == 4) sum = _mm256_madd_epi16(s.s4[h], _mm256_set1_epi32(0x00040001)); /* p0p1 + 4 p2p3 */
    if (!TERNARY && (BITS == 2 || BITS == 3))
        sum = _mm256_srai_epi32(h ? s.s2 : _mm256_slli_epi32(s.s2, 16), 16);
    if (TERNARY || BITS == 1 || BITS == 3) /* plane 2 (3 bits) or 0 */
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(s.s1[h], _mm256_set1_epi16(BITS == 3 && !TERNARY ? 4 : 1)));
    return FAST ? _mm256_slli_epi32(sum, 1) : sum; /* an average stands for two lookups */
}

/* One tile over q-blocks [qb0, qb1) for NT tokens whose activation buffers are `stride`
 * bytes apart; out is [NT][16]. */
template <int BITS, bool TERNARY, bool FAST, int NT>
void tile_kernel(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, size_t stride,
                 float *out) {
    const int64_t step_bytes = g->step_bytes, steps_per_qb = g->steps_per_qblock;
    const int64_t chunks_per_step = TERNARY ? LUTLM_TERNARY_STEP / 3 : LUTLM_STEP / 4;
    const uint8_t *wp = g->w->codes + (tile * g->n_steps + qb0 * steps_per_qb) * step_bytes;
    const int8_t *t = (const int8_t *)(act + g->act.tables) + qb0 * steps_per_qb * chunks_per_step * 16;
    const uint16_t *tile_scales = g->w->scales + tile * g->n_groups * 2 * LUTLM_TILE_ROWS;
    /* Sum of byte weights over one K-step, for FAST's offset. */
    const int step_weight = TERNARY ? 4 * 4 : BITS == 4 ? 4 * 15 : BITS == 3 ? 2 * 6 + 16 : BITS == 2 ? 2 * 6 : 4;
    const float offset = FAST ? fast_offset(step_weight * steps_per_qb) * 2.0f : 0.0f;
    __m256 acc[NT][2];
    for (int n = 0; n < NT; n++)
        for (int h = 0; h < 2; h++) acc[n][h] = _mm256_loadu_ps(out + 16 * n + 8 * h);
    int64_t group = qb0 / g->qblocks_per_group, in_group = qb0 % g->qblocks_per_group; /* counted, not divided */

    const PrefetchRange prefetch = lutlm_prefetch_range(g, wp, qb1 - qb0);
    for (int64_t qb = qb0; qb < qb1; qb++) {
        lutlm_prefetch_qblock(wp, steps_per_qb * step_bytes, prefetch);
        Sums s[NT];
        for (int n = 0; n < NT; n++) s[n] = {{_mm256_setzero_si256(), _mm256_setzero_si256()}, _mm256_setzero_si256(),
                                             {_mm256_setzero_si256(), _mm256_setzero_si256()}};
        for (int64_t st = 0; st < steps_per_qb; st++, wp += step_bytes, t += chunks_per_step * 16) {
            if (TERNARY)
                ternary_step<FAST, NT>(wp, t, stride, s);
            else
                plane_step<BITS, FAST, NT>(wp, t, stride, s);
        }
        for (int n = 0; n < NT; n++)
            for (int h = 0; h < 2; h++)
                acc[n][h] = epilogue(g, tile_scales, act + n * stride, qb, group, h, widen<BITS, TERNARY, FAST>(s[n], h),
                                     offset, acc[n][h]);
        if (++in_group == g->qblocks_per_group) in_group = 0, group++;
    }
    for (int n = 0; n < NT; n++)
        for (int h = 0; h < 2; h++) _mm256_storeu_ps(out + 16 * n + 8 * h, acc[n][h]);
}

template <bool FAST, int NT>
void tile_dispatch(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, size_t stride,
                   float *out) {
    if (g->w->kind == LUTLM_TERNARY) return tile_kernel<2, true, FAST, NT>(g, tile, qb0, qb1, act, stride, out);
    switch (g->w->bits) {
        case 1: return tile_kernel<1, false, FAST, NT>(g, tile, qb0, qb1, act, stride, out);
        case 2: return tile_kernel<2, false, FAST, NT>(g, tile, qb0, qb1, act, stride, out);
        case 3: return tile_kernel<3, false, FAST, NT>(g, tile, qb0, qb1, act, stride, out);
        default: return tile_kernel<4, false, FAST, NT>(g, tile, qb0, qb1, act, stride, out);
    }
}

template <bool FAST>
void tile_one(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    tile_dispatch<FAST, 1>(g, tile, qb0, qb1, act, 0, out);
}

const IsaKernels kAvx2 = {build_act, tile_one<false>, tile_one<true>, tile_dispatch<false, LUTLM_GEMM_TOKENS>};

}  // namespace

const IsaKernels *lutlm_avx2_kernels(void) { return &kAvx2; }
