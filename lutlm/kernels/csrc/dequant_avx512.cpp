/* The dot-product kernels on AVX-512 VNNI (layout: lutlm.h, method: dequant.cpp).
 *
 * Weight codes are unpacked to unsigned bytes and multiplied by vpdpbusd, 64 products per
 * instruction, the activations broadcast from memory. This is llama.cpp's Q4_0 x Q8_0
 * method, with 16 rows per register instead of one row (no horizontal sums). At 1..4 bits
 * the GEMV kernel masks codes in place instead of shifting them (3 and 4 bits) (one AND each; each mask's
 * products go to their own accumulator and are shifted back exactly once per q-block). At
 * 5..7 bits it puts each code together as a byte (fields shifted and OR-ed: one vpdpbusd per
 * 4 inputs, where masks in place would need one per section and twice the accumulators),
 * 2-bit codes are shifted down to bytes (no shift back per mask), and 8-bit codes are bytes
 * already. Accumulators hold inputs of one half of the
 * K-step only (0..15 or 16..31), so that groups of 16 take their two sums apart. The GEMM
 * kernel (tile_batch) unpacks every width to bytes, once for up to 8 tokens.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")
/* GCC 12's AVX-512 headers start many intrinsics from `__m512 __Y = __Y` (_mm512_undefined_*),
 * which -Wmaybe-uninitialized reports once per inlined use: hundreds of false warnings here. */
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "epilogue_avx512.h"

namespace {

void quantize_activations(const Geometry *g, const float *x, uint8_t *act) {
    const lutlm_weight *w = g->w;
    int8_t *xq = (int8_t *)(act + g->act.tables);
    float *dx = (float *)(act + g->act.table_scale), *xsum = (float *)(act + g->act.x_sum);
    const bool g16 = lutlm_dot_g16(g);
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t qb = 0; qb < g->n_qblocks; qb++) {
        const float *xb = x + qb * w->q_block;
        __m512 m = _mm512_setzero_ps();
        for (int64_t i = 0; i < w->q_block; i += 16) m = _mm512_max_ps(m, _mm512_and_ps(_mm512_loadu_ps(xb + i), abs_mask));
        const float amax = _mm512_reduce_max_ps(m);
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        dx[qb] = amax / 127.0f;
        __m512i sum = _mm512_setzero_si512();
        for (int64_t i = 0; i < w->q_block; i += 16) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), inv));
            if (g16) /* one sum per group of 16 */
                xsum[(qb * w->q_block + i) / 16] = dx[qb] * (float)_mm512_reduce_add_epi32(q);
            else
                sum = _mm512_add_epi32(sum, q);
            _mm_storeu_si128((__m128i *)(xq + qb * w->q_block + i), _mm512_cvtepi32_epi8(q));
        }
        if (!g16) xsum[qb] = dx[qb] * (float)_mm512_reduce_add_epi32(sum); /* of the rounded activations: see dequant.cpp */
    }
}

