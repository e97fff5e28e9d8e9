/* The dot-product kernels ("dot", kind LUTLM_DOT, layout in lutlm.h): codes unpacked to bytes
 * and multiplied with int8 activations, as llama.cpp does. Their geometry, activation buffer
 * and dispatch; the kernels are per instruction set (dequant_avx512.cpp with vpdpbusd,
 * dequant_avx2.cpp with vpmaddubsw + vpmaddwd, dequant_scalar.cpp portable, which also holds
 * the exact float-activation mode). They run 1..8 bits and groups of 16, which the
 * table-lookup kernels do not, and are the dequantize-then-multiply baseline of the
 * benchmarks (lutlm_dequant_matmul).
 *
 * Activations are quantized to int8 per q-block (like llama.cpp's Q8 blocks), and the block's
 * sum that the zero point multiplies is the sum of the *rounded* activations (as llama.cpp's
 * Q8_1 keeps it): the product is then exactly sum_k (q_k - z) xq_k dx, whose rounding errors
 * are weighted by q - z (centred) instead of q (all positive, adding up: docs/kernels.md).
 * Weight codes are unpacked to unsigned bytes and
 * multiplied with the int8 activations, broadcast four at a time, 16 rows per tile with one
 * row per 32-bit lane (no horizontal sums). Groups of 16 keep one activation scale per 32
 * inputs; their integer sums and activation sums are kept per 16 inputs, so that each group
 * meets its own s and z (the layout keeps the two halves of a K-step apart).
 *
 * GEMM: where the instruction set has one (AVX-512), a kernel that walks the tokens itself
 * unpacks each K-step's codes to whole bytes once for up to 8 tokens (dequant_avx512.cpp).
 * The baseline entry point (lutlm_dequant_matmul) keeps llama.cpp's vec_dot way instead: the
 * GEMV kernel per token over cache-resident weight tiles.
 */
#include "internal.h"

namespace {

const DequantKernels *kernels(int isa) {
    switch (isa) {
        case LUTLM_AVX512: return lutlm_dequant_avx512_kernels();
        case LUTLM_AVX2: return lutlm_dequant_avx2_kernels();
        default: return lutlm_dequant_scalar_kernels();
    }
}

TileFn tile_kernel(const DequantKernels *k, const Geometry *g) {
    return (lutlm_dot_g16(g) ? k->tile_g16 : k->tile)[g->w->bits];
}

TileBatchFn batch_kernel(const DequantKernels *k, const Geometry *g) {
    return (lutlm_dot_g16(g) ? k->batch_g16 : k->batch)[g->w->bits];
}

}  // namespace

