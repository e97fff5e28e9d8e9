/* The exported entry points: instruction-set choice and the table-lookup matmul (which hands
 * LUTLM_DOT weights to the dot-product kernels, dequant.cpp). */
#include <stddef.h>

#include "internal.h"

namespace {

int detect_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni"))
        return LUTLM_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return LUTLM_AVX2;
    return LUTLM_SCALAR;
}

const int kBestIsa = detect_isa();
/* The dot-product GEMM needs the AVX-512 kernels' set and GFNI. */
const bool kHasDotGemm = kBestIsa == LUTLM_AVX512 && (__builtin_cpu_init(), __builtin_cpu_supports("gfni"));
int current_isa = kBestIsa;
/* 4-bit products of at least this many tokens use the dot-product GEMM (dot_gemm_avx512.cpp)
 * where the CPU has it: from 4 tokens on the dot product wins (docs/kernels.md). Settable
 * (tests move it). */
int64_t dot_gemm_min_tokens = 4;

const IsaKernels *kernels(int isa) {
    switch (isa) {
        case LUTLM_AVX512: return lutlm_avx512_kernels();
        case LUTLM_AVX2: return lutlm_avx2_kernels();
        default: return lutlm_scalar_kernels();
    }
}

}  // namespace

int lutlm_geometry(const lutlm_weight *w, int mode, Geometry *g) {
    if (!w || !w->codes || !w->scales || w->n <= 0 || w->k <= 0 || w->k_padded < w->k) return -1;
    if (w->scale_kind != LUTLM_SCALES_F16) return -1; /* super-block scales: DOT weights only */
    if (w->q_block <= 0 || w->group_size <= 0 || w->group_size % w->q_block || w->k_padded % w->group_size) return -1;
    const bool ternary = w->kind == LUTLM_TERNARY;
    if (ternary ? w->bits != 2 || w->q_block != LUTLM_TERNARY_STEP
                : w->kind != LUTLM_PLANES || w->bits < 1 || w->bits > 4 || w->q_block % LUTLM_STEP ||
                      w->q_block > LUTLM_MAX_QBLOCK)
        return -1;
    g->w = w;
    g->mode = mode;
    g->tiles = (w->n + LUTLM_TILE_ROWS - 1) / LUTLM_TILE_ROWS;
    g->step_inputs = ternary ? LUTLM_TERNARY_STEP : LUTLM_STEP;
    g->step_bytes = ternary ? 4 * 64 + 4 * 16 : 64 * (int64_t)w->bits;
    g->chunk_inputs = ternary ? 3 : 4;
    g->n_chunks = w->k_padded / g->chunk_inputs;
    g->n_steps = w->k_padded / g->step_inputs;
    g->steps_per_qblock = w->q_block / g->step_inputs;
    g->n_qblocks = w->k_padded / w->q_block;
    g->n_groups = w->k_padded / w->group_size;
    g->qblocks_per_group = w->group_size / w->q_block;
    g->mid = ternary ? 1.0f : 0.5f * (float)((1 << w->bits) - 1);
    g->factor = ternary ? 1.0f : 0.5f;

    ActLayout &a = g->act;
    const size_t entry = mode == LUTLM_FLOAT ? sizeof(float) : 1;
    a.has_pairs = !ternary && (w->bits == 2 || w->bits == 3) && mode != LUTLM_FLOAT;
    a.tables = 0;
    a.pair_tables = a.tables + lutlm_align64((size_t)g->n_chunks * 16 * entry);
    a.table_scale = a.pair_tables + (a.has_pairs ? lutlm_align64((size_t)g->n_chunks / 2 * 64) : 0);
    a.x_sum = a.table_scale + lutlm_align64((size_t)g->n_qblocks * sizeof(float));
    a.bytes = a.x_sum + lutlm_align64((size_t)g->n_qblocks * sizeof(float));
    return 0;
}

extern "C" {

int64_t lutlm_weight_layout(int64_t *offsets) {
    const int64_t fields[] = {
        offsetof(lutlm_weight, codes),      offsetof(lutlm_weight, scales),     offsetof(lutlm_weight, n),
        offsetof(lutlm_weight, k),          offsetof(lutlm_weight, k_padded),   offsetof(lutlm_weight, bits),
        offsetof(lutlm_weight, group_size), offsetof(lutlm_weight, q_block),    offsetof(lutlm_weight, kind),
        offsetof(lutlm_weight, scale_kind), offsetof(lutlm_weight, super_groups)};
    for (int i = 0; i < 11; i++) offsets[i] = fields[i];
    return (int64_t)sizeof(lutlm_weight);
}

int lutlm_best_isa(void) { return kBestIsa; }

int lutlm_get_isa(void) { return current_isa; }

int lutlm_set_isa(int isa) {
    current_isa = isa < LUTLM_SCALAR ? LUTLM_SCALAR : isa > kBestIsa ? kBestIsa : isa;
    return current_isa;
}

void lutlm_set_dot_gemm_min_tokens(int64_t tokens) { dot_gemm_min_tokens = tokens < 2 ? 2 : tokens; }

int lutlm_dot_gemm_applies(const lutlm_weight *w, int64_t batch) {
    return kHasDotGemm && current_isa == LUTLM_AVX512 && w && w->kind == LUTLM_PLANES && w->bits == 4 &&
           batch >= dot_gemm_min_tokens;
}

int lutlm_lut_matmul(const lutlm_weight *w, const float *x, int64_t batch, float *y, int mode) {
    if (batch == 0) return 0;
    if (w && w->kind == LUTLM_DOT) return lutlm_dot_matmul(w, x, batch, y, mode); /* dequant.cpp */
    const bool dot = mode == LUTLM_INT8 && lutlm_dot_gemm_applies(w, batch);
    Geometry g;
    if ((dot ? lutlm_int8_act_geometry(w, &g) : lutlm_geometry(w, mode, &g)) || !x || !y || batch < 0) return -1;
    const IsaKernels *k = kernels(current_isa);
    TileKernels run;
    if (mode == LUTLM_FLOAT)
        run = {lutlm_build_act_float, lutlm_tile_float, nullptr, nullptr};
    else if (dot)
        run = {lutlm_dequant_avx512_kernels()->quantize_act, nullptr, nullptr, lutlm_dot_gemm_avx512()};
    else if (mode == LUTLM_INT8)
        run = {k->build_act, k->tile_int8, k->tile_int8_tokens, nullptr};
    else if (mode == LUTLM_FAST_AGG && k->tile_fast_agg)
        run = {k->build_act, k->tile_fast_agg, nullptr, nullptr};
    else
        return -1;
    return lutlm_run_tiled(&g, x, batch, y, &run);
}

}  // extern "C"