inline __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* (byte >> shift) & mask of each byte (the 16-bit shift's spill from the next byte is masked off). */
inline __m512i field(__m512i v, int shift, int mask) {
    return _mm512_and_si512(_mm512_srli_epi16(v, shift), _mm512_set1_epi8((char)mask));
}

/* The value of a section of width W (whose blocks start at wp) for inputs 4m .. 4m + 3. */
template <int W>
inline __m512i section_value(const uint8_t *wp, int m) {
    if (W == 4) return field(_mm512_loadu_si512(wp + 64 * (m >> 1)), 4 * (m & 1), 0x0F);
    if (W == 2) return field(_mm512_loadu_si512(wp + 64 * (m >> 2)), 2 * (m & 3), 3);
    if (W == 1) return field(_mm512_loadu_si512(wp), m, 1);
    /* W == 3: the 2-bit section's field, then the 1-bit section's as bit 2 (values < 4: the
     * 16-bit left shift stays within each byte) */
    return _mm512_or_si512(section_value<2>(wp, m), _mm512_slli_epi16(section_value<1>(wp + 2 * 64, m), 2));
}

/* The codes of inputs 4m .. 4m + 3 of the tile's 16 rows as bytes, row r in dword lane r. */
template <int BITS>
inline __m512i code_bytes(const uint8_t *wp, int m) {
    if (BITS == 8) return _mm512_loadu_si512(wp + 64 * m);
    if (BITS <= 4) return section_value<(BITS < 4 ? BITS : 4)>(wp, m);
    const __m512i high = section_value<(BITS > 4 ? BITS - 4 : 1)>(wp + 4 * 64, m); /* < 16: shifts within bytes */
    return _mm512_or_si512(section_value<4>(wp, m), _mm512_slli_epi16(high, 4));
}

/* Inputs 4m .. 4m + 3 of one K-step of a section of width W (1..4) whose blocks start at wp,
 * times their activations x, into acc[16]: each accumulator holds the products of one mask
 * (so a multiple of its bit offset) and of one half of the step. 4 bits: acc[m] (block
 * m >> 1, x1 for even m, x16 for odd); 2 bits: acc[m] (block m >> 2, x4^(m & 3)); 1 bit:
 * acc[8 + m] (x2^m); 3 bits: both of the last two. Half m >> 2 throughout. Walking m with
 * every section at once keeps one broadcast of activations live instead of eight. */
template <int W>
inline void section(const uint8_t *wp, int m, __m512i x, __m512i acc[16]) {
    if (W == 4) {
        const __m512i v = _mm512_loadu_si512(wp + 64 * (m >> 1));
        acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_and_si512(v, _mm512_set1_epi8(m & 1 ? (char)0xF0 : 0x0F)), x);
    }
    if (W == 2 || W == 3) {
        const __m512i v = _mm512_loadu_si512(wp + 64 * (m >> 2));
        acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_and_si512(v, _mm512_set1_epi8((char)(3 << 2 * (m & 3)))), x);
    }
    if (W == 1 || W == 3) {
        const __m512i v = _mm512_loadu_si512(wp + 64 * (W == 3 ? 2 : 0));
        acc[8 + m] = _mm512_dpbusd_epi32(acc[8 + m], _mm512_and_si512(v, _mm512_set1_epi8((char)(1 << m))), x);
    }
}

/* sum_k q_k xq_k of a section over half H of the steps (0: inputs 0..15, 1: 16..31, 2: all):
 * each accumulator shifted back by its mask's offset (exact: it is a multiple of it). */
template <int W, int H>
inline __m512i section_sum(const __m512i acc[16]) {
    const int lo = H == 1 ? 1 : 0, hi = H == 0 ? 1 : 2; /* halves [lo, hi) */
    __m512i sum = _mm512_setzero_si512();
    if (W == 4)
        for (int j = 2 * lo; j < 2 * hi; j++)
            sum = _mm512_add_epi32(sum, _mm512_add_epi32(acc[2 * j], _mm512_srai_epi32(acc[2 * j + 1], 4)));
    if (W == 2 || W == 3)
        for (int m = 0; m < 4; m++) {
            const __m512i a = hi - lo == 2 ? _mm512_add_epi32(acc[m], acc[4 + m]) : acc[4 * lo + m];
            sum = _mm512_add_epi32(sum, _mm512_srai_epi32(a, 2 * m));
        }
    if (W == 1 || W == 3) {
        __m512i bit = _mm512_setzero_si512();
        for (int m = 4 * lo; m < 4 * hi; m++) bit = _mm512_add_epi32(bit, _mm512_srai_epi32(acc[8 + m], m));
        sum = _mm512_add_epi32(sum, W == 3 ? _mm512_slli_epi32(bit, 2) : bit);
    }
    return sum;
}

/* The sum of a K-step half H (0, 1; 2: both): of the sections' accumulators (1..4 bits), or
 * of the byte accumulators acc[m] (5..8 bits, inputs 4m .. 4m + 3). */
