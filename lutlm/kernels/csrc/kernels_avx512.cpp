/* AVX-512 kernels (F, BW, VBMI, VNNI): table build and tile kernels.
 *
 * Per 64-byte block of weights (16 rows x 4 bytes, two nibbles per byte) the inner loop is
 *     vpsrlw (high nibbles) -> [vpternlogd: put the byte position in index bits 4-5]
 *     -> 2 x vpermb (64 lookups each, table in a register) -> 2 x vpdpbusd
 * vpdpbusd multiplies each looked-up int8 by its plane weight 2^i (an unsigned byte) and
 * sums the four bytes of a row into its int32 lane: the bit-serial combination and the
 * widening in one instruction. The 4-plane section needs no vpternlogd: its table register
 * holds one chunk's table four times, so the stray high bits of an index are harmless.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni,fma,f16c")

#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "epilogue_avx512.h"

namespace {

/* Sign vectors: lane e of kSigns[j] is +1 where bit j of pattern e is set, else -1. */
struct SignVectors {
    __m512 v[4];
};

inline SignVectors plane_signs() {
    SignVectors s;
    for (int j = 0; j < 4; j++) {
        const __m512i idx = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        const __mmask16 set = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(1 << j));
        s.v[j] = _mm512_mask_blend_ps(set, _mm512_set1_ps(-1.0f), _mm512_set1_ps(1.0f));
    }
    return s;
}

inline SignVectors ternary_signs() {
    SignVectors s;
    for (int j = 0; j < 3; j++) {
        float d[16];
        for (int m = 0; m < 16; m++) d[m] = (float)lutlm_ternary_digits[m][j];
        s.v[j] = _mm512_loadu_ps(d);
    }
    s.v[3] = _mm512_setzero_ps();
    return s;
}

/* The 16 float entries of one chunk's table, in the scalar builder's order. */
inline __m512 chunk_table(const float *x, const SignVectors &s, bool ternary) {
    __m512 t = _mm512_mul_ps(_mm512_set1_ps(x[0]), s.v[0]);
    t = _mm512_fmadd_ps(_mm512_set1_ps(x[1]), s.v[1], t);
    t = _mm512_fmadd_ps(_mm512_set1_ps(x[2]), s.v[2], t);
    if (!ternary) t = _mm512_fmadd_ps(_mm512_set1_ps(x[3]), s.v[3], t);
    return t;
}

void build_act(const Geometry *g, const float *x, uint8_t *act) {
    const lutlm_weight *w = g->w;
    const ActLayout &L = g->act;
    const bool ternary = w->kind == LUTLM_TERNARY;
    const int chunk = ternary ? 3 : 4;
    const int64_t per_block = w->q_block / chunk;
    const SignVectors signs = ternary ? ternary_signs() : plane_signs();
    const __m512i bias = _mm512_set1_epi32(g->mode == LUTLM_FAST_AGG ? 128 : 0);
    int8_t *tables = (int8_t *)(act + L.tables);
    int8_t *pairs = L.has_pairs ? (int8_t *)(act + L.pair_tables) : nullptr;
    float *scale = (float *)(act + L.table_scale);
    float *xsum = (float *)(act + L.x_sum);
    __m512 block_tables[LUTLM_MAX_QBLOCK_CHUNKS]; /* one q-block's float tables */

    for (int64_t qb = 0; qb < g->n_qblocks; qb++) {
        const float *xb = x + qb * w->q_block;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t c = 0; c < per_block; c++) {
            block_tables[c] = chunk_table(xb + c * chunk, signs, ternary);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(block_tables[c]));
        }
        __m512 s = _mm512_setzero_ps();
        for (int64_t i = 0; i < w->q_block; i += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(xb + i));
        const float m = _mm512_reduce_max_ps(amax);
        const __m512 inv = _mm512_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
        scale[qb] = m / 127.0f;
        xsum[qb] = _mm512_reduce_add_ps(s);
        for (int64_t c = 0; c < per_block; c++) {
            const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(block_tables[c], inv)), bias);
            const __m128i bytes = _mm512_cvtepi32_epi8(q);
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