int lutlm_dot_geometry(const lutlm_weight *w, int mode, Geometry *g) {
    if (!w || !w->codes || !w->scales || w->n <= 0 || w->k <= 0 || w->k_padded < w->k || w->k_padded % LUTLM_STEP)
        return -1;
    if (mode != LUTLM_INT8 && mode != LUTLM_FLOAT && mode != LUTLM_FAST_AGG) return -1;
    const int max_bits = w->kind == LUTLM_DOT ? LUTLM_DOT_MAX_BITS : w->kind == LUTLM_PLANES ? 4 : 0;
    if (w->bits < 1 || w->bits > max_bits) return -1;
    const bool g16 = w->kind == LUTLM_DOT && w->group_size == 16;
    if (g16 ? w->q_block != LUTLM_STEP
            : w->q_block <= 0 || w->q_block % LUTLM_STEP || w->q_block > LUTLM_MAX_QBLOCK || w->group_size <= 0 ||
                  w->group_size % w->q_block || w->k_padded % w->group_size)
        return -1;
    if (w->scale_kind != LUTLM_SCALES_F16) {
        /* super-block scales: a DOT weight in groups of 16 or 32 (one or two per q-block) */
        if (w->kind != LUTLM_DOT || w->scale_kind < LUTLM_SCALES_SUPER || w->scale_kind > LUTLM_SCALES_SUPER_NIBBLE ||
            (w->group_size != 16 && w->group_size != 32) || w->q_block != LUTLM_STEP || w->super_groups <= 0 ||
            (w->super_groups & (w->super_groups - 1)) || w->k_padded % ((int64_t)w->group_size * w->super_groups))
            return -1;
        g->super_shift = __builtin_ctz((unsigned)w->super_groups);
        g->n_super = w->k_padded / ((int64_t)w->group_size * w->super_groups);
        g->super_bytes = 64 + 16 * (int64_t)w->super_groups * (w->scale_kind == LUTLM_SCALES_SUPER ? 2 : 1);
    } else {
        g->n_super = g->super_bytes = 0;
        g->super_shift = 0;
    }
    g->w = w;
    g->mode = mode;
    g->tiles = (w->n + LUTLM_TILE_ROWS - 1) / LUTLM_TILE_ROWS;
    g->step_inputs = LUTLM_STEP;
    g->step_bytes = 64 * (int64_t)w->bits;
    g->chunk_inputs = 4;
    g->n_chunks = w->k_padded / 4;
    g->n_steps = w->k_padded / LUTLM_STEP;
    g->steps_per_qblock = w->q_block / LUTLM_STEP;
    g->n_qblocks = w->k_padded / w->q_block;
    g->n_groups = w->k_padded / w->group_size;
    g->qblocks_per_group = g16 ? 1 : w->group_size / w->q_block; /* groups of 16: two per q-block */
    g->mid = 0.0f; /* w = s (q - z):  sum_k w_k x_k = s (dx sum_k q_k xq_k - z dx sum_k xq_k) */
    g->factor = 1.0f;

    ActLayout &a = g->act;
    const size_t entry = mode == LUTLM_FLOAT ? sizeof(float) : 1;
    const int64_t n_sums = g16 ? w->k_padded / 16 : g->n_qblocks;
    a.tables = 0;
    a.has_pairs = 0;
    a.pair_tables = a.table_scale = lutlm_align64((size_t)w->k_padded * entry);
    a.x_sum = a.table_scale + lutlm_align64(g->n_qblocks * sizeof(float));
    a.bytes = a.x_sum + lutlm_align64(n_sums * sizeof(float));
    return 0;
}

int lutlm_int8_act_geometry(const lutlm_weight *w, Geometry *g) {
    return w && w->kind == LUTLM_PLANES ? lutlm_dot_geometry(w, LUTLM_INT8, g) : -1;
}

int lutlm_dot_matmul(const lutlm_weight *w, const float *x, int64_t batch, float *y, int mode) {
    if (batch == 0) return 0;
    Geometry g;
    if (!w || w->kind != LUTLM_DOT || lutlm_dot_geometry(w, mode, &g) || !x || !y || batch < 0) return -1;
    const DequantKernels *k = kernels(lutlm_get_isa());
    const TileKernels run = mode == LUTLM_FLOAT
                                ? TileKernels{lutlm_dot_build_act_float, lutlm_dot_tile_float, nullptr, nullptr}
                                : TileKernels{k->quantize_act, tile_kernel(k, &g), nullptr, batch_kernel(k, &g)};
    return lutlm_run_tiled(&g, x, batch, y, &run);
}

extern "C" int lutlm_dequant_matmul(const lutlm_weight *w, const float *x, int64_t batch, float *y) {
    if (batch == 0) return 0;
    Geometry g;
    const int isa = lutlm_get_isa();
    if (isa == LUTLM_SCALAR || lutlm_dot_geometry(w, LUTLM_INT8, &g) || !x || !y || batch < 0) return -1;
    const DequantKernels *k = kernels(isa);
    const TileKernels run = {k->quantize_act, tile_kernel(k, &g), nullptr, nullptr};
    return lutlm_run_tiled(&g, x, batch, y, &run);
}
