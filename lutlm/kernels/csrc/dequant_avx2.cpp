/* The dot-product kernels on AVX2 (layout: lutlm.h, method: dequant.cpp).
 *
 * llama.cpp's AVX2 method: without vpdpbusd, a row's products are vpmaddubsw (unsigned
 * codes times signed activations, adjacent pairs summed to int16) then vpmaddwd with ones
 * (pairs of pairs, to int32). vpmaddubsw saturates at int16, so codes are shifted down to
 * their value before the multiply ((v >> 4) & 15, (v >> 2m) & 3, (v >> m) & 1), not masked
 * in place as on AVX-512; 3-bit codes (and the 3 high bits of 7-bit ones) are put together
 * from their two blocks, as llama.cpp does for Q3_K. 5..7-bit codes add their high section's
 * sums times 16 (vpmaddwd with 16s); 8-bit bytes are split into their two nibbles, whose
 * pair products fit (255 * 127 twice would not). A 64-byte block is handled as two 32-byte
 * halves (rows 0-7 and 8-15), both multiplying the same broadcast activations. Groups of
 * 16 keep the two halves of each K-step in separate sums.
 *
 * The int16 sums are widened only when they could overflow: a product pair is at most
 * 2 * 127 * 15, so 8 pairs (one row's K-step of a section of up to 4 bits) fit, and a whole
 * q-block of at most 4 K-steps at 1 and 2 bits (4 * 8 * 762 < 2^15).
 */
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "epilogue_avx2.h"

namespace {

void quantize_activations(const Geometry *g, const float *x, uint8_t *act) {
    const lutlm_weight *w = g->w;
    int8_t *xq = (int8_t *)(act + g->act.tables);
    float *dx = (float *)(act + g->act.table_scale), *xsum = (float *)(act + g->act.x_sum);
    const bool g16 = lutlm_dot_g16(g);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    /* packs interleaves the four vectors' 128-bit lanes; this puts their dwords back. */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t qb = 0; qb < g->n_qblocks; qb++) {
        const float *xb = x + qb * w->q_block;
        __m256 m0 = _mm256_setzero_ps(), m1 = m0;
        for (int64_t i = 0; i < w->q_block; i += 16) { /* q_block is a multiple of 32 */
            m0 = _mm256_max_ps(m0, _mm256_and_ps(_mm256_loadu_ps(xb + i), abs_mask));
            m1 = _mm256_max_ps(m1, _mm256_and_ps(_mm256_loadu_ps(xb + i + 8), abs_mask));
        }
        const float amax = hmax(_mm256_max_ps(m0, m1));
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        dx[qb] = amax / 127.0f;
        __m256i sum = _mm256_setzero_si256();
        for (int64_t i = 0; i < w->q_block; i += 32) {
            __m256i v[4];
            for (int j = 0; j < 4; j++) v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * j), inv));
            const __m256i s0 = _mm256_add_epi32(v[0], v[1]), s1 = _mm256_add_epi32(v[2], v[3]);
            if (g16) { /* one sum per group of 16 (integers below 2^24: the float sums are exact) */
                xsum[(qb * w->q_block + i) / 16] = dx[qb] * hsum(_mm256_cvtepi32_ps(s0));
                xsum[(qb * w->q_block + i) / 16 + 1] = dx[qb] * hsum(_mm256_cvtepi32_ps(s1));
            } else {
                sum = _mm256_add_epi32(sum, _mm256_add_epi32(s0, s1));
            }
            const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
            _mm256_storeu_si256((__m256i *)(xq + qb * w->q_block + i), _mm256_permutevar8x32_epi32(bytes, order));
        }
        if (!g16) xsum[qb] = dx[qb] * hsum(_mm256_cvtepi32_ps(sum)); /* of the rounded activations: see dequant.cpp */
    }
}

inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Unsigned codes times signed activations, adjacent pairs summed: int16, exact here. */
inline __m256i mul(__m256i codes, __m256i x) { return _mm256_maddubs_epi16(codes, x); }

