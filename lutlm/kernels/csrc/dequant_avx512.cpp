/* The dequantize baseline on AVX-512 VNNI (layout and method: dequant.cpp).
 *
 * Weight codes are unpacked to unsigned bytes with one AND each and multiplied by vpdpbusd,
 * 64 products per instruction, the activations broadcast from memory. This is llama.cpp's
 * Q4_0 x Q8_0 method, with 16 rows per register instead of one row (no horizontal sums)
 * and plane masks instead of shifts (each mask's products go to their own accumulator and
 * are shifted back exactly once per q-block).
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")

#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "epilogue_avx512.h"

namespace {

void quantize_activations(const Geometry *g, const float *x, uint8_t *act) {
    const lutlm_weight *w = g->w;
    int8_t *xq = (int8_t *)(act + g->act.tables);
    float *dx = (float *)(act + g->act.table_scale), *xsum = (float *)(act + g->act.x_sum);
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t qb = 0; qb < g->n_qblocks; qb++) {
        const float *xb = x + qb * w->q_block;
        __m512 m = _mm512_setzero_ps();
        for (int64_t i = 0; i < w->q_block; i += 16) m = _mm512_max_ps(m, _mm512_and_ps(_mm512_loadu_ps(xb + i), abs_mask));
        const float amax = _mm512_reduce_max_ps(m);
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t i = 0; i < w->q_block; i += 16) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), inv));
            sum = _mm512_add_epi32(sum, q);
            _mm_storeu_si128((__m128i *)(xq + qb * w->q_block + i), _mm512_cvtepi32_epi8(q));
        }
        dx[qb] = amax / 127.0f;
        xsum[qb] = dx[qb] * (float)_mm512_reduce_add_epi32(sum); /* of the rounded activations: see dequant.cpp */
    }
}

inline __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

template <int BITS>
void tile(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    const int8_t *xq = (const int8_t *)(act + g->act.tables);
    const int64_t steps_per_qb = g->steps_per_qblock;
    Epilogue e(g, tile, act, 0.0f, qb0);
    const uint8_t *wp = g->w->codes + (tile * g->n_steps + qb0 * steps_per_qb) * 64 * BITS;
    __m512 acc_out = _mm512_loadu_ps(out);

    const PrefetchRange prefetch = lutlm_prefetch_range(g, wp, qb1 - qb0);
    for (int64_t qb = qb0; qb < qb1; qb++) {
        /* Each accumulator holds products scaled by one mask's bit offset, and there are
         * enough of them to hide vpdpbusd's latency. 4 bits: acc[2j] (x1), acc[2j+1] (x16);
         * 2 bits: acc[4j + m] (x4^m); 1 bit: acc[8 + m] (x2^m). */
        __m512i acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();
        lutlm_prefetch_qblock(wp, steps_per_qb * 64 * BITS, prefetch); /* as the table-lookup kernels */
        for (int64_t st = qb * steps_per_qb; st < (qb + 1) * steps_per_qb; st++, wp += 64 * BITS) {
            const int8_t *xs = xq + st * LUTLM_STEP;
            if (BITS == 4) {
                for (int j = 0; j < 4; j++) {
                    const __m512i v = _mm512_loadu_si512(wp + 64 * j);
                    acc[2 * j] = _mm512_dpbusd_epi32(acc[2 * j], _mm512_and_si512(v, _mm512_set1_epi8(0x0F)),
                                                     bcast4(xs + 8 * j));
                    acc[2 * j + 1] = _mm512_dpbusd_epi32(acc[2 * j + 1], _mm512_and_si512(v, _mm512_set1_epi8((char)0xF0)),
                                                         bcast4(xs + 8 * j + 4));
                }
            }
            if (BITS == 2 || BITS == 3) {
                for (int j = 0; j < 2; j++) {
                    const __m512i v = _mm512_loadu_si512(wp + 64 * j);
                    for (int m = 0; m < 4; m++)
                        acc[4 * j + m] = _mm512_dpbusd_epi32(
                            acc[4 * j + m], _mm512_and_si512(v, _mm512_set1_epi8((char)(3 << 2 * m))),
                            bcast4(xs + 16 * j + 4 * m));
                }
            }
            if (BITS == 1 || BITS == 3) {
                const __m512i v = _mm512_loadu_si512(wp + 64 * (BITS == 3 ? 2 : 0));
                for (int m = 0; m < 8; m++)
                    acc[8 + m] = _mm512_dpbusd_epi32(acc[8 + m], _mm512_and_si512(v, _mm512_set1_epi8((char)(1 << m))),
                                                     bcast4(xs + 4 * m));
            }
        }
        /* sum_k q_k xq_k: each accumulator shifted back by its mask's offset (exact). */
        __m512i sum = _mm512_setzero_si512();
        if (BITS == 4)
            for (int j = 0; j < 4; j++)
                sum = _mm512_add_epi32(sum, _mm512_add_epi32(acc[2 * j], _mm512_srai_epi32(acc[2 * j + 1], 4)));
        if (BITS == 2 || BITS == 3)
            for (int m = 0; m < 4; m++)
                sum = _mm512_add_epi32(sum, _mm512_srai_epi32(_mm512_add_epi32(acc[m], acc[4 + m]), 2 * m));
        if (BITS == 1 || BITS == 3) {
            __m512i bit = _mm512_setzero_si512();
            for (int m = 0; m < 8; m++) bit = _mm512_add_epi32(bit, _mm512_srai_epi32(acc[8 + m], m));
            sum = _mm512_add_epi32(sum, BITS == 3 ? _mm512_slli_epi32(bit, 2) : bit);
        }
        acc_out = e.apply(qb, sum, acc_out);
    }
    _mm512_storeu_ps(out, e.end(acc_out));
}

const DequantKernels kAvx512 = {quantize_activations, {nullptr, tile<1>, tile<2>, tile<3>, tile<4>}};

}  // namespace

const DequantKernels *lutlm_dequant_avx512_kernels(void) { return &kAvx512; }
