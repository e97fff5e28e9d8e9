/* The 4-bit prefill GEMM on AVX-512 VNNI + GFNI: int8 activations times weight codes that
 * are recovered from the table-lookup layout (lutlm.h) in registers.
 *
 * Why: a table lookup costs a vpermb and a vpdpbusd per 64 weight bits *per token*, so at
 * 4 bits a token needs 16 vector operations per K-step of a tile, where a byte dot product
 * of codes and int8 activations needs 8 vpdpbusd, and turning bit-planes into codes is paid
 * once per weight block for every token of the batch. With many tokens the dot product
 * wins (docs/kernels.md); with one, the lookups do (nothing to share the unpacking with, and
 * their tables need no activation rounding). api.cpp picks this kernel for 4-bit
 * products of at least lutlm_set_dot_gemm_min_tokens tokens.
 *
 * Unpacking one 64-byte block of the 4-plane section (16 rows x 8 inputs 8j..8j+7): a
 * qword holds rows 2q and 2q+1, byte 4 (row & 1) + plane, and bit m of every byte is input
 * 8j + m. Reverse the qword's bytes (vpshufb); then GF2P8AFFINEQB, with the qword as the bit
 * matrix and a single bit 1 << m in byte b of the other operand, gathers bit m of the eight
 * bytes into byte b (an 8x8 bit transpose): low nibble row 2q's code of input 8j + m, high
 * nibble row 2q+1's. Taking m = b mod 4 and AND-ing the low nibbles of bytes 0-3 and the
 * high nibbles of bytes 4-7 leaves, in dword lane r, row r's codes of inputs 8j..8j+3 (odd
 * rows times 16): lanes in row order, ready for vpdpbusd against those four activations
 * broadcast from memory. m = 4 + b mod 4 gives inputs 8j+4..8j+7 the same way. The factor
 * 16 of the odd rows is divided out of their scales (exact in floats).
 *
 * Epilogue per q-block and token: out += (s / lane factor) * dx * sum - s z * xsum, with the
 * scale vectors converted once per q-block for all tokens.
 *
 * Activations are rounded to int8 per q-block as in the dequantize baseline (whose builder
 * this kernel uses, and whose integer sums it reproduces exactly; only the order of float
 * operations differs), so its error bound is the baseline's: each rounding error (at most
 * max|x| / 254) meets q - z, |err| <= sum_blocks |s| (max|x| / 254) (mid + |mid - z|) Q, plus
 * fp32 rounding (tests/test_kernels_cpu.py).
 *
 * Blocking: the driver hands over one tile, a K slice of q-blocks, and all tokens of a token
 * block; the tile's 4 KiB of weights for the slice stay in L1 while groups of 8 tokens pass,
 * each group's activations (8 x 512 bytes) also from L1.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,gfni,fma,f16c")

#include <immintrin.h>
#include <string.h>

#include "internal.h"

namespace {

constexpr int kTokens = 8; /* tokens per pass: 16 accumulator chains hide vpdpbusd's latency */