/* (byte >> SHIFT) & MASK for each byte (the 16-bit shift's spill from the next byte is masked off). */
template <int SHIFT, int MASK>
inline __m256i field(__m256i v) {
    if constexpr (SHIFT > 0) v = _mm256_srli_epi16(v, SHIFT);
    return _mm256_and_si256(v, _mm256_set1_epi8(MASK));
}

/* Bit B of each byte, as the value 4 (bit 2 of a 3-bit code). */
template <int B>
inline __m256i bit_as_4(__m256i v) {
    __m256i s = v;
    if constexpr (B > 2) s = _mm256_srli_epi16(v, B - 2);
    if constexpr (B < 2) s = _mm256_slli_epi16(v, 2 - B);
    return _mm256_and_si256(s, _mm256_set1_epi8(4));
}

/* One K-step of a section of width W (1..4) whose blocks start at wp: int16 products into
 * s16[ih][h], ih the half of the step (inputs 0..15, 16..31; 0 for both unless G16), h the
 * half of the tile (rows 8h .. 8h + 7). Each lane holds a row's sums of pairs; summed over
 * the step, at most 8 * 2 * 127 * (2^W - 1) in magnitude. */
template <int W, bool G16>
inline void section(const uint8_t *wp, const int8_t *xs, __m256i s16[2][2]) {
    if (W == 4) {
        for (int j = 0; j < 4; j++) {
            const int ih = G16 ? j >> 1 : 0;
            const __m256i xl = bcast4(xs + 8 * j), xh = bcast4(xs + 8 * j + 4);
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 64 * j + 32 * h));
                s16[ih][h] = _mm256_add_epi16(
                    s16[ih][h], _mm256_add_epi16(mul(field<0, 0x0F>(v), xl), mul(field<4, 0x0F>(v), xh)));
            }
        }
    }
    if (W == 2) {
        for (int j = 0; j < 2; j++) {
            const int ih = G16 ? j : 0;
            const __m256i x0 = bcast4(xs + 16 * j), x1 = bcast4(xs + 16 * j + 4);
            const __m256i x2 = bcast4(xs + 16 * j + 8), x3 = bcast4(xs + 16 * j + 12);
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 64 * j + 32 * h));
                const __m256i a = _mm256_add_epi16(mul(field<0, 3>(v), x0), mul(field<2, 3>(v), x1));
                const __m256i b = _mm256_add_epi16(mul(field<4, 3>(v), x2), mul(field<6, 3>(v), x3));
                s16[ih][h] = _mm256_add_epi16(s16[ih][h], _mm256_add_epi16(a, b));
            }
        }
    }
    if (W == 3) {
        /* Input 16 j + 4 m + p: low bits at 2m in block j, bit 2 at bit 4 j + m of block 2. */
        for (int h = 0; h < 2; h++) {
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(wp + 32 * h));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(wp + 64 + 32 * h));
            const __m256i hi = _mm256_loadu_si256((const __m256i *)(wp + 128 + 32 * h));
            const __m256i a = _mm256_add_epi16(
                mul(_mm256_or_si256(field<0, 3>(v0), bit_as_4<0>(hi)), bcast4(xs)),
                mul(_mm256_or_si256(field<2, 3>(v0), bit_as_4<1>(hi)), bcast4(xs + 4)));
            const __m256i b = _mm256_add_epi16(
                mul(_mm256_or_si256(field<4, 3>(v0), bit_as_4<2>(hi)), bcast4(xs + 8)),
                mul(_mm256_or_si256(field<6, 3>(v0), bit_as_4<3>(hi)), bcast4(xs + 12)));
            const __m256i c = _mm256_add_epi16(
                mul(_mm256_or_si256(field<0, 3>(v1), bit_as_4<4>(hi)), bcast4(xs + 16)),
                mul(_mm256_or_si256(field<2, 3>(v1), bit_as_4<5>(hi)), bcast4(xs + 20)));
            const __m256i d = _mm256_add_epi16(
                mul(_mm256_or_si256(field<4, 3>(v1), bit_as_4<6>(hi)), bcast4(xs + 24)),
                mul(_mm256_or_si256(field<6, 3>(v1), bit_as_4<7>(hi)), bcast4(xs + 28)));
            if (G16) {
                s16[0][h] = _mm256_add_epi16(s16[0][h], _mm256_add_epi16(a, b));
                s16[1][h] = _mm256_add_epi16(s16[1][h], _mm256_add_epi16(c, d));
            } else {
                s16[0][h] = _mm256_add_epi16(s16[0][h], _mm256_add_epi16(_mm256_add_epi16(a, b), _mm256_add_epi16(c, d)));
            }
        }
    }
    if (W == 1) {
        __m256i x[8];
        for (int m = 0; m < 8; m++) x[m] = bcast4(xs + 4 * m);
        for (int h = 0; h < 2; h++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 32 * h));
            const __m256i a = _mm256_add_epi16(mul(field<0, 1>(v), x[0]), mul(field<1, 1>(v), x[1]));
            const __m256i b = _mm256_add_epi16(mul(field<2, 1>(v), x[2]), mul(field<3, 1>(v), x[3]));
            const __m256i c = _mm256_add_epi16(mul(field<4, 1>(v), x[4]), mul(field<5, 1>(v), x[5]));
            const __m256i d = _mm256_add_epi16(mul(field<6, 1>(v), x[6]), mul(field<7, 1>(v), x[7]));
            if (G16) {
                s16[0][h] = _mm256_add_epi16(s16[0][h], _mm256_add_epi16(a, b));
                s16[1][h] = _mm256_add_epi16(s16[1][h], _mm256_add_epi16(c, d));
            } else {
                s16[0][h] = _mm256_add_epi16(s16[0][h], _mm256_add_epi16(_mm256_add_epi16(a, b), _mm256_add_epi16(c, d)));
            }
        }
    }
}

