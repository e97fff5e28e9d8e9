/* The honest baseline: dequantize-then-multiply, as llama.cpp does it, on AVX-512 VNNI.
 *
 * Activations are quantized to int8 per q-block (like llama.cpp's Q8 blocks); weight codes
 * are unpacked to unsigned bytes with one AND each and multiplied by vpdpbusd, 64 products
 * per instruction, the activations broadcast from memory. This is llama.cpp's Q4_0 x Q8_0
 * method, with 16 rows per register instead of one row (no horizontal sums) and plane
 * masks instead of shifts (each mask's products go to their own accumulator and are
 * shifted back exactly once per q-block). Its GEMM runs the GEMV kernel per token over
 * cache-resident weight tiles, as ggml's vec_dot does.
 *
 * Layout (tile of 16 rows, K-step of 32 inputs, `bits` blocks of 64 bytes per step, byte
 * (r, p) of a block at 4 r + p; q = the code, inputs numbered within the step):
 *   4 bits: 4 blocks j:  low nibble q[8j + p], high nibble q[8j + 4 + p]
 *   2 bits (and the low 2 bits of 3-bit codes): 2 blocks j: bits 2m..2m+1 hold q[16j + 4m + p]
 *   1 bit (and bit 2 of 3-bit codes): 1 block: bit m holds q[4m + p]
 * Scales as in the table-lookup layout (lutlm.h).
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")

#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "epilogue_avx512.h"

namespace {

/* The baseline's activation buffer, in the ActLayout fields: int8 activations at
 * `tables`, their per-q-block scales at `table_scale`, the blocks' sums at `x_sum`. */
Geometry dequant_geometry(const lutlm_weight *w, int *ok) {
    Geometry g;
    *ok = lutlm_geometry(w, LUTLM_INT8, &g) == 0 && w->kind == LUTLM_PLANES;
    if (!*ok) return g;
    ActLayout &a = g.act;
    a.tables = 0;
    a.has_pairs = 0;
    a.pair_tables = a.table_scale = lutlm_align64((size_t)w->k_padded);
    a.x_sum = a.table_scale + lutlm_align64(g.n_qblocks * sizeof(float));
    a.bytes = a.x_sum + lutlm_align64(g.n_qblocks * sizeof(float));
    g.mid = 0.0f; /* w = s (q - z):  sum_k w_k x_k = s (dx sum_k q_k xq_k - z sum_k x_k) */
    g.factor = 1.0f;
    return g;
}

void quantize_activations(const Geometry *g, const float *x, uint8_t *act) {
    const lutlm_weight *w = g->w;
    int8_t *xq = (int8_t *)(act + g->act.tables);
    float *dx = (float *)(act + g->act.table_scale), *xsum = (float *)(act + g->act.x_sum);
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t qb = 0; qb < g->n_qblocks; qb++) {
        const float *xb = x + qb * w->q_block;
        __m512 m = _mm512_setzero_ps(), s = _mm512_setzero_ps();
        for (int64_t i = 0; i < w->q_block; i += 16) {
            const __m512 v = _mm512_loadu_ps(xb + i);
            m = _mm512_max_ps(m, _mm512_and_ps(v, abs_mask));
            s = _mm512_add_ps(s, v);
        }
        const float amax = _mm512_reduce_max_ps(m);
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        dx[qb] = amax / 127.0f;
        xsum[qb] = _mm512_reduce_add_ps(s);
        for (int64_t i = 0; i < w->q_block; i += 16)
            _mm_storeu_si128((__m128i *)(xq + qb * w->q_block + i),
                             _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), inv))));
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

    for (int64_t qb = qb0; qb < qb1; qb++) {
        /* Each accumulator holds products scaled by one mask's bit offset, and there are
         * enough of them to hide vpdpbusd's latency. 4 bits: acc[2j] (x1), acc[2j+1] (x16);
         * 2 bits: acc[4j + m] (x4^m); 1 bit: acc[8 + m] (x2^m). */
        __m512i acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();
        /* The same software prefetch of the weight stream as the table-lookup kernels. */
        for (int64_t off = 0; off < steps_per_qb * 64 * BITS; off += 64)
            _mm_prefetch((const char *)wp + 2048 + off, _MM_HINT_T0);
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

TileFn tile_for(int bits) {
    switch (bits) {
        case 1: return tile<1>;
        case 2: return tile<2>;
        case 3: return tile<3>;
        default: return tile<4>;
    }
}

}  // namespace

extern "C" int lutlm_dequant_matmul(const lutlm_weight *w, const float *x, int64_t batch, float *y) {
    if (batch == 0) return 0;
    int ok;
    const Geometry g = dequant_geometry(w, &ok);
    if (lutlm_best_isa() < LUTLM_AVX512 || !ok || !x || !y || batch < 0) return -1;
    return lutlm_run_tiled(&g, x, batch, y, quantize_activations, tile_for(w->bits), nullptr);
}
