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
 *
 * ---- Dot-product layout (kind = LUTLM_DOT; dequant.cpp) ----
 *
 * Codes q (1..8 bits) are multiplied as unsigned bytes with int8 activations (vpdpbusd,
 * or vpmaddubsw + vpmaddwd), so they are stored where one AND (or shift and AND) puts them
 * in a byte. Sum_k w_k x_k = s (dx sum_k q_k xq_k - z xsum) per group, xq the activations
 * rounded to int8 with one scale dx per q-block, xsum dx times the sum of the rounded ones.
 * Tiles of 16 rows, K-steps of 32 inputs as above; for tile t and step s, `bits` blocks of
 * 64 bytes (one dword lane per row, four codes of consecutive inputs per lane):
 *
 *     codes[((t * n_steps) + s) * 64 * bits + block * 64 + 4 * r + p]   r = row, p = 0..3
 *
 * Inputs i = 0..31 are numbered within the step, q is the code. Below 8 bits a code is split
 * into sections stored one after the other, each in the arrangement of its width (a 3-bit
 * section is a 2-bit arrangement of its low 2 bits, then a 1-bit one of its top bit):
 *
 *   section [lo]: q & 15 (q itself below 4 bits), width min(bits, 4)
 *   section [hi]: q >> 4, width bits - 4 (bits 5..7 only)
 *
 *   4-bit arrangement, 4 blocks j: low nibble = field of input 8j + p, high nibble 8j + 4 + p
 *   2-bit arrangement, 2 blocks j: bits 2m, 2m + 1 = field of input 16j + 4m + p (m = 0..3)
 *   1-bit arrangement, 1 block:    bit m = field of input 4m + p (m = 0..7)
 *
 *   bits 1: [1]   2: [2]   3: [2][1]   4: [4]   5: [4][1]   6: [4][2]   7: [4][2][1]
 *   bits 8: whole bytes, 8 blocks j: byte (r, p) = q of input 4j + p
 *
 * E.g. 6 bits: blocks 0-3 hold q & 15 as at 4 bits, blocks 4-5 hold q >> 4 as at 2 bits.
 * (8-bit codes as bytes rather than [4][4]: no unpacking, one vpdpbusd per 64 codes; the
 * bytes read are the same.) Every arrangement keeps inputs 0..15 and 16..31 in separate
 * blocks or bits, so that groups of 16 get their own integer sums. Padding (rows to the
 * tile, inputs to k_padded) holds code 0.
 *
 * Groups: group_size 16 (two groups per K-step, q_block 32), or a multiple of 32 dividing
 * k_padded with q_block the largest of 128, 96, 64, 32 dividing it; one group per row is
 * k_padded = k rounded up to 32. Scales: fp16 [tiles][k_padded / group_size][2][16] as
 * above (s then z of the 16 rows per group; padded rows and padded groups hold 0).
 *
 * Activation buffer (per token): int8 xq [k_padded] (float x in mode LUTLM_FLOAT), float
 * dx [q-blocks] (1 in float mode), float xsum [q-blocks, or k_padded / 16 for groups of 16].
 *
 * Super-block scales (DOT weights, scale_kind != LUTLM_SCALES_F16; groups of 16 or 32): the
 * K-quants' own two-level scales, s = d * sc and s z = dmin * m per group, with d and dmin
 * fp16 per super-block of `super_groups` groups and sc, m small integers per group, so that
 * the kernel reads about the file's scale bytes (Q2_K 2.625 bits per weight, not 4). Per tile
 * and super-block, super_bytes bytes, tile-major like the codes:
 *
 *     bytes 0..31:   fp16 d[16]      (the 16 rows)
 *     bytes 32..63:  fp16 dmin[16]
 *     bytes 64..:    per group j of the super-block, 16 bytes (one per row), by scale_kind:
 *       LUTLM_SCALES_SUPER:        int8 sc[j][16], then int8 m[j][16] after all sc (2 x 16 G bytes)
 *       LUTLM_SCALES_SUPER_SYM:    int8 sc[j][16]; m = sc (symmetric types: dmin = d * zero)
 *       LUTLM_SCALES_SUPER_NIBBLE: uint8 sc | m << 4, both 0..15 (Q2_K)
 *
 * super_bytes = 64 + 16 G (2 x 16 G for LUTLM_SCALES_SUPER), G = super_groups (a power of
 * two); k_padded is a multiple of group_size * super_groups. Padded rows hold 0.
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
enum lutlm_kind { LUTLM_PLANES = 0, LUTLM_TERNARY = 1, LUTLM_DOT = 2 };
/* int8 tables (the fast path), float tables (exact, for testing), or int8 tables with
 * pairs of lookups merged by averaging adds before widening (fast aggregation). */