template <int BITS, int H>
inline __m512i code_sum(const __m512i acc[16]) {
    if (BITS == 2) { /* step_products' two accumulators per half */
        const __m512i lo = _mm512_add_epi32(acc[0], acc[1]), hi = _mm512_add_epi32(acc[2], acc[3]);
        return H == 0 ? lo : H == 1 ? hi : _mm512_add_epi32(lo, hi);
    }
    if (BITS <= 4) return section_sum<(BITS < 4 ? BITS : 4), H>(acc);
    __m512i sum = _mm512_setzero_si512();
    for (int m = H == 1 ? 4 : 0; m < (H == 0 ? 4 : 8); m++) sum = _mm512_add_epi32(sum, acc[m]);
    return sum;
}

/* out += s (dx sum - z xsum) for the q-block's two groups of 16 (groups 2 qb and 2 qb + 1). */
inline __m512 epilogue_g16(const uint16_t *tile_scales, const float *dx, const float *xsum, int64_t qb, __m512i sum0,
                           __m512i sum1, __m512 out) {
    const __m512 d = _mm512_set1_ps(dx[qb]);
    const __m512i sums[2] = {sum0, sum1};
    for (int h = 0; h < 2; h++) {
        const uint16_t *sc = tile_scales + (2 * qb + h) * 2 * LUTLM_TILE_ROWS;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
        const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + LUTLM_TILE_ROWS)));
        const __m512 u = _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[2 * qb + h]), _mm512_mul_ps(_mm512_cvtepi32_ps(sums[h]), d));
        out = _mm512_fmadd_ps(s, u, out);
    }
    return out;
}

/* One K-step's products (codes at wp, activations xs) into the accumulators of `section`. */
template <int BITS>
inline void step_products(const uint8_t *wp, const int8_t *xs, __m512i acc[16]) {
    if (BITS == 2) { /* crumbs shifted down to bytes: no shift back per mask later (code_sum) */
        for (int j = 0; j < 2; j++) {
            const __m512i v = _mm512_loadu_si512(wp + 64 * j);
            for (int c = 0; c < 4; c++) {
                const __m512i q = _mm512_and_si512(c ? _mm512_srli_epi16(v, 2 * c) : v, _mm512_set1_epi8(3));
                acc[2 * j + (c & 1)] = _mm512_dpbusd_epi32(acc[2 * j + (c & 1)], q, bcast4(xs + 16 * j + 4 * c));
            }
        }
        return;
    }
    for (int m = 0; m < 8; m++) {
        const __m512i x = bcast4(xs + 4 * m);
        if (BITS <= 4)
            section<(BITS < 4 ? BITS : 4)>(wp, m, x, acc);
        else /* the whole code as a byte: the 8-bit block m, or fields put together */
            acc[m] = _mm512_dpbusd_epi32(acc[m], code_bytes<BITS>(wp, m), x);
    }
}

/* The 16 rows' sc and m of group j of a super-block, as int32 (lutlm.h). */
inline void super_sc_m(const Geometry *g, const uint8_t *sb, int j, __m512i *sc, __m512i *m) {
    const __m128i b = _mm_loadu_si128((const __m128i *)(sb + 64 + 16 * j));
    if (g->w->scale_kind == LUTLM_SCALES_SUPER) {
        *sc = _mm512_cvtepi8_epi32(b);
        *m = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sb + 64 + 16 * (g->w->super_groups + j))));
    } else if (g->w->scale_kind == LUTLM_SCALES_SUPER_SYM) {
        *sc = *m = _mm512_cvtepi8_epi32(b);
    } else {
        const __m512i v = _mm512_cvtepu8_epi32(b);
        *sc = _mm512_and_si512(v, _mm512_set1_epi32(15));
        *m = _mm512_srli_epi32(v, 4);
    }
}

/* The GEMV with super-block scales: within a super-block the sub-scales multiply the integer
 * sums (sc0 sum0 + sc1 sum1 per q-block, exact in int32), the activation scale dx the result,
 * and d once per super-block; the offsets m meet the activation sums, dmin once per
 * super-block. Per group that is one integer multiply-add instead of the float scale
 * products of each group (Q2_K's groups of 16 otherwise spend as much on scales as on codes). */