/* 8-bit codes (whole bytes, block j = inputs 4j..4j+3): each byte's two nibbles multiplied
 * apart, since vpmaddubsw would saturate a pair of 255 * 127 products; low nibbles into lo,
 * high ones into hi (worth 16 each). Over the step, at most 8 * 2 * 127 * 15 per int16. */
template <bool G16>
inline void bytes_step(const uint8_t *wp, const int8_t *xs, __m256i lo[2][2], __m256i hi[2][2]) {
    for (int j = 0; j < 8; j++) {
        const int ih = G16 ? j >> 2 : 0;
        const __m256i x = bcast4(xs + 4 * j);
        for (int h = 0; h < 2; h++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 64 * j + 32 * h));
            lo[ih][h] = _mm256_add_epi16(lo[ih][h], mul(field<0, 0x0F>(v), x));
            hi[ih][h] = _mm256_add_epi16(hi[ih][h], mul(field<4, 0x0F>(v), x));
        }
    }
}

/* out += s (dx sum - z xsum) for rows 8h .. 8h + 7 and the group of 16 (2 qb + ih). */
inline __m256 epilogue_g16(const uint16_t *tile_scales, const uint8_t *act, const Geometry *g, int64_t qb, int ih,
                           int h, __m256i sum, __m256 out) {
    const float *dx = (const float *)(act + g->act.table_scale), *xsum = (const float *)(act + g->act.x_sum);
    const uint16_t *sc = tile_scales + (2 * qb + ih) * 2 * LUTLM_TILE_ROWS + 8 * h;
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sc));
    const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + LUTLM_TILE_ROWS)));
    const __m256 u = _mm256_fnmadd_ps(z, _mm256_set1_ps(xsum[2 * qb + ih]),
                                      _mm256_mul_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(dx[qb])));
    return _mm256_fmadd_ps(s, u, out);
}

/* The integer row sums of one K-step (codes at wp, activations xs) into sum[ih][h]: ih the
 * half of the step (0 for both unless G16), h the half of the tile. */
