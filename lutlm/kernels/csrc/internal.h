/* Declarations shared by the driver and the per-ISA kernel files.
 *
 * Each ISA file (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp) is compiled for
 * its own instruction set and provides an `IsaKernels` table; api.cpp picks one at run
 * time and driver.cpp runs it over tiles, tokens and threads. The dot-product kernels' ISA
 * files (dequant_scalar.cpp, dequant_avx2.cpp, dequant_avx512.cpp) provide a
 * `DequantKernels` table in the same way, picked by dequant.cpp. ISA files use only this
 * header, their ISA's epilogue header (whose contents are file-local too), <immintrin.h>
 * and C headers, and keep everything but their table getter file-local, so that no inline
 * function compiled for AVX-512 can be chosen by the linker for code that runs on a machine
 * without it.
 */
#ifndef LUTLM_INTERNAL_H
#define LUTLM_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "lutlm.h"

#define LUTLM_TILE_ROWS 16
#define LUTLM_STEP 32          /* inputs per K-step, bit-plane layout */
#define LUTLM_TERNARY_STEP 96  /* inputs per K-step, ternary layout (32 chunks of 3) */
/* Table-quantization blocks are at most 128 inputs (bit-planes) or exactly 96 (ternary). */
#define LUTLM_MAX_QBLOCK 128
#define LUTLM_MAX_QBLOCK_CHUNKS 32

/* Per-token activation buffer, built once per activation vector and read by every tile.
 * Offsets are in bytes from the token's buffer start; all 64-byte aligned. The
 * dequantize baseline stores its int8 activations at `tables` and their scales at
 * `table_scale`. */
typedef struct {
    size_t tables;       /* int8 [n_chunks][16], or float [n_chunks][16] in float mode */
    size_t pair_tables;  /* int8 [n_chunks / 2][64]: T_c, T_c, T_c+1, T_c+1 (2-plane section) */
    size_t table_scale;  /* float [n_qblocks]: value of one table unit */
    size_t x_sum;        /* float [n_qblocks]: sum of the block's activations */
    size_t bytes;        /* whole buffer, a multiple of 64 */
    int has_pairs;
} ActLayout;

/* Everything about one product that does not change from tile to tile, computed once
 * per call (the kernels run per tile and per q-block, where a division costs as much as
 * a block of lookups). */
typedef struct {
    const lutlm_weight *w;
    int mode;
    ActLayout act;
    int64_t tiles, n_steps, steps_per_qblock, n_qblocks, n_groups, qblocks_per_group;
    int64_t step_inputs, step_bytes, chunk_inputs, n_chunks;
    /* sum_k w_k x_k = s * (sum_of_lookups * unit * factor + (mid - z) * xsum) per q-block:
     * factor 1/2 for bit-planes (the 1/2 sum_i 2^i of lutlm.h), 1 for ternary; mid is
     * (2^b - 1) / 2 for bit-planes, 1 for ternary (whose stored zero is 1: no zero term). */
    float mid, factor;
    /* Super-block scales (lutlm.h): super-blocks per row and bytes per tile and super-block. */
    int64_t n_super, super_bytes;
    int super_shift; /* log2 of super_groups (a power of two): no division per group */
} Geometry;

/* Balanced-ternary digits (t0, t1, t2) of m = 9 t0 + 3 t1 + t2 for m = 0..13: the positive
 * half of the 27 patterns of a 3-weight ternary chunk (the other half is their negation).
 * Rows 14 and 15 are zero, so that those table entries are zero. */
static const signed char lutlm_ternary_digits[16][3] = {
    {0, 0, 0}, {0, 0, 1},  {0, 1, -1}, {0, 1, 0}, {0, 1, 1}, {1, -1, -1}, {1, -1, 0}, {1, -1, 1},
    {1, 0, -1}, {1, 0, 0}, {1, 0, 1},  {1, 1, -1}, {1, 1, 0}, {1, 1, 1},  {0, 0, 0},   {0, 0, 0}};

static inline size_t lutlm_align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Software prefetch of the weight stream: the hardware prefetchers alone leave the kernels
 * waiting on L3 or DRAM, so each q-block asks for the bytes
 * LUTLM_PREFETCH_AHEAD ahead. A kernel call covers a range of q-blocks of one tile, and the
 * driver goes on with the next tile's same range: past the end of the range, the distance
 * continues there (`skip` bytes further; 0 when the range is the whole row). */