/* Index bytes for a lookup: the nibble, with the byte's position (0..3) in bits 4-5. */
inline __m512i low_index(__m512i v, __m512i nib, __m512i pos) { return _mm512_ternarylogic_epi32(v, nib, pos, 0xEA); }
inline __m512i high_index(__m512i v, __m512i nib, __m512i pos) {
    return _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nib, pos, 0xEA);
}

/* Add two looked-up vectors into a and b, weighted per byte by `weights`. FAST averages
 * them first (tables are then biased unsigned bytes) and needs one vpdpbusd, not two. */
template <bool FAST>
inline void accumulate(__m512i &a, __m512i &b, __m512i weights, __m512i lo, __m512i hi) {
    if (FAST) {
        a = _mm512_dpbusd_epi32(a, _mm512_avg_epu8(lo, hi), weights);
    } else {
        a = _mm512_dpbusd_epi32(a, weights, lo);
        b = _mm512_dpbusd_epi32(b, weights, hi);
    }
}

/* Constant that FAST's averaging adds to a q-block's row sum, per unit of weight: each
 * average of two biased bytes (a + 128) and (b + 128) is (a + b + 1) / 2 rounded down
 * + 128, that is (a + b) / 2 + 128 + 1/4 on average over the parity of a + b. */
inline float fast_offset(int64_t averages_times_weight) { return -(128.0f + 0.25f) * (float)averages_times_weight; }

template <bool FAST>
inline __m512i sum_accumulators(const __m512i *acc) {
    const __m512i a = _mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3]));
    const __m512i b = _mm512_add_epi32(_mm512_add_epi32(acc[4], acc[5]), _mm512_add_epi32(acc[6], acc[7]));
    const __m512i sum = _mm512_add_epi32(a, b);
    return FAST ? _mm512_slli_epi32(sum, 1) : sum; /* an average stands for two lookups */
}

struct PlaneConstants {
    __m512i nib, pos, w4, w2, w1;
};

/* One K-step (32 inputs) of one tile for NT tokens: `bits` blocks of weights at wp, read
 * and turned into indices once, then looked up in each token's tables (the step's 8
 * chunk tables at t + n * stride, its 4 pair tables at pt + n * stride). */
template <int BITS, bool FAST, int NT>
__attribute__((always_inline)) inline void plane_step(const uint8_t *wp, const int8_t *t, const int8_t *pt,
                                                      size_t stride, const PlaneConstants &k, __m512i (&a)[NT][4]) {
    if (BITS == 4) {
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_loadu_si512(wp + 64 * j), vh = _mm512_srli_epi16(v, 4);
            for (int n = 0; n < NT; n++) {
                const int8_t *tn = t + n * stride + 32 * j;
                const __m512i tl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)tn));
                const __m512i th = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tn + 16)));
                accumulate<FAST>(a[n][j], a[n][j], k.w4, _mm512_permutexvar_epi8(v, tl), _mm512_permutexvar_epi8(vh, th));
            }
        }
    }
    if (BITS == 2 || BITS == 3) {
        for (int j = 0; j < 2; j++) {
            const __m512i v = _mm512_loadu_si512(wp + 64 * j);
            const __m512i il = low_index(v, k.nib, k.pos), ih = high_index(v, k.nib, k.pos);
            for (int n = 0; n < NT; n++) {
                const int8_t *pn = pt + n * stride + 128 * j;
                accumulate<FAST>(a[n][j], a[n][j], k.w2, _mm512_permutexvar_epi8(il, _mm512_loadu_si512(pn)),
                                 _mm512_permutexvar_epi8(ih, _mm512_loadu_si512(pn + 64)));
            }
        }
    }
    if (BITS == 1 || BITS == 3) {
        const __m512i v = _mm512_loadu_si512(wp + 64 * (BITS == 3 ? 2 : 0));
        const __m512i il = low_index(v, k.nib, k.pos), ih = high_index(v, k.nib, k.pos);
        for (int n = 0; n < NT; n++) {
            const int8_t *tn = t + n * stride;
            accumulate<FAST>(a[n][2], a[n][3], k.w1, _mm512_permutexvar_epi8(il, _mm512_loadu_si512(tn)),
                             _mm512_permutexvar_epi8(ih, _mm512_loadu_si512(tn + 64)));
        }
    }
}