template <int BITS, bool G16>
inline void step_sums(const uint8_t *wp, const int8_t *xs, __m256i sum[2][2]) {
    __m256i lo[2][2], hi[2][2];
    for (int ih = 0; ih < 2; ih++)
        for (int h = 0; h < 2; h++) lo[ih][h] = hi[ih][h] = _mm256_setzero_si256();
    if (BITS == 8) {
        bytes_step<G16>(wp, xs, lo, hi);
    } else {
        section<(BITS < 4 ? BITS : 4), G16>(wp, xs, lo);
        if (BITS > 4) section<(BITS > 4 ? BITS - 4 : 1), G16>(wp + 4 * 64, xs, hi);
    }
    for (int ih = 0; ih < (G16 ? 2 : 1); ih++)
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_madd_epi16(lo[ih][h], _mm256_set1_epi16(1));
            if (BITS > 4) v = _mm256_add_epi32(v, _mm256_madd_epi16(hi[ih][h], _mm256_set1_epi16(16)));
            sum[ih][h] = v;
        }
}

/* Rows 8h .. 8h + 7's sc and m of group j of a super-block, as int32 (lutlm.h). */
inline void super_sc_m(const Geometry *g, const uint8_t *sb, int j, int h, __m256i *sc, __m256i *m) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)(sb + 64 + 16 * j + 8 * h));
    if (g->w->scale_kind == LUTLM_SCALES_SUPER) {
        *sc = _mm256_cvtepi8_epi32(b);
        *m = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sb + 64 + 16 * (g->w->super_groups + j) + 8 * h)));
    } else if (g->w->scale_kind == LUTLM_SCALES_SUPER_SYM) {
        *sc = *m = _mm256_cvtepi8_epi32(b);
    } else {
        const __m256i v = _mm256_cvtepu8_epi32(b);
        *sc = _mm256_and_si256(v, _mm256_set1_epi32(15));
        *m = _mm256_srli_epi32(v, 4);
    }
}

/* The GEMV with super-block scales (the method of dequant_avx512.cpp's tile_super): sub-scales
 * times integer sums in int32, dx per q-block, d and dmin once per super-block. */
template <int BITS, bool G16>
void tile_super(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    const int8_t *xq = (const int8_t *)(act + g->act.tables);
    const float *dx = (const float *)(act + g->act.table_scale), *xsum = (const float *)(act + g->act.x_sum);
    const uint8_t *wp = g->w->codes + (tile * g->n_steps + qb0) * 64 * BITS; /* one K-step per q-block */
    const int groups_per_qb = G16 ? 2 : 1;
    const int64_t qb_per_super = (int64_t)g->w->super_groups / groups_per_qb;
    __m256 out_h[2] = {_mm256_loadu_ps(out), _mm256_loadu_ps(out + 8)};
    const PrefetchRange prefetch = lutlm_prefetch_range(g, wp, qb1 - qb0);
    for (int64_t qb = qb0; qb < qb1;) {
        int j0;
        const uint8_t *sb = lutlm_super_scales(g, tile, groups_per_qb * qb, &j0);
        const int64_t start = qb - j0 / groups_per_qb; /* the super-block's first q-block */
        const int64_t end = qb1 < start + qb_per_super ? qb1 : start + qb_per_super;
        __m256 scaled[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, offsets[2] = {scaled[0], scaled[1]};
        for (int j = j0; qb < end; qb++, wp += 64 * BITS, j += groups_per_qb) {
            __m256i sums[2][2];
            lutlm_prefetch_qblock(wp, 64 * BITS, prefetch);
            step_sums<BITS, G16>(wp, xq + qb * LUTLM_STEP, sums);
            const __m256 d = _mm256_set1_ps(dx[qb]);
            for (int h = 0; h < 2; h++) {
                __m256i sc, m;
                super_sc_m(g, sb, j, h, &sc, &m);
                __m256i t = _mm256_mullo_epi32(sc, sums[0][h]);
                offsets[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(xsum[groups_per_qb * qb]), offsets[h]);
                if (G16) {
                    super_sc_m(g, sb, j + 1, h, &sc, &m);
                    t = _mm256_add_epi32(t, _mm256_mullo_epi32(sc, sums[1][h]));
                    offsets[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(xsum[2 * qb + 1]), offsets[h]);
                }
                scaled[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), d, scaled[h]);
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 dh = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sb + 16 * h)));
            const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sb + 32 + 16 * h)));
            out_h[h] = _mm256_fnmadd_ps(dmin, offsets[h], _mm256_fmadd_ps(dh, scaled[h], out_h[h]));
        }
    }
    _mm256_storeu_ps(out, out_h[0]);
    _mm256_storeu_ps(out + 8, out_h[1]);
}