#define LUTLM_PREFETCH_AHEAD 2048
typedef struct {
    const uint8_t *end;
    int64_t skip;
} PrefetchRange;

static inline PrefetchRange lutlm_prefetch_range(const Geometry *g, const uint8_t *first, int64_t qblocks) {
    const int64_t bytes = qblocks * g->steps_per_qblock * g->step_bytes;
    const PrefetchRange r = {first + bytes, g->n_steps * g->step_bytes - bytes};
    return r;
}

static inline void lutlm_prefetch_qblock(const uint8_t *wp, int64_t qblock_bytes, PrefetchRange r) {
    const uint8_t *p = wp + LUTLM_PREFETCH_AHEAD;
    if (p >= r.end) p += r.skip;
    for (int64_t off = 0; off < qblock_bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

float lutlm_half_to_float(uint16_t h);

/* The geometry of a table-lookup product (api.cpp); 0 on success, -1 for a bad weight. */
int lutlm_geometry(const lutlm_weight *w, int mode, Geometry *g);

/* Build one token's activation buffer from x[0 .. k_padded) (zero-padded by the caller). */
typedef void (*BuildActFn)(const Geometry *g, const float *x, uint8_t *act);

/* Accumulate rows [16 t, 16 t + 16) of one token over q-blocks [qb0, qb1) into out[16]. */
typedef void (*TileFn)(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out);

/* The same for LUTLM_GEMM_TOKENS tokens at once, whose activation buffers are `stride`
 * bytes apart, into out[LUTLM_GEMM_TOKENS][16]: each weight block is read and turned into
 * indices once for all of them. */
#define LUTLM_GEMM_TOKENS 4
typedef void (*TileTokensFn)(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act,
                             size_t stride, float *out);

/* One tile over q-blocks [qb0, qb1) for `tokens` tokens (buffers `stride` bytes apart), into
 * out[tokens][16]: the kernel walks the tokens itself, so that the tile's weights for the
 * q-block range stay in L1 while all of them pass (the 4-bit dot-product GEMM). */
typedef void (*TileBatchFn)(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act,
                            size_t stride, int64_t tokens, float *out);

typedef struct {
    BuildActFn build_act;   /* int8 tables (modes INT8 and FAST_AGG) */
    TileFn tile_int8;
    TileFn tile_fast_agg;   /* NULL where that ISA has none */
    TileTokensFn tile_int8_tokens; /* NULL where that ISA has none */
} IsaKernels;

const IsaKernels *lutlm_scalar_kernels(void);
const IsaKernels *lutlm_avx2_kernels(void);
const IsaKernels *lutlm_avx512_kernels(void);

/* The dot-product family (the DOT layout of lutlm.h; dequant.cpp: its geometry, activation
 * buffer and dispatch; also the dequantize-then-multiply baseline): int8 activations per
 * q-block, and a tile kernel per code width and group kind. */
#define LUTLM_DOT_MAX_BITS 8
typedef struct {
    BuildActFn quantize_act;
    TileFn tile[LUTLM_DOT_MAX_BITS + 1];     /* by bits, 1..8: groups of 32 inputs or more */
    TileFn tile_g16[LUTLM_DOT_MAX_BITS + 1]; /* by bits, 1..8: groups of 16 (two per q-block) */
    /* Several tokens at once (the GEMM of lutlm_lut_matmul), or NULL where that ISA has none. */
    TileBatchFn batch[LUTLM_DOT_MAX_BITS + 1];
    TileBatchFn batch_g16[LUTLM_DOT_MAX_BITS + 1];
} DequantKernels;

const DequantKernels *lutlm_dequant_scalar_kernels(void);
const DequantKernels *lutlm_dequant_avx2_kernels(void);
const DequantKernels *lutlm_dequant_avx512_kernels(void);

/* Groups of 16 in a dot-product geometry: each q-block (32 inputs) holds two groups, and
 * x_sum has one entry per 16 inputs instead of one per q-block. */
static inline int lutlm_dot_g16(const Geometry *g) { return g->w->group_size < g->w->q_block; }

/* Super-block scales of group `group` (of the row) in tile `tile`: the super-block's bytes,
 * and the group's index j within it (its sc at 64 + 16 j; lutlm.h). */
static inline const uint8_t *lutlm_super_scales(const Geometry *g, int64_t tile, int64_t group, int *j) {
    *j = (int)(group & ((1 << g->super_shift) - 1));
    return (const uint8_t *)g->w->scales + (tile * g->n_super + (group >> g->super_shift)) * g->super_bytes;
}

/* The integer sc and m of row r of group j in a super-block (lutlm.h). */
static inline void lutlm_super_sc_m(const Geometry *g, const uint8_t *sb, int j, int r, int *sc, int *m) {
    const int G = g->w->super_groups;
    const uint8_t b = sb[64 + 16 * j + r];
    switch (g->w->scale_kind) {
        case LUTLM_SCALES_SUPER: *sc = (int8_t)b, *m = (int8_t)sb[64 + 16 * (G + j) + r]; break;
        case LUTLM_SCALES_SUPER_SYM: *sc = *m = (int8_t)b; break;
        default: *sc = b & 15, *m = b >> 4; break;
    }
}

/* The geometry of a product with int8 activations per q-block (mode LUTLM_INT8 or
 * LUTLM_FAST_AGG) or float activations (LUTLM_FLOAT): activations at `tables`, their
 * scales at `table_scale`, block (or 16-input) sums at `x_sum`; mid 0 and factor 1 in the
 * epilogue. Takes LUTLM_DOT weights and, read as the same layout (the dequantize baseline)
 * or as bit-planes (the dot-product GEMM, which unpacks them itself), LUTLM_PLANES ones of
 * 1..4 bits. 0, or -1 for a bad weight. */
int lutlm_dot_geometry(const lutlm_weight *w, int mode, Geometry *g);
/* lutlm_dot_geometry of a LUTLM_PLANES weight in mode LUTLM_INT8 (the dot-product GEMM). */
int lutlm_int8_act_geometry(const lutlm_weight *w, Geometry *g);

/* y = x W^T for a LUTLM_DOT weight on the instruction set in use (lutlm_lut_matmul). */
int lutlm_dot_matmul(const lutlm_weight *w, const float *x, int64_t batch, float *y, int mode);

/* Float activations for DOT weights (mode LUTLM_FLOAT), portable: exact up to fp32 rounding. */
void lutlm_dot_build_act_float(const Geometry *g, const float *x, uint8_t *act);
void lutlm_dot_tile_float(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out);

/* One tile of the DOT layout (dot_pack.cpp) from its rows' codes, one per byte: codes[r * stride + i]
 * for r < rows and i < k (the other rows of the 16, and inputs up to k_padded, hold code 0), into
 * out (k_padded / 32 K-steps of 64 * bits bytes). Returns the OR of the codes (a range check). */
uint8_t lutlm_dot_pack_tile(const uint8_t *codes, int64_t stride, int rows, int64_t k, int64_t k_padded, int bits,
                            uint8_t *out);

/* The 4-bit dot-product GEMM over the table-lookup layout (dot_gemm_avx512.cpp). */
TileBatchFn lutlm_dot_gemm_avx512(void);

/* Float tables: exact mode, portable only (it exists for testing). */
void lutlm_build_act_float(const Geometry *g, const float *x, uint8_t *act);
void lutlm_tile_float(const Geometry *g, int64_t tile, int64_t qb0, int64_t qb1, const uint8_t *act, float *out);

/* The functions a product runs: `build` makes each token's activation buffer; `tile` runs
 * one token (always needed for one token), `tile_tokens` (optional) LUTLM_GEMM_TOKENS of
 * them, `tile_batch` (optional, used alone for batches when set) all of a token block. */
typedef struct {
    BuildActFn build;
    TileFn tile;
    TileTokensFn tile_tokens;
    TileBatchFn tile_batch;
} TileKernels;

/* y[batch][n] from x[batch][k] over every tile, q-block range and token (driver.cpp). */
int lutlm_run_tiled(const Geometry *g, const float *x, int64_t batch, float *y, const TileKernels *k);

/* Runs fn(task, arg) for task in [0, n_tasks) on the pool (the caller takes part). */
typedef void (*TaskFn)(int task, void *arg);
void lutlm_parallel_for(int n_tasks, TaskFn fn, void *arg);

#endif