/* Ternary K-step (96 inputs): magnitudes in the 1-plane arrangement, then a sign bit per
 * lookup, applied by a masked subtraction from zero (also right for FAST's biased bytes:
 * 0 - (a + 128) wraps to -a + 128). */
template <bool FAST, int NT>
__attribute__((always_inline)) inline void ternary_step(const uint8_t *wp, const int8_t *t, size_t stride,
                                                        const PlaneConstants &k, __m512i (&a)[NT][4]) {
    const __m512i zero = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
        const __m512i v = _mm512_loadu_si512(wp + 64 * j);
        const __m512i il = low_index(v, k.nib, k.pos), ih = high_index(v, k.nib, k.pos);
        uint64_t sl, sh;
        memcpy(&sl, wp + 256 + 16 * j, 8);
        memcpy(&sh, wp + 256 + 16 * j + 8, 8);
        const __mmask64 ml = _cvtu64_mask64(sl), mh = _cvtu64_mask64(sh);
        for (int n = 0; n < NT; n++) {
            const int8_t *tn = t + n * stride + 8 * j * 16;
            __m512i lo = _mm512_permutexvar_epi8(il, _mm512_loadu_si512(tn));
            __m512i hi = _mm512_permutexvar_epi8(ih, _mm512_loadu_si512(tn + 64));
            lo = _mm512_mask_sub_epi8(lo, ml, zero, lo);
            hi = _mm512_mask_sub_epi8(hi, mh, zero, hi);
            accumulate<FAST>(a[n][j & 1], a[n][2 + (j & 1)], k.w1, lo, hi);
        }
    }
}

/* One tile over q-blocks [qb0, qb1) for NT tokens whose activation buffers are `stride`
 * bytes apart; out is [NT][16]. With one token, two accumulator sets alternate by step
 * so that enough independent vpdpbusd chains hide its latency; with several, the tokens
 * provide them. */
