/* AVX2 kernels: the same layout and tables as the AVX-512 ones, for CPUs without
 * AVX-512 VBMI/VNNI.
 *
 * A 64-byte block is handled as two 32-byte halves (rows 0-7 and 8-15). vpshufb looks up
 * 16-entry tables per 128-bit lane, so where the four bytes of a row index different
 * chunks' tables (the 2- and 1-plane sections, ternary) each table is looked up in full
 * and the results are blended by byte position. Without vpdpbusd the weighted sum of a
 * row's four bytes is vpmaddubsw (pairs, weighted) then vpmaddwd (pairs of pairs).
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
        float m8[8], s = 0.0f, m = 0.0f;
        _mm256_storeu_ps(m8, amax);
        for (int i = 0; i < 8; i++) m = m8[i] > m ? m8[i] : m;
        for (int64_t i = 0; i < w->q_block; i++) s += xb[i];
        const __m256 inv = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
        scale[qb] = m / 127.0f;
        xsum[qb] = s;
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

/* Lookup where byte positions (0,1) use table a and (2,3) table b. */
inline __m256i lookup2(__m256i ta, __m256i tb, __m256i idx) {
    return _mm256_blend_epi16(_mm256_shuffle_epi8(ta, idx), _mm256_shuffle_epi8(tb, idx), 0xAA);
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

/* Sum the four bytes of each row's lane, weighted: a += sum_p weights[p] * v[p]. */
inline __m256i dot4(__m256i a, __m256i weights_u8, __m256i v_s8) {
    return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(weights_u8, v_s8), _mm256_set1_epi16(1)));
}

template <bool FAST>
inline __m256i accumulate(__m256i a, __m256i weights, __m256i lo, __m256i hi) {
    if (FAST)
        return _mm256_add_epi32(
            a, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_avg_epu8(lo, hi), weights), _mm256_set1_epi16(1)));
    return dot4(dot4(a, weights, lo), weights, hi);
}

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

template <bool FAST>
void tile(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    const lutlm_weight *w = g->w;
    const int8_t *tables = (const int8_t *)(act + g->act.tables);
    const bool ternary = w->kind == LUTLM_TERNARY;
    const int bits = w->bits;
    const int64_t step = g->step_inputs, step_bytes = g->step_bytes, steps_per_qb = g->steps_per_qblock;
    const uint8_t *wp = w->codes + (tile * g->n_steps + qb0 * steps_per_qb) * step_bytes;
    const uint16_t *tile_scales = w->scales + tile * g->n_groups * 2 * LUTLM_TILE_ROWS;
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const __m256i w4 = _mm256_set1_epi32(0x08040201), w2 = _mm256_set1_epi32(0x02010201);
    const __m256i w1 = _mm256_set1_epi32(bits == 3 && !ternary ? 0x04040404 : 0x01010101);
    const int step_weight = ternary ? 16 : bits == 4 ? 60 : bits == 3 ? 28 : bits == 2 ? 12 : 4;
    const float offset = FAST ? fast_offset(step_weight * steps_per_qb) * 2.0f : 0.0f;
    __m256 out_h[2] = {_mm256_loadu_ps(out), _mm256_loadu_ps(out + 8)};

    for (int64_t qb = qb0; qb < qb1; qb++) {
        __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t st = qb * steps_per_qb; st < (qb + 1) * steps_per_qb; st++, wp += step_bytes) {
            const int64_t c0 = st * (step / (ternary ? 3 : 4));
            for (int h = 0; h < 2; h++) {
                __m256i a = acc[h];
                if (ternary) {
                    for (int j = 0; j < 4; j++) {
                        const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 64 * j + 32 * h));
                        __m256i lo = lookup4(tables, c0 + 8 * j, _mm256_and_si256(v, nib));
                        __m256i hi = lookup4(tables, c0 + 8 * j + 4, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib));
                        lo = negate_where(lo, sign_bytes(wp + 256 + 16 * j + 4 * h));
                        hi = negate_where(hi, sign_bytes(wp + 256 + 16 * j + 8 + 4 * h));
                        a = accumulate<FAST>(a, w1, lo, hi);
                    }
                } else {
                    if (bits == 4) {
                        for (int j = 0; j < 4; j++) {
                            const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 64 * j + 32 * h));
                            a = accumulate<FAST>(
                                a, w4, _mm256_shuffle_epi8(table(tables, c0 + 2 * j), _mm256_and_si256(v, nib)),
                                _mm256_shuffle_epi8(table(tables, c0 + 2 * j + 1),
                                                    _mm256_and_si256(_mm256_srli_epi16(v, 4), nib)));
                        }
                    }
                    if (bits == 2 || bits == 3) {
                        for (int j = 0; j < 2; j++) {
                            const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 64 * j + 32 * h));
                            const int64_t c = c0 + 4 * j;
                            a = accumulate<FAST>(
                                a, w2, lookup2(table(tables, c), table(tables, c + 1), _mm256_and_si256(v, nib)),
                                lookup2(table(tables, c + 2), table(tables, c + 3),
                                        _mm256_and_si256(_mm256_srli_epi16(v, 4), nib)));
                        }
                    }
                    if (bits == 1 || bits == 3) {
                        const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 64 * (bits == 3 ? 2 : 0) + 32 * h));
                        a = accumulate<FAST>(a, w1, lookup4(tables, c0, _mm256_and_si256(v, nib)),
                                             lookup4(tables, c0 + 4, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib)));
                    }
                }
                acc[h] = a;
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256i sum = FAST ? _mm256_slli_epi32(acc[h], 1) : acc[h];
            out_h[h] = epilogue(g, tile_scales, act, qb, qb / g->qblocks_per_group, h, sum, offset, out_h[h]);
        }
    }
    _mm256_storeu_ps(out, out_h[0]);
    _mm256_storeu_ps(out + 8, out_h[1]);
}

const IsaKernels kAvx2 = {build_act, tile<false>, tile<true>, nullptr};

}  // namespace

const IsaKernels *lutlm_avx2_kernels(void) { return &kAvx2; }
