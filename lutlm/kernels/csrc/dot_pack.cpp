/* Codes -> the dot-product kernels' weight layout (kind LUTLM_DOT, lutlm.h), in native code.
 *
 * cpu_layout.py states the same bytes with tensor indexing (dot_codes), which serves as the
 * reference but allocates several copies of a matrix; a GGUF model's linears are laid out at
 * load time, so this file writes the layout straight from one code per byte: a tile of 16
 * rows per task on the kernels' thread pool, each row's 32 codes of a K-step moved as
 * words (four or eight codes at a time), so that a 7B model's weights take seconds.
 */
#include <string.h>

#include <algorithm>

#include "internal.h"

namespace {

struct DotShape {
    int64_t k_padded, code_bytes, scale_values, groups_in, groups_out;
    int32_t group, q_block;
};

/* The DOT layout's blocking of an n x k weight (see lutlm.h), or false. */
bool dot_shape(int64_t n, int64_t k, int32_t bits, int32_t group, DotShape *s) {
    if (n <= 0 || k <= 0 || bits < 1 || bits > LUTLM_DOT_MAX_BITS || group <= 0) return false;
    const int64_t tiles = (n + LUTLM_TILE_ROWS - 1) / LUTLM_TILE_ROWS;
    s->k_padded = (k + LUTLM_STEP - 1) / LUTLM_STEP * LUTLM_STEP;
    if (group == k) { /* one group per row, padded with it */
        s->group = (int32_t)s->k_padded;
        s->groups_in = 1;
    } else if (k % group) {
        return false;
    } else if (group == 16) {
        s->group = 16;
        s->groups_in = k / 16;
    } else if (group % LUTLM_STEP == 0) {
        s->group = group;
        s->groups_in = k / group;
    } else {
        return false;
    }
    s->groups_out = s->k_padded / s->group;
    s->q_block = LUTLM_STEP;
    for (int32_t q : {128, 96, 64})
        if (s->group % q == 0) {
            s->q_block = q;
            break;
        }
    s->code_bytes = tiles * (s->k_padded / LUTLM_STEP) * 64 * bits;
    s->scale_values = tiles * s->groups_out * 2 * LUTLM_TILE_ROWS;
    return true;
}

struct PackJob {
    const uint8_t *codes;
    const uint16_t *scales, *zeros;
    int64_t n, k, tiles, n_tasks;
    int32_t bits;
    DotShape shape;
    uint8_t *out_codes;
    uint16_t *out_scales;
    int bad_code[256]; /* per task: a code did not fit in `bits` */
};

inline uint32_t dword(const uint8_t *c) {
    uint32_t v;
    memcpy(&v, c, 4);
    return v;
}

/* A section of width W at bit `shift` of the codes c[32] of one row and K-step, into the
 * row's dword lane (dst + 64 block) of its blocks; returns the number of blocks written. */
int put_section(const uint8_t *c, int width, int shift, uint8_t *dst) {
    int blocks = 0;
    uint32_t v;
    if (width == 4) /* block j: low nibble input 8j + p, high nibble 8j + 4 + p */
        for (int j = 0; j < 4; j++, blocks++) {
            v = ((dword(c + 8 * j) >> shift) & 0x0F0F0F0Fu) | (((dword(c + 8 * j + 4) >> shift) & 0x0F0F0F0Fu) << 4);
            memcpy(dst + 64 * blocks, &v, 4);
        }
    if (width == 2 || width == 3) /* block j: bits 2m, 2m + 1 hold input 16j + 4m + p */
        for (int j = 0; j < 2; j++, blocks++) {
            v = 0;
            for (int m = 0; m < 4; m++) v |= ((dword(c + 16 * j + 4 * m) >> shift) & 0x03030303u) << 2 * m;
            memcpy(dst + 64 * blocks, &v, 4);
        }
    if (width == 1 || width == 3) { /* bit m holds input 4m + p */
        const int s = width == 3 ? shift + 2 : shift;
        v = 0;
        for (int m = 0; m < 8; m++) v |= ((dword(c + 4 * m) >> s) & 0x01010101u) << m;
        memcpy(dst + 64 * blocks, &v, 4);
        blocks++;
    }
    return blocks;
}

void pack_tiles(int task, void *arg) {
    PackJob &j = *(PackJob *)arg;
    const int64_t t0 = j.tiles * task / j.n_tasks, t1 = j.tiles * (task + 1) / j.n_tasks;
    const int64_t steps = j.shape.k_padded / LUTLM_STEP, step_bytes = 64 * (int64_t)j.bits;
    const uint8_t high = (uint8_t)(0xFF << j.bits); /* bits a code must not have (none at 8) */
    uint8_t seen = 0;
    for (int64_t t = t0; t < t1; t++) {
        const int rows = (int)std::min<int64_t>(LUTLM_TILE_ROWS, j.n - t * LUTLM_TILE_ROWS);
        seen |= lutlm_dot_pack_tile(j.codes + t * LUTLM_TILE_ROWS * j.k, j.k, rows, j.k, j.shape.k_padded, j.bits,
                                    j.out_codes + t * steps * step_bytes);
        for (int64_t gi = 0; j.out_scales && gi < j.shape.groups_out; gi++) {
            uint16_t *dst = j.out_scales + (t * j.shape.groups_out + gi) * 2 * LUTLM_TILE_ROWS;
            for (int r = 0; r < LUTLM_TILE_ROWS; r++) {
                const int64_t row = t * LUTLM_TILE_ROWS + r;
                const bool real = row < j.n && gi < j.shape.groups_in; /* padded rows and groups: 0 */
                dst[r] = real ? j.scales[row * j.shape.groups_in + gi] : 0;
                dst[LUTLM_TILE_ROWS + r] = real ? j.zeros[row * j.shape.groups_in + gi] : 0;
            }
        }
    }
    j.bad_code[task] = (seen & high) != 0;
}

}  // namespace

