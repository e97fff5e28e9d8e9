/* lutlm CPU kernels: the C API that lutlm/kernels/cpu.py calls through ctypes.
 *
 * Table-lookup mpGEMM (T-MAC style). A weight row holds b-bit codes q with a scale s and a
 * zero z per group of G inputs, w = s (q - z). Writing each code bit as a sign (0 -> -1,
 * 1 -> +1), q = mid + 1/2 sum_i 2^i sign_i with mid = (2^b - 1) / 2, so per group
 *
 *     sum_k w_k x_k = s * ( 1/2 sum_i 2^i sum_c T_c[pattern_{i,c}] + (mid - z) * sum_k x_k )
 *
 * where T_c is the table of the 16 signed sums of the four activations of chunk c and
 * pattern_{i,c} is the 4-bit pattern of bit-plane i over that chunk. Tables are built once
 * per activation vector; every row and every plane then costs one lookup per chunk.
 *
 * ---- Kernel weight layout (written by cpu.py's prepare from the canonical bit-planes) ----
 *
 * Rows are padded to tiles of 16, inputs to k_padded (a multiple of 32 and of q_block);
 * padded weights meet zero activations and contribute nothing. A K-step is 32 inputs
 * (8 chunks of 4). For tile t and K-step s, `bits` blocks of 64 bytes are stored:
 *
 *     codes[((t * n_steps) + s) * 64 * bits + block * 64 + 4 * r + p]      r = row in tile, p = 0..3
 *
 * Byte (r, p) holds two 4-bit patterns: low nibble for one chunk, high nibble for another.
 * The four bytes of row r form one 32-bit lane, which vpdpbusd sums with per-byte weights
 * 2^plane: the bit-serial combination and the widening to int32 in one instruction.
 * The planes are split into sections; each section's blocks are stored in this order:
 *
 *   4-plane section (bits 4: planes 0-3), 4 blocks j = 0..3:
 *       p = plane; low nibble = chunk 2j, high nibble = chunk 2j+1.  Byte weights 1,2,4,8.
 *   2-plane section (bits 2 and 3: planes 0-1), 2 blocks j = 0..1:
 *       plane = p & 1; low nibble = chunk 4j + (p >> 1), high = chunk 4j + 2 + (p >> 1).
 *   1-plane section (bits 1: plane 0; bits 3: plane 2), 1 block:
 *       low nibble = chunk p, high nibble = chunk 4 + p.  Byte weight 2^plane.
 *
 * A lookup is one vpermb over a 64-byte table register whose four 16-byte quarters are
 * chosen by index bits 4-5; the sections differ in which chunk tables fill the quarters
 * (4-plane: one table four times, so the raw byte indexes it with no masking).
 *
 * Scales: fp16 [tiles][groups][2][16]: the 16 rows' s, then their z, for each group.
 *
 * int8 tables: one scale per table block of q_block inputs (the largest of 128, 96, 64, 32
 * dividing the group), unit = largest |entry| / 127; each lookup errs by at most unit / 2.
 *
 * ---- Ternary layout (kind = LUTLM_TERNARY) ----
 *
 * Weights t in {-1, 0, 1} (stored canonically as codes t + 1 with zero 1), scale s per
 * group (a multiple of 96 inputs, or the whole row padded to one). A chunk is 3 inputs;
 * e = 9 t0 + 3 t1 + t2 takes 27 values, folded by the symmetry T[-e] = -T[e] into a
 * magnitude |e| in 0..13 (a 16-entry table, entries 14 and 15 zero) and a sign bit: that
 * is 5 bits per 3 weights, 1.67 bits per weight plus scales, against 2 for two planes.
 * A K-step is 96 inputs (32 chunks); per tile and K-step, 320 bytes:
 *
 *   bytes 0..255:   4 blocks j of magnitudes in the 1-plane arrangement:
 *                   byte 64 j + 4 r + p: low nibble chunk 8j + p, high nibble chunk 8j + 4 + p
 *   bytes 256..319: per block j, 16 bytes of sign bits: bit (4 r + p) of the 8 bytes at
 *                   256 + 16 j for the low-nibble lookups, of the 8 at 256 + 16 j + 8 for
 *                   the high ones (a set bit negates the lookup)
 *
 * Table quantization blocks (q_block) are 96 inputs. The zero-point term vanishes
 * (z = 1 is the code of t = 0).
 */