template <int BITS, bool G16>
void tile_super(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    const int8_t *xq = (const int8_t *)(act + g->act.tables);
    const float *dx = (const float *)(act + g->act.table_scale), *xsum = (const float *)(act + g->act.x_sum);
    const uint8_t *wp = g->w->codes + (tile * g->n_steps + qb0) * 64 * BITS; /* one K-step per q-block */
    const int groups_per_qb = G16 ? 2 : 1;
    const int64_t qb_per_super = (int64_t)g->w->super_groups / groups_per_qb;
    __m512 acc_out = _mm512_loadu_ps(out);
    const PrefetchRange prefetch = lutlm_prefetch_range(g, wp, qb1 - qb0);
    for (int64_t qb = qb0; qb < qb1;) {
        int j0;
        const uint8_t *sb = lutlm_super_scales(g, tile, groups_per_qb * qb, &j0);
        const int64_t start = qb - j0 / groups_per_qb; /* the super-block's first q-block */
        const int64_t end = qb1 < start + qb_per_super ? qb1 : start + qb_per_super;
        __m512 scaled = _mm512_setzero_ps(), offsets = _mm512_setzero_ps();
        for (int j = j0; qb < end; qb++, wp += 64 * BITS, j += groups_per_qb) {
            __m512i acc[16];
            for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();
            lutlm_prefetch_qblock(wp, 64 * BITS, prefetch);
            step_products<BITS>(wp, xq + qb * LUTLM_STEP, acc);
            __m512i sc0, m0;
            super_sc_m(g, sb, j, &sc0, &m0);
            __m512i t;
            if (G16) {
                __m512i sc1, m1;
                super_sc_m(g, sb, j + 1, &sc1, &m1);
                t = _mm512_add_epi32(_mm512_mullo_epi32(sc0, code_sum<BITS, 0>(acc)),
                                     _mm512_mullo_epi32(sc1, code_sum<BITS, 1>(acc)));
                offsets = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m0), _mm512_set1_ps(xsum[2 * qb]), offsets);
                offsets = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m1), _mm512_set1_ps(xsum[2 * qb + 1]), offsets);
            } else {
                t = _mm512_mullo_epi32(sc0, code_sum<BITS, 2>(acc));
                offsets = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m0), _mm512_set1_ps(xsum[qb]), offsets);
            }
            scaled = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(dx[qb]), scaled);
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sb));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sb + 32)));
        acc_out = _mm512_fnmadd_ps(dmin, offsets, _mm512_fmadd_ps(d, scaled, acc_out));
    }
    _mm512_storeu_ps(out, acc_out);
}

/* s and s z of the tile's 16 rows in group `group`, from super-block scales (lutlm.h):
 * s = d sc, s z = dmin m, exact products of the file's fields. */
inline void super_scales(const Geometry *g, int64_t tile, int64_t group, __m512 *s, __m512 *sz) {
    int j;
    const uint8_t *sb = lutlm_super_scales(g, tile, group, &j);
    __m512i sc, m;
    super_sc_m(g, sb, j, &sc, &m);
    *s = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sb)), _mm512_cvtepi32_ps(sc));
    *sz = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sb + 32))), _mm512_cvtepi32_ps(m));
}

template <int BITS, bool G16>
void tile(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    if (g->w->scale_kind != LUTLM_SCALES_F16) return tile_super<BITS, G16>(g, tile, qb0, qb1, act, out);
    const int8_t *xq = (const int8_t *)(act + g->act.tables);
    const int64_t steps_per_qb = g->steps_per_qblock;
    Epilogue e(g, tile, act, 0.0f, qb0);
    const uint16_t *tile_scales = g->w->scales + tile * g->n_groups * 2 * LUTLM_TILE_ROWS;
    const float *dx = (const float *)(act + g->act.table_scale), *xsum = (const float *)(act + g->act.x_sum);
    const uint8_t *wp = g->w->codes + (tile * g->n_steps + qb0 * steps_per_qb) * 64 * BITS;
    __m512 acc_out = _mm512_loadu_ps(out);

    const PrefetchRange prefetch = lutlm_prefetch_range(g, wp, qb1 - qb0);
    for (int64_t qb = qb0; qb < qb1; qb++) {
        /* Enough independent accumulators to hide vpdpbusd's latency (see section). */
        __m512i acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();
        lutlm_prefetch_qblock(wp, steps_per_qb * 64 * BITS, prefetch); /* as the table-lookup kernels */
        for (int64_t st = qb * steps_per_qb; st < (qb + 1) * steps_per_qb; st++, wp += 64 * BITS)
            step_products<BITS>(wp, xq + st * LUTLM_STEP, acc);
        if (G16)
            acc_out = epilogue_g16(tile_scales, dx, xsum, qb, code_sum<BITS, 0>(acc), code_sum<BITS, 1>(acc), acc_out);
        else
            acc_out = e.apply(qb, code_sum<BITS, 2>(acc), acc_out);
    }
    _mm512_storeu_ps(out, G16 ? acc_out : e.end(acc_out));
}

