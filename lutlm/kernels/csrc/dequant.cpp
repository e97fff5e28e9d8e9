/* The honest baseline: dequantize-then-multiply, as llama.cpp does it. Its geometry,
 * activation buffer and the exported entry point; the kernels are per instruction set
 * (dequant_avx512.cpp with vpdpbusd, dequant_avx2.cpp with vpmaddubsw + vpmaddwd), picked
 * by the instruction set in use (lutlm_set_isa). There is no portable version.
 *
 * Activations are quantized to int8 per q-block (like llama.cpp's Q8 blocks), and the block's
 * sum that the zero point multiplies is the sum of the *rounded* activations (as llama.cpp's
 * Q8_1 keeps it): the product is then exactly sum_k (q_k - z) xq_k dx, whose rounding errors
 * are weighted by q - z (centred) instead of q (all positive, adding up: 3x the output error
 * on SmolLM2's layers, +4% perplexity). Weight codes
 * are unpacked to unsigned bytes and multiplied with the int8 activations, broadcast four
 * at a time, 16 rows per tile with one row per 32-bit lane (no horizontal sums). Its GEMM
 * runs the GEMV kernel per token over cache-resident weight tiles, as ggml's vec_dot does.
 *
 * Layout (tile of 16 rows, K-step of 32 inputs, `bits` blocks of 64 bytes per step, byte
 * (r, p) of a block at 4 r + p; q = the code, inputs numbered within the step):
 *   4 bits: 4 blocks j:  low nibble q[8j + p], high nibble q[8j + 4 + p]
 *   2 bits (and the low 2 bits of 3-bit codes): 2 blocks j: bits 2m..2m+1 hold q[16j + 4m + p]
 *   1 bit (and bit 2 of 3-bit codes): 1 block: bit m holds q[4m + p]
 * Scales as in the table-lookup layout (lutlm.h).
 */
#include "internal.h"

int lutlm_int8_act_geometry(const lutlm_weight *w, Geometry *g) {
    if (lutlm_geometry(w, LUTLM_INT8, g) || w->kind != LUTLM_PLANES) return -1;
    ActLayout &a = g->act;
    a.tables = 0;
    a.has_pairs = 0;
    a.pair_tables = a.table_scale = lutlm_align64((size_t)w->k_padded);
    a.x_sum = a.table_scale + lutlm_align64(g->n_qblocks * sizeof(float));
    a.bytes = a.x_sum + lutlm_align64(g->n_qblocks * sizeof(float));
    g->mid = 0.0f; /* w = s (q - z):  sum_k w_k x_k = s (dx sum_k q_k xq_k - z dx sum_k xq_k) */
    g->factor = 1.0f;
    return 0;
}

namespace {

const DequantKernels *kernels(int isa) {
    switch (isa) {
        case LUTLM_AVX512: return lutlm_dequant_avx512_kernels();
        case LUTLM_AVX2: return lutlm_dequant_avx2_kernels();
        default: return nullptr;
    }
}

}  // namespace

extern "C" int lutlm_dequant_matmul(const lutlm_weight *w, const float *x, int64_t batch, float *y) {
    if (batch == 0) return 0;
    Geometry g;
    const DequantKernels *k = kernels(lutlm_get_isa());
    if (!k || lutlm_int8_act_geometry(w, &g) || !x || !y || batch < 0) return -1;
    const TileKernels run = {k->quantize_act, k->tile[w->bits], nullptr, nullptr};
    return lutlm_run_tiled(&g, x, batch, y, &run);
}