template <int NT>
void tile_tokens(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, size_t stride,
                 float *out) {
    const int64_t steps_per_qb = g->steps_per_qblock, qblocks_per_group = g->qblocks_per_group;
    const uint8_t *wp = g->w->codes + (tile * g->n_steps + qb0 * steps_per_qb) * 4 * 64;
    const uint16_t *scales = g->w->scales + tile * g->n_groups * 2 * LUTLM_TILE_ROWS;
    const int8_t *x = (const int8_t *)(act + g->act.tables);
    const float *dx = (const float *)(act + g->act.table_scale), *xsum = (const float *)(act + g->act.x_sum);
    const __m512i reverse = _mm512_set4_epi32(0x08090a0b, 0x0c0d0e0f, 0x00010203, 0x04050607);
    const __m512i gather_lo = _mm512_set1_epi64(0x0804020108040201LL); /* byte b: bit b mod 4 */
    const __m512i gather_hi = _mm512_set1_epi64((long long)0x8040201080402010ULL); /* bit 4 + b mod 4 */
    const __m512i nibbles = _mm512_set1_epi64((long long)0xF0F0F0F00F0F0F0FULL);
    const __m512 lane_factor = _mm512_castsi512_ps(_mm512_set1_epi64(0x3D8000003F800000LL)); /* 1, 1/16 */
    __m512 acc_out[NT];
    for (int n = 0; n < NT; n++) acc_out[n] = _mm512_loadu_ps(out + 16 * n);
    int64_t group = qb0 / qblocks_per_group, in_group = qb0 % qblocks_per_group;
    for (int64_t qb = qb0; qb < qb1; qb++) {
        __m512i lo[NT], hi[NT]; /* inputs 8j..8j+3 and 8j+4..8j+7: two chains per token */
        for (int n = 0; n < NT; n++) lo[n] = hi[n] = _mm512_setzero_si512();
        for (int64_t st = qb * steps_per_qb; st < (qb + 1) * steps_per_qb; st++, wp += 4 * 64) {
            for (int j = 0; j < 4; j++) {
                const __m512i planes = _mm512_shuffle_epi8(_mm512_loadu_si512(wp + 64 * j), reverse);
                const __m512i codes_lo = _mm512_and_si512(_mm512_gf2p8affine_epi64_epi8(gather_lo, planes, 0), nibbles);
                const __m512i codes_hi = _mm512_and_si512(_mm512_gf2p8affine_epi64_epi8(gather_hi, planes, 0), nibbles);
                const int64_t input = st * LUTLM_STEP + 8 * j;
                for (int n = 0; n < NT; n++) {
                    int32_t x_lo, x_hi;
                    memcpy(&x_lo, x + n * stride + input, 4);
                    memcpy(&x_hi, x + n * stride + input + 4, 4);
                    lo[n] = _mm512_dpbusd_epi32(lo[n], codes_lo, _mm512_set1_epi32(x_lo));
                    hi[n] = _mm512_dpbusd_epi32(hi[n], codes_hi, _mm512_set1_epi32(x_hi));
                }
            }
        }
        const uint16_t *sc = scales + group * 2 * LUTLM_TILE_ROWS;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
        const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + LUTLM_TILE_ROWS)));
        const __m512 s_lane = _mm512_mul_ps(s, lane_factor), sz = _mm512_mul_ps(s, z);
        for (int n = 0; n < NT; n++) {
            const float *dn = (const float *)((const uint8_t *)dx + n * stride);
            const float *xn = (const float *)((const uint8_t *)xsum + n * stride);
            const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(lo[n], hi[n]));
            acc_out[n] = _mm512_fmadd_ps(sum, _mm512_mul_ps(s_lane, _mm512_set1_ps(dn[qb])), acc_out[n]);
            acc_out[n] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(xn[qb]), acc_out[n]);
        }
        if (++in_group == qblocks_per_group) in_group = 0, group++;
    }
    for (int n = 0; n < NT; n++) _mm512_storeu_ps(out + 16 * n, acc_out[n]);
}

void tile_batch(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, size_t stride,
                int64_t tokens, float *out) {
    /* The next tile's slice of weights is elsewhere in memory (tiles are stored whole, one
     * after the other): ask for it now, so that it arrives while this tile computes. */
    const int64_t slice_bytes = (qb1 - qb0) * g->steps_per_qblock * 4 * 64;
    if (tile + 1 < g->tiles) {
        const uint8_t *next = g->w->codes + ((tile + 1) * g->n_steps + qb0 * g->steps_per_qblock) * 4 * 64;
        for (int64_t off = 0; off < slice_bytes; off += 64) _mm_prefetch((const char *)next + off, _MM_HINT_T1);
    }
    for (int64_t t = 0; t < tokens; t += kTokens) {
        const uint8_t *a = act + t * stride;
        float *o = out + t * LUTLM_TILE_ROWS;
        switch (tokens - t < kTokens ? tokens - t : kTokens) {
            case 1: tile_tokens<1>(g, tile, qb0, qb1, a, stride, o); break;
            case 2: tile_tokens<2>(g, tile, qb0, qb1, a, stride, o); break;
            case 3: tile_tokens<3>(g, tile, qb0, qb1, a, stride, o); break;
            case 4: tile_tokens<4>(g, tile, qb0, qb1, a, stride, o); break;
            case 5: tile_tokens<5>(g, tile, qb0, qb1, a, stride, o); break;
            case 6: tile_tokens<6>(g, tile, qb0, qb1, a, stride, o); break;
            case 7: tile_tokens<7>(g, tile, qb0, qb1, a, stride, o); break;
            default: tile_tokens<kTokens>(g, tile, qb0, qb1, a, stride, o); break;
        }
    }
}

}  // namespace

TileBatchFn lutlm_dot_gemm_avx512(void) { return tile_batch; }
