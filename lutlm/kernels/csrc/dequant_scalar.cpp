/* The dot-product kernels in portable C++ (layout: lutlm.h, method: dequant.cpp): any CPU,
 * and the exact float-activation mode on every CPU.
 *
 * Written over the DOT layout one byte at a time (unpack_step), so that it doubles as the
 * plain statement of what the SIMD kernels compute. The int8 activations are rounded with
 * the same float operations as the SIMD quantizers (x * (127 / amax) rounded half to even,
 * dx = amax / 127, xsum = dx * the integer sum), so activations and integer sums are
 * bit-identical across instruction sets; only the float epilogue may round differently.
 */
#include <math.h>
#include <string.h>

#include "internal.h"

namespace {

/* The codes q[r][i] of the 16 rows and 32 inputs of one K-step from its `bits` blocks. */
void unpack_section(const uint8_t *wp, int width, int shift, uint8_t q[LUTLM_TILE_ROWS][LUTLM_STEP]) {
    for (int r = 0; r < LUTLM_TILE_ROWS; r++)
        for (int p = 0; p < 4; p++) {
            const uint8_t *b = wp + 4 * r + p;
            if (width == 4)
                for (int j = 0; j < 4; j++) {
                    q[r][8 * j + p] |= (uint8_t)((b[64 * j] & 15) << shift);
                    q[r][8 * j + 4 + p] |= (uint8_t)((b[64 * j] >> 4) << shift);
                }
            if (width == 2 || width == 3)
                for (int j = 0; j < 2; j++)
                    for (int m = 0; m < 4; m++) q[r][16 * j + 4 * m + p] |= (uint8_t)(((b[64 * j] >> 2 * m) & 3) << shift);
            if (width == 1 || width == 3) {
                const int block = width == 3 ? 2 : 0, s = width == 3 ? shift + 2 : shift;
                for (int m = 0; m < 8; m++) q[r][4 * m + p] |= (uint8_t)(((b[64 * block] >> m) & 1) << s);
            }
        }
}

void unpack_step(const uint8_t *wp, int bits, uint8_t q[LUTLM_TILE_ROWS][LUTLM_STEP]) {
    if (bits == 8) { /* whole bytes: block j, byte 4 r + p = input 4 j + p */
        for (int j = 0; j < 8; j++)
            for (int r = 0; r < LUTLM_TILE_ROWS; r++)
                for (int p = 0; p < 4; p++) q[r][4 * j + p] = wp[64 * j + 4 * r + p];
        return;
    }
    memset(q, 0, LUTLM_TILE_ROWS * LUTLM_STEP);
    unpack_section(wp, bits < 4 ? bits : 4, 0, q);
    if (bits > 4) unpack_section(wp + 4 * 64, bits - 4, 4, q);
}

/* Rows [16 t, 16 t + 16) over q-blocks [qb0, qb1): activations of type X (int8 or float), sums
 * of type Acc (int32: exact; float). Each q-block's sums are scaled at its end, one per group
 * of 16 or one for the q-block, with the s and z of the group it lies in. */
template <typename X, typename Acc>
void tile_generic(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    const lutlm_weight *w = g->w;
    const X *x = (const X *)(act + g->act.tables);
    const float *dx = (const float *)(act + g->act.table_scale);
    const float *xsum = (const float *)(act + g->act.x_sum);
    const uint16_t *sc = w->scales + tile * g->n_groups * 2 * LUTLM_TILE_ROWS;
    const int halves = lutlm_dot_g16(g) ? 2 : 1;
    uint8_t q[LUTLM_TILE_ROWS][LUTLM_STEP];
    for (int64_t qb = qb0; qb < qb1; qb++) {
        Acc acc[2][LUTLM_TILE_ROWS] = {};
        for (int64_t st = qb * g->steps_per_qblock; st < (qb + 1) * g->steps_per_qblock; st++) {
            unpack_step(w->codes + (tile * g->n_steps + st) * g->step_bytes, w->bits, q);
            const X *xs = x + st * LUTLM_STEP;
            for (int r = 0; r < LUTLM_TILE_ROWS; r++)
                for (int i = 0; i < LUTLM_STEP; i++) acc[i >= 16 && halves == 2][r] += (Acc)q[r][i] * (Acc)xs[i];
        }
        for (int h = 0; h < halves; h++) {
            const int64_t group = halves == 2 ? 2 * qb + h : qb / g->qblocks_per_group;
            const float xs = xsum[halves * qb + h];
            if (w->scale_kind != LUTLM_SCALES_F16) { /* out += d sc dx sum - dmin m xsum */
                int j;
                const uint8_t *sb = lutlm_super_scales(g, tile, group, &j);
                const uint16_t *d = (const uint16_t *)sb, *dmin = d + LUTLM_TILE_ROWS;
                for (int r = 0; r < LUTLM_TILE_ROWS; r++) {
                    int isc, im;
                    lutlm_super_sc_m(g, sb, j, r, &isc, &im);
                    const float s = lutlm_half_to_float(d[r]) * (float)isc;
                    const float sz = lutlm_half_to_float(dmin[r]) * (float)im;
                    out[r] += s * ((float)acc[h][r] * dx[qb]) - sz * xs;
                }
                continue;
            }
            const uint16_t *s = sc + group * 2 * LUTLM_TILE_ROWS, *z = s + LUTLM_TILE_ROWS;
            for (int r = 0; r < LUTLM_TILE_ROWS; r++) {
                const float u = (float)acc[h][r] * dx[qb] - lutlm_half_to_float(z[r]) * xs;
                out[r] += lutlm_half_to_float(s[r]) * u;
            }
        }
    }
}

void quantize_activations(const Geometry *g, const float *x, uint8_t *act) {
    const lutlm_weight *w = g->w;
    int8_t *xq = (int8_t *)(act + g->act.tables);
    float *dx = (float *)(act + g->act.table_scale), *xsum = (float *)(act + g->act.x_sum);
    const int64_t sum_inputs = lutlm_dot_g16(g) ? 16 : w->q_block;
    for (int64_t qb = 0; qb < g->n_qblocks; qb++) {
        const float *xb = x + qb * w->q_block;
        float amax = 0.0f;
        for (int64_t i = 0; i < w->q_block; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        dx[qb] = amax / 127.0f;
        for (int64_t i0 = 0; i0 < w->q_block; i0 += sum_inputs) {
            int32_t sum = 0;
            for (int64_t i = i0; i < i0 + sum_inputs; i++) {
                const int v = (int)nearbyintf(xb[i] * inv); /* half to even, as cvtps2dq */
                xq[qb * w->q_block + i] = (int8_t)v;
                sum += v;
            }
            xsum[(qb * w->q_block + i0) / sum_inputs] = dx[qb] * (float)sum; /* of the rounded activations */
        }
    }
}

void tile_int8(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    tile_generic<int8_t, int32_t>(g, tile, qb0, qb1, act, out);
}

#define LUTLM_EIGHT_TIMES(f) {nullptr, f, f, f, f, f, f, f, f}
const DequantKernels kScalar = {quantize_activations, LUTLM_EIGHT_TIMES(tile_int8), LUTLM_EIGHT_TIMES(tile_int8), {}, {}};

}  // namespace

const DequantKernels *lutlm_dequant_scalar_kernels(void) { return &kScalar; }

/* Float mode: the activations themselves, dx = 1, xsum their plain sums. */
void lutlm_dot_build_act_float(const Geometry *g, const float *x, uint8_t *act) {
    const lutlm_weight *w = g->w;
    float *xf = (float *)(act + g->act.tables);
    float *dx = (float *)(act + g->act.table_scale), *xsum = (float *)(act + g->act.x_sum);
    const int64_t sum_inputs = lutlm_dot_g16(g) ? 16 : w->q_block;
    memcpy(xf, x, w->k_padded * sizeof(float));
    for (int64_t qb = 0; qb < g->n_qblocks; qb++) dx[qb] = 1.0f;
    for (int64_t b = 0; b < w->k_padded / sum_inputs; b++) {
        float s = 0.0f;
        for (int64_t i = 0; i < sum_inputs; i++) s += x[b * sum_inputs + i];
        xsum[b] = s;
    }
}

void lutlm_dot_tile_float(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    tile_generic<float, float>(g, tile, qb0, qb1, act, out);
}