/* ---- Several tokens at once (the GEMM): each K-step's codes are unpacked to whole bytes
 * (the code's value, 0..255) once, then multiplied with up to kTokens tokens' activations:
 * one vpdpbusd per 4 inputs per token at every width, where the GEMV kernel's masks in place
 * cost a vpdpbusd per mask. ---- */

constexpr int kTokens = 8; /* tokens per pass: 16 accumulator chains hide vpdpbusd's latency */

/* NT tokens (activation buffers `stride` bytes apart) over q-blocks [qb0, qb1) of one tile,
 * into out[NT][16]. Accumulators per token and half of the K-step (groups of 16 take them
 * apart; others add them). Epilogue per q-block: out += s (dx sum - z xsum) per group, the
 * scales converted once for all tokens. */
template <int BITS, bool G16, int NT>
void tile_tokens(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, size_t stride,
                 float *out) {
    const int64_t steps_per_qb = g->steps_per_qblock, qblocks_per_group = g->qblocks_per_group;
    const uint8_t *wp = g->w->codes + (tile * g->n_steps + qb0 * steps_per_qb) * 64 * BITS;
    const uint16_t *scales = g->w->scales + tile * g->n_groups * 2 * LUTLM_TILE_ROWS;
    const int8_t *x = (const int8_t *)(act + g->act.tables);
    const float *dx = (const float *)(act + g->act.table_scale), *xsum = (const float *)(act + g->act.x_sum);
    int64_t group = qb0 / qblocks_per_group, in_group = qb0 % qblocks_per_group;
    const bool super = g->w->scale_kind != LUTLM_SCALES_F16;
    for (int64_t qb = qb0; qb < qb1; qb++) {
        __m512i acc[NT][2];
        for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = _mm512_setzero_si512();
        for (int64_t st = qb * steps_per_qb; st < (qb + 1) * steps_per_qb; st++, wp += 64 * BITS) {
            __m512i c[8];
            for (int m = 0; m < 8; m++) c[m] = code_bytes<BITS>(wp, m);
            for (int n = 0; n < NT; n++) {
                const int8_t *xs = x + n * stride + st * LUTLM_STEP;
                for (int m = 0; m < 8; m++) acc[n][m >> 2] = _mm512_dpbusd_epi32(acc[n][m >> 2], c[m], bcast4(xs + 4 * m));
            }
        }
        if (G16) {
            /* Both groups in one pass over the tokens: one load and store of out each, the
             * two scales applied to the integer sums before dx (fewer float ops per token). */
            __m512 s0, s1, sz0, sz1;
            if (super) {
                super_scales(g, tile, 2 * qb, &s0, &sz0);
                super_scales(g, tile, 2 * qb + 1, &s1, &sz1);
            } else {
                const uint16_t *sc = scales + 2 * qb * 2 * LUTLM_TILE_ROWS;
                s0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
                s1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 2 * LUTLM_TILE_ROWS)));
                sz0 = _mm512_mul_ps(s0, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + LUTLM_TILE_ROWS))));
                sz1 = _mm512_mul_ps(s1, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 3 * LUTLM_TILE_ROWS))));
            }
            for (int n = 0; n < NT; n++) {
                const float *dn = (const float *)((const uint8_t *)dx + n * stride);
                const float *xn = (const float *)((const uint8_t *)xsum + n * stride);
                __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[n][0]), s0);
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[n][1]), s1, t);
                __m512 o = _mm512_fmadd_ps(t, _mm512_set1_ps(dn[qb]), _mm512_loadu_ps(out + 16 * n));
                o = _mm512_fnmadd_ps(sz0, _mm512_set1_ps(xn[2 * qb]), o);
                o = _mm512_fnmadd_ps(sz1, _mm512_set1_ps(xn[2 * qb + 1]), o);
                _mm512_storeu_ps(out + 16 * n, o);
            }
        } else {
            __m512 s, sz;
            if (super) {
                super_scales(g, tile, group, &s, &sz);
            } else {
                const uint16_t *sc = scales + group * 2 * LUTLM_TILE_ROWS;
                s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
                sz = _mm512_mul_ps(s, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + LUTLM_TILE_ROWS))));
            }
            for (int n = 0; n < NT; n++) {
                const float *dn = (const float *)((const uint8_t *)dx + n * stride);
                const float *xn = (const float *)((const uint8_t *)xsum + n * stride);
                const __m512i sum = _mm512_add_epi32(acc[n][0], acc[n][1]);
                __m512 o = _mm512_loadu_ps(out + 16 * n);
                o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(s, _mm512_set1_ps(dn[qb])), o);
                o = _mm512_fnmadd_ps(sz, _mm512_set1_ps(xn[qb]), o);
                _mm512_storeu_ps(out + 16 * n, o);
            }
        }
        if (++in_group == qblocks_per_group) in_group = 0, group++;
    }
}