enum lutlm_scale_kind {
    LUTLM_SCALES_F16 = 0, LUTLM_SCALES_SUPER = 1, LUTLM_SCALES_SUPER_SYM = 2, LUTLM_SCALES_SUPER_NIBBLE = 3
};
enum lutlm_mode { LUTLM_INT8 = 0, LUTLM_FLOAT = 1, LUTLM_FAST_AGG = 2 };

typedef struct {
    const uint8_t *codes;    /* kernel layout, see above */
    const uint16_t *scales;  /* fp16, see above (super-block scales: bytes, read by offset) */
    int64_t n;               /* output rows */
    int64_t k;               /* inputs (unpadded) */
    int64_t k_padded;        /* multiple of the K-step and of q_block */
    int32_t bits;            /* 1..4 (2 for ternary; 1..8 for LUTLM_DOT) */
    int32_t group_size;      /* inputs per scale group, in padded units; divides k_padded (16 allowed for LUTLM_DOT) */
    int32_t q_block;         /* inputs per table-quantization scale; divides group_size */
    int32_t kind;            /* lutlm_kind */
    int32_t scale_kind;      /* lutlm_scale_kind (not LUTLM_SCALES_F16: DOT weights only) */
    int32_t super_groups;    /* groups per super-block (super-block scales; else 0) */
} lutlm_weight;

/* sizeof(lutlm_weight), and offsetof of each of its fields in declaration order into
 * offsets[11]: what lutlm/kernels/cpu.py's ctypes mirror is tested against. */
LUTLM_API int64_t lutlm_weight_layout(int64_t *offsets);

/* Highest instruction set this CPU and OS support, and the one the kernels use. */
LUTLM_API int lutlm_best_isa(void);
LUTLM_API int lutlm_get_isa(void);
/* Use `isa` (capped at lutlm_best_isa); returns the one in effect. */
LUTLM_API int lutlm_set_isa(int isa);

LUTLM_API void lutlm_set_num_threads(int n);
LUTLM_API int lutlm_get_num_threads(void);
/* Calls with less work (weight bits x tokens) than this run on one thread. */
LUTLM_API void lutlm_set_parallel_threshold(double work);

/* y[batch, n] = x[batch, k] @ W^T by table lookup, or for a LUTLM_DOT weight by int8 dot
 * products (modes LUTLM_INT8 and LUTLM_FAST_AGG: int8 activations per q-block, on every
 * instruction set, the portable one included; LUTLM_FLOAT: float activations, exact up to
 * fp32 rounding, portable code). Returns 0, or -1 for a bad argument. */
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
 * on AVX2): the int8 path of a LUTLM_DOT weight (a LUTLM_PLANES descriptor of 1..4 bits is
 * read as the same layout, as the baseline's callers wrote it before the DOT kind). Runs on
 * the instruction set in use (lutlm_get_isa); returns -1 on the scalar one (a benchmark
 * row of the baseline is SIMD code; lutlm_lut_matmul runs DOT weights portably) and for a
 * bad argument. */
LUTLM_API int lutlm_dequant_matmul(const lutlm_weight *w, const float *x, int64_t batch, float *y);

/* The DOT layout of an n x k weight of `bits` (1..8) bits in groups of `group` inputs (16,
 * a multiple of 32 dividing k, or k): the lutlm_weight fields *k_padded, *group_padded and
 * *q_block, and the sizes of its arrays, *code_bytes and *scale_values (fp16 values).
 * Returns 0, or -1 for a configuration the DOT kernels do not run. */
LUTLM_API int lutlm_dot_shape(int64_t n, int64_t k, int32_t bits, int32_t group, int64_t *k_padded,
                              int32_t *group_padded, int32_t *q_block, int64_t *code_bytes, int64_t *scale_values);

/* Writes the DOT layout from codes uint8 [n][k] (one code per byte, row-major, values
 * < 2^bits) and fp16 scales and zeros [n][k / group] (one group per row: [n][1]) into
 * out_codes and out_scales (sizes from lutlm_dot_shape), on the kernels' threads; with scales,
 * zeros and out_scales all NULL, the codes alone (super-block scales are laid out by the
 * caller). Returns
 * 0; -1 for a bad argument; -2 if a code does not fit in `bits` (the output is then partial). */
LUTLM_API int lutlm_pack_dot(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros, int64_t n,
                             int64_t k, int32_t bits, int32_t group, uint8_t *out_codes, uint16_t *out_scales);

/* Memory read bandwidth in bytes per second, streaming `bytes` with the current threads. */
LUTLM_API double lutlm_read_bandwidth(int64_t bytes, int repeats);

#ifdef __cplusplus
}
#endif

#endif
