/* Codes -> the table-lookup kernels' weight layout (lutlm.h), in native code.
 *
 * cpu_layout.py writes the same bytes with tensor indexing from bit-planes; that is plain
 * and serves as the reference, but it allocates several copies of a matrix and takes
 * seconds per 7B-sized tensor. Loading a GGUF model converts every linear at load time,
 * so this file writes the layout straight from one code per byte, a tile of 16 rows per
 * task, on the kernels' thread pool.
 *
 * Input: codes uint8 [n][k] (values < 2^bits), fp16 scales and zeros [n][groups].
 * Output: codes in the bit-plane layout for k_padded inputs (zero codes in the padding,
 * which meets zero activations) and fp16 tile scales [tiles][groups][2][16] (padded rows
 * get scale 0 and zero 0).
 */
#include <string.h>

#include <algorithm>

#include "internal.h"

namespace {

struct PackJob {
    const uint8_t *codes;
    const uint16_t *scales, *zeros;
    int64_t n, k, k_padded, groups, tiles, n_tasks;
    int32_t bits;
    uint8_t *out_codes;
    uint16_t *out_scales;
};

/* pat[plane][chunk]: bit j is bit `plane` of the code of input 4 chunk + j of the step. */
void step_patterns(const uint8_t *row, int64_t first, int64_t k, int bits, uint8_t pat[4][8]) {
    uint8_t c[LUTLM_STEP];
    const int64_t avail = std::max<int64_t>(0, std::min<int64_t>(LUTLM_STEP, k - first));
    memcpy(c, row + first, avail);
    memset(c + avail, 0, LUTLM_STEP - avail);
    for (int ch = 0; ch < 8; ch++) {
        uint32_t v;
        memcpy(&v, c + 4 * ch, 4);
        /* Bit p of the chunk's four codes, one per byte, gathered into bits 24..27 by one
         * multiply: byte i's bit lands at 8 i + 24 - 7 i; the other products fall below bit
         * 24 at distinct positions, so nothing carries into the four bits taken. */
        for (int p = 0; p < bits; p++) pat[p][ch] = (uint8_t)(((((v >> p) & 0x01010101u) * 0x01020408u) >> 24) & 0xF);
    }
}

void pack_tiles(int task, void *arg) {
    const PackJob &j = *(const PackJob *)arg;
    const int64_t t0 = j.tiles * task / j.n_tasks, t1 = j.tiles * (task + 1) / j.n_tasks;
    const int64_t steps = j.k_padded / LUTLM_STEP, step_bytes = 64 * (int64_t)j.bits;
    static const uint8_t zero_row[LUTLM_STEP] = {0};
    for (int64_t t = t0; t < t1; t++) {
        for (int r = 0; r < LUTLM_TILE_ROWS; r++) {
            const int64_t row = t * LUTLM_TILE_ROWS + r;
            const bool real = row < j.n;
            for (int64_t s = 0; s < steps; s++) {
                uint8_t pat[4][8];
                if (real) step_patterns(j.codes + row * j.k, s * LUTLM_STEP, j.k, j.bits, pat);
                else step_patterns(zero_row, 0, 0, j.bits, pat);
                uint8_t *dst = j.out_codes + (t * steps + s) * step_bytes + 4 * r;
                int block = 0;
                if (j.bits == 4) /* byte p = plane p: low nibble chunk 2 jb, high 2 jb + 1 */
                    for (int jb = 0; jb < 4; jb++, block++)
                        for (int p = 0; p < 4; p++)
                            dst[64 * block + p] = (uint8_t)(pat[p][2 * jb] | (pat[p][2 * jb + 1] << 4));
                if (j.bits == 2 || j.bits == 3) /* plane p & 1: low chunk 4 jb + (p >> 1), high + 2 */
                    for (int jb = 0; jb < 2; jb++, block++)
                        for (int p = 0; p < 4; p++) {
                            const int plane = p & 1, ch = 4 * jb + (p >> 1);
                            dst[64 * block + p] = (uint8_t)(pat[plane][ch] | (pat[plane][ch + 2] << 4));
                        }
                if (j.bits == 1 || j.bits == 3) /* plane bits - 1: low chunk p, high chunk 4 + p */
                    for (int p = 0; p < 4; p++)
                        dst[64 * block + p] = (uint8_t)(pat[j.bits - 1][p] | (pat[j.bits - 1][4 + p] << 4));
            }
        }
        for (int64_t gi = 0; gi < j.groups; gi++) {
            uint16_t *dst = j.out_scales + (t * j.groups + gi) * 2 * LUTLM_TILE_ROWS;
            for (int r = 0; r < LUTLM_TILE_ROWS; r++) {
                const int64_t row = t * LUTLM_TILE_ROWS + r;
                dst[r] = row < j.n ? j.scales[row * j.groups + gi] : 0;
                dst[LUTLM_TILE_ROWS + r] = row < j.n ? j.zeros[row * j.groups + gi] : 0;
            }
        }
    }
}

}  // namespace

extern "C" LUTLM_API int64_t lutlm_lut_layout_bytes(int64_t n, int64_t k_padded, int32_t bits) {
    if (n <= 0 || k_padded <= 0 || k_padded % LUTLM_STEP || bits < 1 || bits > 4) return -1;
    return (n + LUTLM_TILE_ROWS - 1) / LUTLM_TILE_ROWS * (k_padded / LUTLM_STEP) * 64 * bits;
}

extern "C" LUTLM_API int lutlm_pack_lut(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros,
                                        int64_t n, int64_t k, int64_t k_padded, int32_t bits, int64_t groups,
                                        uint8_t *out_codes, uint16_t *out_scales) {
    if (!codes || !scales || !zeros || !out_codes || !out_scales || k <= 0 || k_padded < k || groups <= 0 ||
        lutlm_lut_layout_bytes(n, k_padded, bits) < 0)
        return -1;
    PackJob j = {codes, scales, zeros, n, k, k_padded, groups, (n + LUTLM_TILE_ROWS - 1) / LUTLM_TILE_ROWS, 0,
                 bits, out_codes, out_scales};
    j.n_tasks = std::min<int64_t>(j.tiles, 4 * (int64_t)lutlm_get_num_threads());
    lutlm_parallel_for((int)j.n_tasks, pack_tiles, &j);
    return 0;
}