template <int BITS, bool G16>
void tile_batch(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, size_t stride,
                int64_t tokens, float *out) {
    /* The next tile's slice of weights is elsewhere in memory (tiles are stored whole, one
     * after the other): ask for it now, so that it arrives while this tile computes. */
    const int64_t slice_bytes = (qb1 - qb0) * g->steps_per_qblock * 64 * BITS;
    if (tile + 1 < g->tiles) {
        const uint8_t *next = g->w->codes + ((tile + 1) * g->n_steps + qb0 * g->steps_per_qblock) * 64 * BITS;
        for (int64_t off = 0; off < slice_bytes; off += 64) _mm_prefetch((const char *)next + off, _MM_HINT_T1);
    }
    for (int64_t t = 0; t < tokens;) {
        const int64_t left = tokens - t;
        const uint8_t *a = act + t * stride;
        float *o = out + t * LUTLM_TILE_ROWS;
        if (left >= 8) tile_tokens<BITS, G16, 8>(g, tile, qb0, qb1, a, stride, o), t += 8;
        else if (left >= 4) tile_tokens<BITS, G16, 4>(g, tile, qb0, qb1, a, stride, o), t += 4;
        else if (left >= 2) tile_tokens<BITS, G16, 2>(g, tile, qb0, qb1, a, stride, o), t += 2;
        else tile_tokens<BITS, G16, 1>(g, tile, qb0, qb1, a, stride, o), t += 1;
    }
}

const DequantKernels kAvx512 = {
    quantize_activations,
    {nullptr, tile<1, false>, tile<2, false>, tile<3, false>, tile<4, false>, tile<5, false>, tile<6, false>,
     tile<7, false>, tile<8, false>},
    {nullptr, tile<1, true>, tile<2, true>, tile<3, true>, tile<4, true>, tile<5, true>, tile<6, true>,
     tile<7, true>, tile<8, true>},
    {nullptr, tile_batch<1, false>, tile_batch<2, false>, tile_batch<3, false>, tile_batch<4, false>,
     tile_batch<5, false>, tile_batch<6, false>, tile_batch<7, false>, tile_batch<8, false>},
    {nullptr, tile_batch<1, true>, tile_batch<2, true>, tile_batch<3, true>, tile_batch<4, true>,
     tile_batch<5, true>, tile_batch<6, true>, tile_batch<7, true>, tile_batch<8, true>},
};

}  // namespace

const DequantKernels *lutlm_dequant_avx512_kernels(void) { return &kAvx512; }