template <int BITS, bool TERNARY, bool FAST, int NT, int STEPS>
void tile_kernel(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, size_t stride,
                 float *out) {
    constexpr int64_t step_bytes = TERNARY ? 4 * 64 + 4 * 16 : 64 * BITS, steps_per_qb = STEPS;
    constexpr int64_t chunks_per_step = TERNARY ? LUTLM_TERNARY_STEP / 3 : LUTLM_STEP / 4;
    const uint8_t *wp = g->w->codes + (tile * g->n_steps + qb0 * steps_per_qb) * step_bytes;
    const int8_t *t = (const int8_t *)(act + g->act.tables) + qb0 * steps_per_qb * chunks_per_step * 16;
    const int8_t *pt = (const int8_t *)(act + g->act.pair_tables) + qb0 * steps_per_qb * chunks_per_step / 2 * 64;
    const PlaneConstants k = {
        _mm512_set1_epi8(0x0F), _mm512_set1_epi32(0x30201000),
        _mm512_set1_epi32(0x08040201),                                       /* 4-plane section: planes 0..3 */
        _mm512_set1_epi32(0x02010201),                                       /* 2-plane section: planes 0,1,0,1 */
        _mm512_set1_epi32(BITS == 3 && !TERNARY ? 0x04040404 : 0x01010101),  /* 1-plane: plane 2 or 0 */
    };
    /* Sum of byte weights over one K-step, for FAST's offset. */
    const int step_weight = TERNARY ? 4 * 4 : BITS == 4 ? 4 * 15 : BITS == 3 ? 2 * 6 + 16 : BITS == 2 ? 2 * 6 : 4;
    const float offset = FAST ? fast_offset(step_weight * steps_per_qb) * 2.0f : 0.0f;
    Epilogue e[NT];
    __m512 acc_out[NT];
    for (int n = 0; n < NT; n++) {
        e[n] = Epilogue(g, tile, act + n * stride, offset, qb0);
        acc_out[n] = _mm512_loadu_ps(out + 16 * n);
    }
    constexpr int SETS = NT == 1 ? 2 : 1;
    /* Integer sums of up to kBatch q-blocks first, then their float epilogues: the
     * epilogue waits on the last vpdpbusd of its q-block, and done right away it would
     * stall the lookups of the next one. */
    constexpr int kBatch = 16;
    const PrefetchRange prefetch = lutlm_prefetch_range(g, wp, qb1 - qb0);
    __m512i sums[kBatch][NT];
    for (int64_t qb_first = qb0; qb_first < qb1; qb_first += kBatch) {
        const int batch = (int)(qb1 - qb_first < kBatch ? qb1 - qb_first : kBatch);
        for (int b = 0; b < batch; b++) {
            lutlm_prefetch_qblock(wp, STEPS * step_bytes, prefetch);
            __m512i a[SETS][NT][4];
            for (int i = 0; i < SETS; i++)
                for (int n = 0; n < NT; n++)
                    for (int j = 0; j < 4; j++) a[i][n][j] = _mm512_setzero_si512();
            for (int st = 0; st < STEPS; st++) { /* unrolled: STEPS is a constant */
                if (TERNARY)
                    ternary_step<FAST, NT>(wp, t, stride, k, a[st % SETS]);
                else
                    plane_step<BITS, FAST, NT>(wp, t, pt, stride, k, a[st % SETS]);
                wp += step_bytes, t += chunks_per_step * 16, pt += chunks_per_step / 2 * 64;
            }
            for (int n = 0; n < NT; n++) {
                __m512i sum[8];
                for (int j = 0; j < 4; j++) sum[j] = a[0][n][j], sum[4 + j] = a[SETS - 1][n][j];
                if (SETS == 1)
                    for (int j = 4; j < 8; j++) sum[j] = _mm512_setzero_si512();
                sums[b][n] = sum_accumulators<FAST>(sum);
            }
        }
        for (int b = 0; b < batch; b++)
            for (int n = 0; n < NT; n++) acc_out[n] = e[n].apply(qb_first + b, sums[b][n], acc_out[n]);
    }
    for (int n = 0; n < NT; n++) _mm512_storeu_ps(out + 16 * n, e[n].end(acc_out[n]));
}

template <int BITS, bool FAST, int NT>
void planes_by_steps(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, size_t stride,
                     float *out) {
    switch (g->steps_per_qblock) { /* q-blocks of 32, 64, 96 or 128 inputs */
        case 1: return tile_kernel<BITS, false, FAST, NT, 1>(g, tile, qb0, qb1, act, stride, out);
        case 2: return tile_kernel<BITS, false, FAST, NT, 2>(g, tile, qb0, qb1, act, stride, out);
        case 3: return tile_kernel<BITS, false, FAST, NT, 3>(g, tile, qb0, qb1, act, stride, out);
        default: return tile_kernel<BITS, false, FAST, NT, 4>(g, tile, qb0, qb1, act, stride, out);
    }
}

template <bool FAST, int NT>
void tile_dispatch(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, size_t stride,
                   float *out) {
    if (g->w->kind == LUTLM_TERNARY) /* q-blocks of one 96-input step */
        return tile_kernel<2, true, FAST, NT, 1>(g, tile, qb0, qb1, act, stride, out);
    switch (g->w->bits) {
        case 1: return planes_by_steps<1, FAST, NT>(g, tile, qb0, qb1, act, stride, out);
        case 2: return planes_by_steps<2, FAST, NT>(g, tile, qb0, qb1, act, stride, out);
        case 3: return planes_by_steps<3, FAST, NT>(g, tile, qb0, qb1, act, stride, out);
        default: return planes_by_steps<4, FAST, NT>(g, tile, qb0, qb1, act, stride, out);
    }
}

template <bool FAST>
void tile_one(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    tile_dispatch<FAST, 1>(g, tile, qb0, qb1, act, 0, out);
}

const IsaKernels kAvx512 = {build_act, tile_one<false>, tile_one<true>, tile_dispatch<false, LUTLM_GEMM_TOKENS>};

}  // namespace

const IsaKernels *lutlm_avx512_kernels(void) { return &kAvx512; }