uint8_t lutlm_dot_pack_tile(const uint8_t *codes, int64_t stride, int rows, int64_t k, int64_t k_padded, int bits,
                            uint8_t *out) {
    const int64_t steps = k_padded / LUTLM_STEP, step_bytes = 64 * (int64_t)bits;
    uint8_t seen = 0;
    for (int64_t s = 0; s < steps; s++) {
        uint8_t *dst = out + s * step_bytes;
        const int64_t first = s * LUTLM_STEP, avail = std::min<int64_t>(LUTLM_STEP, k - first);
        for (int r = 0; r < LUTLM_TILE_ROWS; r++) {
            uint8_t c[LUTLM_STEP];
            if (r < rows && avail == LUTLM_STEP) {
                memcpy(c, codes + r * stride + first, LUTLM_STEP);
            } else { /* padding holds code 0 */
                memset(c, 0, LUTLM_STEP);
                if (r < rows) memcpy(c, codes + r * stride + first, avail);
            }
            uint64_t any = 0;
            for (int i = 0; i < LUTLM_STEP; i += 8) {
                uint64_t v;
                memcpy(&v, c + i, 8);
                any |= v;
            }
            for (int b = 0; b < 8; b++) seen |= (uint8_t)(any >> 8 * b);
            uint8_t *lane = dst + 4 * r;
            if (bits == 8) { /* whole bytes: block jb holds inputs 4 jb .. 4 jb + 3 */
                for (int jb = 0; jb < 8; jb++) memcpy(lane + 64 * jb, c + 4 * jb, 4);
                continue;
            }
            const int blocks = put_section(c, std::min(bits, 4), 0, lane);
            if (bits > 4) put_section(c, bits - 4, 4, lane + 64 * blocks);
        }
    }
    return seen;
}

extern "C" LUTLM_API int lutlm_dot_shape(int64_t n, int64_t k, int32_t bits, int32_t group, int64_t *k_padded,
                                         int32_t *group_padded, int32_t *q_block, int64_t *code_bytes,
                                         int64_t *scale_values) {
    DotShape s;
    if (!dot_shape(n, k, bits, group, &s)) return -1;
    if (k_padded) *k_padded = s.k_padded;
    if (group_padded) *group_padded = s.group;
    if (q_block) *q_block = s.q_block;
    if (code_bytes) *code_bytes = s.code_bytes;
    if (scale_values) *scale_values = s.scale_values;
    return 0;
}

extern "C" LUTLM_API int lutlm_pack_dot(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros, int64_t n,
                                        int64_t k, int32_t bits, int32_t group, uint8_t *out_codes,
                                        uint16_t *out_scales) {
    PackJob j;
    if (!codes || !out_codes || !dot_shape(n, k, bits, group, &j.shape)) return -1;
    if (out_scales ? !scales || !zeros : scales || zeros) return -1; /* no out_scales: the codes alone */
    j.codes = codes, j.scales = scales, j.zeros = zeros, j.n = n, j.k = k, j.bits = bits;
    j.out_codes = out_codes, j.out_scales = out_scales;
    j.tiles = (n + LUTLM_TILE_ROWS - 1) / LUTLM_TILE_ROWS;
    j.n_tasks = std::min<int64_t>({j.tiles, 4 * (int64_t)lutlm_get_num_threads(), 256});
    lutlm_parallel_for((int)j.n_tasks, pack_tiles, &j);
    for (int64_t t = 0; t < j.n_tasks; t++)
        if (j.bad_code[t]) return -2;
    return 0;
}