template <int BITS, bool G16>
void tile(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    if (g->w->scale_kind != LUTLM_SCALES_F16) return tile_super<BITS, G16>(g, tile, qb0, qb1, act, out);
    const int8_t *xq = (const int8_t *)(act + g->act.tables);
    const int64_t steps_per_qb = g->steps_per_qblock, qblocks_per_group = g->qblocks_per_group;
    const uint8_t *wp = g->w->codes + (tile * g->n_steps + qb0 * steps_per_qb) * 64 * BITS;
    const uint16_t *tile_scales = g->w->scales + tile * g->n_groups * 2 * LUTLM_TILE_ROWS;
    const __m256i ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
    constexpr int IH = G16 ? 2 : 1; /* halves of the step with their own sums */
    /* Widen once per q-block (at most 4 K-steps) at 1 and 2 bits, else once per K-step. */
    constexpr bool kWidenPerStep = BITS > 2;
    __m256 out_h[2] = {_mm256_loadu_ps(out), _mm256_loadu_ps(out + 8)};
    int64_t group = qb0 / qblocks_per_group, in_group = qb0 % qblocks_per_group;

    const PrefetchRange prefetch = lutlm_prefetch_range(g, wp, qb1 - qb0);
    for (int64_t qb = qb0; qb < qb1; qb++) {
        __m256i acc[2][2], lo[2][2], hi[2][2]; /* [half of the step][half of the tile] */
        for (int ih = 0; ih < 2; ih++)
            for (int h = 0; h < 2; h++) acc[ih][h] = lo[ih][h] = hi[ih][h] = _mm256_setzero_si256();
        lutlm_prefetch_qblock(wp, steps_per_qb * 64 * BITS, prefetch); /* as the table-lookup kernels */
        for (int64_t st = qb * steps_per_qb; st < (qb + 1) * steps_per_qb; st++, wp += 64 * BITS) {
            const int8_t *xs = xq + st * LUTLM_STEP;
            if (BITS == 8) {
                bytes_step<G16>(wp, xs, lo, hi);
            } else {
                section<(BITS < 4 ? BITS : 4), G16>(wp, xs, lo);
                if (BITS > 4) section<(BITS > 4 ? BITS - 4 : 1), G16>(wp + 4 * 64, xs, hi);
            }
            if (kWidenPerStep)
                for (int ih = 0; ih < IH; ih++)
                    for (int h = 0; h < 2; h++) {
                        __m256i a = _mm256_add_epi32(acc[ih][h], _mm256_madd_epi16(lo[ih][h], ones));
                        if (BITS > 4) a = _mm256_add_epi32(a, _mm256_madd_epi16(hi[ih][h], sixteen));
                        acc[ih][h] = a;
                        lo[ih][h] = hi[ih][h] = _mm256_setzero_si256();
                    }
        }
        for (int ih = 0; ih < IH; ih++)
            for (int h = 0; h < 2; h++) {
                const __m256i sum = kWidenPerStep ? acc[ih][h] : _mm256_madd_epi16(lo[ih][h], ones);
                out_h[h] = G16 ? epilogue_g16(tile_scales, act, g, qb, ih, h, sum, out_h[h])
                               : epilogue(g, tile_scales, act, qb, group, h, sum, 0.0f, out_h[h]);
            }
        if (++in_group == qblocks_per_group) in_group = 0, group++;
    }
    _mm256_storeu_ps(out, out_h[0]);
    _mm256_storeu_ps(out + 8, out_h[1]);
}

const DequantKernels kAvx2 = {
    quantize_activations,
    {nullptr, tile<1, false>, tile<2, false>, tile<3, false>, tile<4, false>, tile<5, false>, tile<6, false>,
     tile<7, false>, tile<8, false>},
    {nullptr, tile<1, true>, tile<2, true>, tile<3, true>, tile<4, true>, tile<5, true>, tile<6, true>,
     tile<7, true>, tile<8, true>},
    {},
    {},
};

}  // namespace

const DequantKernels *lutlm_dequant_avx2_kernels(void) { return &kAvx2; }