#ifndef LUTLM_H
#define LUTLM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with hidden visibility; only these functions are exported. */
#define LUTLM_API __attribute__((visibility("default")))

enum lutlm_isa { LUTLM_SCALAR = 0, LUTLM_AVX2 = 1, LUTLM_AVX512 = 2 };
enum lutlm_kind { LUTLM_PLANES = 0, LUTLM_TERNARY = 1 };
/* int8 tables (the fast path), float tables (exact, for testing), or int8 tables with
 * pairs of lookups merged by averaging adds before widening (fast aggregation). */
enum lutlm_mode { LUTLM_INT8 = 0, LUTLM_FLOAT = 1, LUTLM_FAST_AGG = 2 };

typedef struct {
    const uint8_t *codes;    /* kernel layout, see above */
    const uint16_t *scales;  /* fp16, see above */
    int64_t n;               /* output rows */
    int64_t k;               /* inputs (unpadded) */
    int64_t k_padded;        /* multiple of the K-step and of q_block */
    int32_t bits;            /* 1..4 (2 for ternary) */
    int32_t group_size;      /* inputs per scale group, in padded units; divides k_padded */
    int32_t q_block;         /* inputs per table-quantization scale; divides group_size */
    int32_t kind;            /* lutlm_kind */
} lutlm_weight;

/* Highest instruction set this CPU and OS support, and the one the kernels use. */
LUTLM_API int lutlm_best_isa(void);
LUTLM_API int lutlm_get_isa(void);
/* Use `isa` (capped at lutlm_best_isa); returns the one in effect. */
LUTLM_API int lutlm_set_isa(int isa);

LUTLM_API void lutlm_set_num_threads(int n);
LUTLM_API int lutlm_get_num_threads(void);
/* Calls with less work (weight bits x tokens) than this run on one thread. */
LUTLM_API void lutlm_set_parallel_threshold(double work);

/* y[batch, n] = x[batch, k] @ W^T by table lookup. Returns 0, or -1 for a bad argument. */
LUTLM_API int lutlm_lut_matmul(const lutlm_weight *w, const float *x, int64_t batch, float *y, int mode);

/* In mode LUTLM_INT8, 4-bit products of at least `tokens` tokens (default 4, at least 2) run
 * as a dot product of int8 activations and the codes, recovered from the bit-planes in
 * registers (dot_gemm_avx512.cpp), where the CPU has AVX-512 with GFNI: the lookups cost
 * twice the multiply-adds per token. lutlm_dot_gemm_applies says whether a call of `batch`
 * tokens would, with the instruction set in use. */
LUTLM_API void lutlm_set_dot_gemm_min_tokens(int64_t tokens);
LUTLM_API int lutlm_dot_gemm_applies(const lutlm_weight *w, int64_t batch);

/* The dequantize-then-multiply baseline (llama.cpp's method: codes unpacked to bytes, dot
 * products with int8-quantized activations by vpdpbusd on AVX-512, vpmaddubsw + vpmaddwd
 * on AVX2). Its own layout: see dequant.cpp. Runs on the instruction set in use
 * (lutlm_get_isa); returns -1 on the scalar one (there is no portable version) and for a
 * bad argument. */
LUTLM_API int lutlm_dequant_matmul(const lutlm_weight *w, const float *x, int64_t batch, float *y);

/* Memory read bandwidth in bytes per second, streaming `bytes` with the current threads. */
LUTLM_API double lutlm_read_bandwidth(int64_t bytes, int repeats);

#ifdef __cplusplus
}
#endif

#endif
