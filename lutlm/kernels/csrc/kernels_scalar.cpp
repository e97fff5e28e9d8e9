/* Portable kernels: any CPU, and the exact float-table mode on every CPU.
 *
 * Written over the kernel layout of lutlm.h one byte at a time, so that it doubles as
 * the plain statement of what the SIMD kernels compute. Tables are built with the same
 * operation order as the SIMD builders, so int8 tables (and hence the int32 sums) are
 * bit-identical across instruction sets; only the float epilogue may round differently.
 */
#include <math.h>
#include <string.h>

#include "internal.h"

namespace {

/* The 16 (or 14) table entries of one chunk, in float, in the order the SIMD builders use:
 * ((s0 x0 + s1 x1) + s2 x2) + s3 x3 with s_j = +1 where bit j of the pattern is set. */
void chunk_table(const lutlm_weight *w, const float *x, float *t) {
    if (w->kind == LUTLM_TERNARY) {
        for (int m = 0; m < 16; m++) {
            const signed char *d = lutlm_ternary_digits[m];
            t[m] = (float)d[0] * x[0] + (float)d[1] * x[1];
            t[m] += (float)d[2] * x[2];
        }
        return;
    }
    for (int idx = 0; idx < 16; idx++) {
        float v = (idx & 1 ? x[0] : -x[0]);
        v += (idx & 2 ? x[1] : -x[1]);
        v += (idx & 4 ? x[2] : -x[2]);
        v += (idx & 8 ? x[3] : -x[3]);
        t[idx] = v;
    }
}

/* Largest |entry| of a chunk's table: the sum of |x_j| in the table's order. */
float chunk_abs_sum(const lutlm_weight *w, const float *x) {
    float a = fabsf(x[0]) + fabsf(x[1]);
    a += fabsf(x[2]);
    if (w->kind != LUTLM_TERNARY) a += fabsf(x[3]);
    return a;
}

void build_act_int8(const Geometry *g, const float *x, uint8_t *act) {
    const lutlm_weight *w = g->w;
    const ActLayout &L = g->act;
    const int chunk = (int)g->chunk_inputs;
    const int64_t per_block = w->q_block / chunk;
    int8_t *tables = (int8_t *)(act + L.tables);
    float *scale = (float *)(act + L.table_scale);
    float *xsum = (float *)(act + L.x_sum);
    for (int64_t qb = 0; qb < g->n_qblocks; qb++) {
        const float *xb = x + qb * w->q_block;
        float amax = 0.0f, s = 0.0f;
        for (int64_t c = 0; c < per_block; c++) amax = fmaxf(amax, chunk_abs_sum(w, xb + c * chunk));
        for (int64_t i = 0; i < w->q_block; i++) s += xb[i];
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        scale[qb] = amax / 127.0f;
        xsum[qb] = s;
        for (int64_t c = 0; c < per_block; c++) {
            float t[16];
            chunk_table(w, xb + c * chunk, t);
            int8_t *dst = tables + (qb * per_block + c) * 16;
            for (int e = 0; e < 16; e++) {
                int v = (int)lrintf(t[e] * inv);
                /* Fast aggregation averages lookups as unsigned bytes: store entry + 128. */
                dst[e] = (int8_t)(g->mode == LUTLM_FAST_AGG ? (uint8_t)(v + 128) : v);
            }
        }
    }
    if (L.has_pairs) {
        int8_t *pairs = (int8_t *)(act + L.pair_tables);
        for (int64_t c = 0; c < g->n_chunks; c += 2) {
            int8_t *dst = pairs + c / 2 * 64;
            memcpy(dst, tables + c * 16, 16);
            memcpy(dst + 16, tables + c * 16, 16);
            memcpy(dst + 32, tables + (c + 1) * 16, 16);
            memcpy(dst + 48, tables + (c + 1) * 16, 16);
        }
    }
}

/* Which chunk of its K-step, and which bit-plane, a nibble of block `block` at byte
 * position p (0..3 within a row's four bytes) belongs to; `hi` selects the high nibble. */
void nibble_source(const lutlm_weight *w, int block, int p, int hi, int *chunk, int *plane) {
    if (w->kind == LUTLM_TERNARY) {
        *chunk = 8 * block + 4 * hi + p;
        *plane = 0;
    } else if (w->bits == 4) {
        *chunk = 2 * block + hi;
        *plane = p;
    } else if (block < 2 && w->bits >= 2) { /* 2-plane section */
        *chunk = 4 * block + 2 * hi + (p >> 1);
        *plane = p & 1;
    } else { /* 1-plane section: plane 0 (1 bit) or plane 2 (3 bits) */
        *chunk = 4 * hi + p;
        *plane = w->bits == 3 ? 2 : 0;
    }
}

/* One tile over q-blocks [qb0, qb1), tables of entry type Entry (int8 or float). */
template <typename Entry, typename Acc>
void tile_generic(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    const lutlm_weight *w = g->w;
    const Entry *tables = (const Entry *)(act + g->act.tables);
    const float *scale = (const float *)(act + g->act.table_scale);
    const float *xsum = (const float *)(act + g->act.x_sum);
    const int blocks = w->kind == LUTLM_TERNARY ? 4 : w->bits;
    const int64_t chunks_per_step = g->step_inputs / g->chunk_inputs;
    const uint16_t *sc = w->scales + tile * g->n_groups * 2 * LUTLM_TILE_ROWS;

    /* Where each nibble of a block reads: table offset and plane weight, by (block, p, hi). */
    int offset[4][4][2], weight[4][4][2];
    for (int b = 0; b < blocks; b++)
        for (int p = 0; p < 4; p++)
            for (int hi = 0; hi < 2; hi++) {
                int chunk, plane;
                nibble_source(w, b, p, hi, &chunk, &plane);
                offset[b][p][hi] = chunk * 16;
                weight[b][p][hi] = 1 << plane;
            }

    for (int64_t qb = qb0; qb < qb1; qb++) {
        Acc acc[LUTLM_TILE_ROWS] = {};
        for (int64_t st = qb * g->steps_per_qblock; st < (qb + 1) * g->steps_per_qblock; st++) {
            const uint8_t *wp = w->codes + (tile * g->n_steps + st) * g->step_bytes;
            const Entry *t0 = tables + st * chunks_per_step * 16;
            for (int b = 0; b < blocks; b++) {
                for (int r = 0; r < LUTLM_TILE_ROWS; r++) {
                    for (int p = 0; p < 4; p++) {
                        const uint8_t byte = wp[b * 64 + 4 * r + p];
                        for (int hi = 0; hi < 2; hi++) {
                            Acc v = (Acc)t0[offset[b][p][hi] + (hi ? byte >> 4 : byte & 15)];
                            if (w->kind == LUTLM_TERNARY) {
                                const uint8_t *signs = wp + 4 * 64 + b * 16 + hi * 8;
                                const int bit = 4 * r + p;
                                if (signs[bit >> 3] >> (bit & 7) & 1) v = -v;
                            }
                            acc[r] += v * (Acc)weight[b][p][hi];
                        }
                    }
                }
            }
        }
        const uint16_t *s = sc + qb / g->qblocks_per_group * 2 * LUTLM_TILE_ROWS, *z = s + LUTLM_TILE_ROWS;
        for (int r = 0; r < LUTLM_TILE_ROWS; r++) {
            const float zs = (g->mid - lutlm_half_to_float(z[r])) * xsum[qb];
            const float u = (float)acc[r] * (scale[qb] * g->factor) + zs;
            out[r] += lutlm_half_to_float(s[r]) * u;
        }
    }
}

void tile_int8(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    tile_generic<int8_t, int32_t>(g, tile, qb0, qb1, act, out);
}

const IsaKernels kScalar = {build_act_int8, tile_int8, nullptr, nullptr};

}  // namespace

float lutlm_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant) { /* subnormal: normalize */
        exp = 113;
        while (!(mant & 0x400)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

const IsaKernels *lutlm_scalar_kernels(void) { return &kScalar; }

/* Exact mode: float tables, table scale 1, sums in float. */
void lutlm_build_act_float(const Geometry *g, const float *x, uint8_t *act) {
    const lutlm_weight *w = g->w;
    float *tables = (float *)(act + g->act.tables);
    float *scale = (float *)(act + g->act.table_scale);
    float *xsum = (float *)(act + g->act.x_sum);
    for (int64_t c = 0; c < g->n_chunks; c++) chunk_table(w, x + c * g->chunk_inputs, tables + c * 16);
    for (int64_t qb = 0; qb < g->n_qblocks; qb++) {
        float s = 0.0f;
        for (int64_t i = 0; i < w->q_block; i++) s += x[qb * w->q_block + i];
        scale[qb] = 1.0f;
        xsum[qb] = s;
    }
}

void lutlm_tile_float(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out) {
    tile_generic<float, float>(g, tile, qb0, qb1, act, out);
}
