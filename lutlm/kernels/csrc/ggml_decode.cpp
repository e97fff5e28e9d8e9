/* ggml's quantized blocks (as a GGUF file stores them) -> groups of codes with an fp16 scale
 * and zero: w = s * (q - z), lutlm's packed form, without a round trip through float.
 *
 * The native twin of lutlm.formats.gguf_packed.ggml_groups, whose docstring gives each type's
 * mapping and its exactness; lutlm/formats/ggml_quants.py documents every block byte by byte.
 * It produces the same bytes: the same float32 products in the same order (step A and offset
 * B as ggml's dequantizer forms them, z = fp16(B / fp16(A)) in float32), and float -> half
 * with round-to-nearest-even, as numpy's astype(float16) rounds. Nothing here needs a
 * particular instruction set: the per-type loops are plain byte arithmetic that -O3
 * vectorizes, and the work is spread over rows on the library's thread pool.
 */
/* The per-group loops compute both arms of each select (a subnormal and a normal half, a
 * zero step and a real one) and pick one: GCC vectorizes that only when it may assume that
 * floating-point operations do not trap. No value changes (the operations are IEEE float32
 * either way); only the floating-point exception flags could differ, which nothing reads. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <string.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "internal.h"

namespace {

enum GgmlType {
    Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
    TQ1_0 = 34, TQ2_0 = 35,
};

constexpr int kMaxGroups = 16;  /* groups per block, at most (K-quants of 16) */
constexpr uint16_t kHalfMinusOne = 0xBC00;

inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

inline float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* IEEE half -> float: the values of lutlm_half_to_float, without branches so that the
 * per-group loops vectorize. */
inline float h2f(uint16_t h) {
    const uint32_t em = h & 0x7fffu, sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t wide = (em << 13) + (em >= 0x7c00u ? 0x70000000u : 0x38000000u); /* rebias; inf/NaN to 255 */
    const float normal = float_of(wide), subnormal = (float)(int32_t)em * 5.9604644775390625e-08f; /* m 2^-24 */
    return float_of(bits_of(em < 0x400u ? subnormal : normal) | sign);
}

/* float -> IEEE half, round to nearest, ties to even, as numpy's astype(np.float16) rounds
 * (F. Giesen's float_to_half_fast3_rtne, branch-free). A result below 2^-14 is a subnormal
 * half: adding 0.5f rounds |f| to a multiple of 2^-24 (the ulp of 0.5f) in the FPU's own
 * round-to-nearest-even, and the integer difference of the bit patterns is the half. Above,
 * the exponent is rebiased and 13 mantissa bits are dropped with an add of 0xfff plus the
 * lowest kept bit (ties to even); a carry moves into the exponent, up to inf (>= 65520). */
inline uint16_t f2h(float f) {
    const uint32_t u = bits_of(f) & 0x7fffffffu, sign = (bits_of(f) >> 16) & 0x8000u;
    const uint32_t sub = bits_of(float_of(u) + 0.5f) - 0x3f000000u;
    const uint32_t normal = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13; /* 0xc8000000: (15 - 127) << 23 */
    uint32_t h = (int32_t)u < (int32_t)(113u << 23) ? sub : normal;
    const uint32_t top = (int32_t)u > 0x7f800000 ? 0x7e00u : 0x7c00u; /* NaN, or inf for >= 65536 and inf */
    h = (int32_t)u >= (int32_t)(143u << 23) ? top : h;
    return (uint16_t)(h | sign);
}

inline float field(const uint8_t *p) { return h2f((uint16_t)(p[0] | (p[1] << 8))); }

/* Each decode_* turns one block into its codes q[weights], and per group the step A and
 * (offset types) offset B, as ggml's dequantizer forms them in float32. */

/* The 32-weight blocks in 64-bit words (8 codes at a time): byte-wise stores followed by a
 * wider read-modify-write of the same bytes stalled on store forwarding. */
inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

inline void store64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

constexpr uint64_t kLowNibbles = 0x0F0F0F0F0F0F0F0Full;

/* kSpread[x]: byte i is 0x10 where bit i of x is set (as a little-endian uint64). */
struct SpreadTable {
    uint64_t v[256];
    constexpr SpreadTable() : v() {
        for (int x = 0; x < 256; x++)
            for (int i = 0; i < 8; i++)
                if (x >> i & 1) v[x] |= (uint64_t)0x10 << (8 * i);
    }
};
constexpr SpreadTable kSpread;

/* q4_0's order: weight j < 16 is the low nibble of qs[j], weight j + 16 its high nibble; with
 * qh (q5_0/q5_1), bit j of the little-endian uint32 is bit 4 of weight j. */
template <bool FIFTH>
inline void codes32(const uint8_t *qs, const uint8_t *qh, uint8_t *q) {
    for (int i = 0; i < 2; i++) {
        const uint64_t v = load64(qs + 8 * i);
        uint64_t low = v & kLowNibbles, high = (v >> 4) & kLowNibbles;
        if (FIFTH) {
            low |= kSpread.v[qh[i]];
            high |= kSpread.v[qh[2 + i]];
        }
        store64(q + 8 * i, low);
        store64(q + 16 + 8 * i, high);
    }
}

void decode_q4_0(const uint8_t *b, uint8_t *q, float *A, float *) {
    A[0] = field(b);
    codes32<false>(b + 2, nullptr, q);
}

void decode_q4_1(const uint8_t *b, uint8_t *q, float *A, float *B) {
    A[0] = field(b);
    B[0] = -field(b + 2);
    codes32<false>(b + 4, nullptr, q);
}

void decode_q5_0(const uint8_t *b, uint8_t *q, float *A, float *) {
    A[0] = field(b);
    codes32<true>(b + 6, b + 2, q);
}

void decode_q5_1(const uint8_t *b, uint8_t *q, float *A, float *B) {
    A[0] = field(b);
    B[0] = -field(b + 2);
    codes32<true>(b + 8, b + 4, q);
}

void decode_q8_0(const uint8_t *b, uint8_t *q, float *A, float *) {
    A[0] = field(b);
    for (int i = 0; i < 4; i++) store64(q + 8 * i, load64(b + 2 + 8 * i) ^ 0x8080808080808080ull); /* int8 q: q + 128 */
}

/* q2_K's (and tq2_0's) 2-bit fields: weight 128 h + 32 s + l is bits 2s..2s+1 of qs[32 h + l]. */
void crumbs256(const uint8_t *qs, uint8_t *q) {
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int l = 0; l < 32; l++) q[128 * h + 32 * s + l] = (qs[32 * h + l] >> (2 * s)) & 3;
}

void decode_q2_k(const uint8_t *b, uint8_t *q, float *A, float *B) {
    const float d = field(b + 80), dmin = field(b + 82);
    for (int i = 0; i < 16; i++) {
        A[i] = d * (float)(b[i] & 0x0F);
        B[i] = dmin * (float)(b[i] >> 4);
    }
    crumbs256(b + 16, q);
}

/* q3_K's signed 6-bit sub-scale i (of 16) from its 12 packed bytes s. */
inline int q3_k_scale(const uint8_t *s, int i) {
    const int low = (s[i % 8] >> (4 * (i / 8))) & 0x0F, high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    return (low | (high << 4)) - 32;
}

void decode_q3_k(const uint8_t *b, uint8_t *q, float *A, float *) {
    const uint8_t *hmask = b;
    const float d = field(b + 108);
    for (int i = 0; i < 16; i++) A[i] = d * (float)q3_k_scale(b + 96, i);
    crumbs256(b + 32, q);
    /* bit 4h + s of hmask[l] is bit 2 of weight 128 h + 32 s + l = 32 (4h + s) + l */
    for (int i = 0; i < 8; i++)
        for (int l = 0; l < 32; l++) q[32 * i + l] |= (uint8_t)(((hmask[l] >> i) & 1) << 2);
}

/* q4_K/q5_K's 6-bit scale and min of sub-block i (of 8) from their 12 packed bytes s. */
inline void k_sc_m(const uint8_t *s, int i, int *sc, int *m) {
    if (i < 4) {
        *sc = s[i] & 63;
        *m = s[i + 4] & 63;
    } else {
        *sc = (s[i + 4] & 0x0F) | ((s[i - 4] >> 6) << 4);
        *m = (s[i + 4] >> 4) | ((s[i] >> 6) << 4);
    }
}

void k_scale_min(const uint8_t *s, float d, float dmin, float *A, float *B) {
    for (int i = 0; i < 8; i++) {
        int sc, m;
        k_sc_m(s, i, &sc, &m);
        A[i] = d * (float)sc;
        B[i] = dmin * (float)m;
    }
}

/* q4_K's nibbles: sub-blocks 2j and 2j + 1 are the low and high nibbles of qs[32 j .. 32 j + 32]. */
void nibbles256(const uint8_t *qs, uint8_t *q) {
    for (int j = 0; j < 4; j++)
        for (int l = 0; l < 32; l++) {
            q[64 * j + l] = qs[32 * j + l] & 0x0F;
            q[64 * j + 32 + l] = qs[32 * j + l] >> 4;
        }
}

void decode_q4_k(const uint8_t *b, uint8_t *q, float *A, float *B) {
    k_scale_min(b + 4, field(b), field(b + 2), A, B);
    nibbles256(b + 16, q);
}

void decode_q5_k(const uint8_t *b, uint8_t *q, float *A, float *B) {
    k_scale_min(b + 4, field(b), field(b + 2), A, B);
    nibbles256(b + 48, q);
    for (int i = 0; i < 8; i++) /* bit i of qh[l] is bit 4 of weight 32 i + l */
        for (int l = 0; l < 32; l++) q[32 * i + l] |= (uint8_t)(((b[16 + l] >> i) & 1) << 4);
}

void decode_q6_k(const uint8_t *b, uint8_t *q, float *A, float *) {
    const uint8_t *ql = b, *qh = b + 128;
    const float d = field(b + 208);
    for (int i = 0; i < 16; i++) A[i] = d * (float)(int8_t)b[192 + i];
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int l = 0; l < 32; l++) {
                const uint8_t low = ql[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2)) & 0x0F;
                q[128 * h + 32 * s + l] = (uint8_t)(low | (((qh[32 * h + l] >> (2 * s)) & 3) << 4));
            }
}

/* tq1_0's trits: trit j of byte x is ((x * 3^j mod 256) * 3) >> 8. */
void trits(const uint8_t *qs, int count, int n, uint8_t *q) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    for (int j = 0; j < count; j++)
        for (int l = 0; l < n; l++) q[n * j + l] = (uint8_t)(((uint16_t)(uint8_t)(qs[l] * pow3[j]) * 3) >> 8);
}

void decode_tq1_0(const uint8_t *b, uint8_t *q, float *A, float *) {
    A[0] = field(b + 52);
    trits(b, 5, 32, q);             /* weights 0 .. 159 */
    trits(b + 32, 5, 16, q + 160);  /* 160 .. 239 */
    trits(b + 48, 4, 4, q + 240);   /* 240 .. 255 */
}

void decode_tq2_0(const uint8_t *b, uint8_t *q, float *A, float *) {
    A[0] = field(b + 64);
    crumbs256(b, q);
}

/* Per type: its block (weights, bytes), its codes' bits and group, and the fixed zero of
 * the types without an offset per group (has_offset: Q4_1, Q5_1, Q2_K, Q4_K, Q5_K). */
struct TypeInfo {
    int type, weights, bytes, bits, group;
    float zero;
};

constexpr TypeInfo kTypes[] = {
    {Q4_0, 32, 18, 4, 32, 8.0f},    {Q4_1, 32, 20, 4, 32, 0.0f},   {Q5_0, 32, 22, 5, 32, 16.0f},
    {Q5_1, 32, 24, 5, 32, 0.0f},    {Q8_0, 32, 34, 8, 32, 128.0f}, {Q2_K, 256, 84, 2, 16, 0.0f},
    {Q3_K, 256, 110, 3, 16, 4.0f},  {Q4_K, 256, 144, 4, 32, 0.0f}, {Q5_K, 256, 176, 5, 32, 0.0f},
    {Q6_K, 256, 210, 6, 16, 32.0f}, {TQ1_0, 256, 54, 2, 256, 1.0f}, {TQ2_0, 256, 66, 2, 256, 1.0f},
};

constexpr bool has_offset(int type) {
    return type == Q4_1 || type == Q5_1 || type == Q2_K || type == Q4_K || type == Q5_K;
}

const TypeInfo *find_type(int type) {
    for (const TypeInfo &t : kTypes)
        if (t.type == type) return &t;
    return nullptr;
}

struct Job {
    const uint8_t *raw;
    int64_t n_rows, k, rows_per_task;
    uint8_t *codes;
    uint16_t *scales, *zeros;
    std::atomic<int> bad{0};    /* a scale or zero that does not fit fp16 */
    std::atomic<int> three{0};  /* tq2_0: a field of 3 (not ternary) */
};

/* A row's groups from their steps A and offsets B (or fixed zero): s, z, and which are
 * constant. Without branches, so that it vectorizes; the same operations, in the same
 * order, as gguf_packed._grid. Returns whether any s or z is not finite in fp16 (a second
 * loop: folded into the first, the reduction kept GCC from vectorizing it). */
template <bool OFFSET>
bool grid(const float *__restrict A, const float *__restrict B, int64_t n, float mid, uint16_t fixed_zero,
          uint16_t *__restrict s, uint16_t *__restrict z, uint8_t *__restrict constant) {
    for (int64_t g = 0; g < n; g++) {
        const uint16_t sh = f2h(A[g]);
        if (!OFFSET) {
            s[g] = sh;
            z[g] = fixed_zero;
            continue;
        }
        const float sf = h2f(sh);
        const int zero_step = sf == 0.0f;
        const uint16_t zh = f2h(B[g] / (zero_step ? 1.0f : sf));
        const int flat = zero_step | ((zh & 0x7fffu) == 0x7c00u); /* s rounds to 0, or z overflows */
        const uint16_t value = f2h(mid * A[g] - B[g]);          /* the group at its middle code */
        s[g] = flat ? value : sh;
        z[g] = flat ? kHalfMinusOne : zh;
        constant[g] = (uint8_t)flat;
    }
    int bad = 0;
    for (int64_t g = 0; g < n; g++) bad |= ((s[g] & 0x7c00u) == 0x7c00u) | ((z[g] & 0x7c00u) == 0x7c00u);
    return bad != 0;
}

template <int TYPE>
inline void decode(const uint8_t *b, uint8_t *q, float *A, float *B) {
    switch (TYPE) {
        case Q4_0: decode_q4_0(b, q, A, B); break;
        case Q4_1: decode_q4_1(b, q, A, B); break;
        case Q5_0: decode_q5_0(b, q, A, B); break;
        case Q5_1: decode_q5_1(b, q, A, B); break;
        case Q8_0: decode_q8_0(b, q, A, B); break;
        case Q2_K: decode_q2_k(b, q, A, B); break;
        case Q3_K: decode_q3_k(b, q, A, B); break;
        case Q4_K: decode_q4_k(b, q, A, B); break;
        case Q5_K: decode_q5_k(b, q, A, B); break;
        case Q6_K: decode_q6_k(b, q, A, B); break;
        case TQ1_0: decode_tq1_0(b, q, A, B); break;
        case TQ2_0: decode_tq2_0(b, q, A, B); break;
    }
}

template <int TYPE>
void run_rows(int task, void *arg) {
    Job &j = *(Job *)arg;
    const TypeInfo &t = *find_type(TYPE);
    const int per_block = t.weights / t.group;
    const int64_t blocks = j.k / t.weights, groups = j.k / t.group;
    const float mid = (float)((1 << t.bits) - 1) * 0.5f;
    const uint16_t fixed_zero = f2h(t.zero);
    std::vector<float> A((size_t)groups), B((size_t)groups);
    std::vector<uint8_t> constant((size_t)groups);
    bool bad = false;
    uint8_t three = 0;
    const int64_t r0 = task * j.rows_per_task, r1 = std::min(j.n_rows, r0 + j.rows_per_task);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *b = j.raw + r * blocks * t.bytes;
        uint8_t *q = j.codes + r * j.k;
        for (int64_t i = 0; i < blocks; i++)
            decode<TYPE>(b + i * t.bytes, q + i * t.weights, A.data() + i * per_block, B.data() + i * per_block);
        if (TYPE == TQ2_0) /* a 2-bit field of 3: both of its bits set */
            for (int64_t i = 0; i < blocks; i++)
                for (int l = 0; l < 64; l++) three |= b[i * t.bytes + l] & (b[i * t.bytes + l] >> 1) & 0x55;
        bad |= grid<has_offset(TYPE)>(
            A.data(), B.data(), groups, mid, fixed_zero, j.scales + r * groups, j.zeros + r * groups, constant.data());
        if (has_offset(TYPE))
            for (int64_t g = 0; g < groups; g++)
                if (constant[g]) memset(q + g * t.group, 0, (size_t)t.group); /* codes 0: w = s * (0 - (-1)) */
    }
    if (bad) j.bad.store(1, std::memory_order_relaxed);
    if (three) j.three.store(1, std::memory_order_relaxed);
}

TaskFn task_for(int type) {
    switch (type) {
        case Q4_0: return run_rows<Q4_0>;
        case Q4_1: return run_rows<Q4_1>;
        case Q5_0: return run_rows<Q5_0>;
        case Q5_1: return run_rows<Q5_1>;
        case Q8_0: return run_rows<Q8_0>;
        case Q2_K: return run_rows<Q2_K>;
        case Q3_K: return run_rows<Q3_K>;
        case Q4_K: return run_rows<Q4_K>;
        case Q5_K: return run_rows<Q5_K>;
        case Q6_K: return run_rows<Q6_K>;
        case TQ1_0: return run_rows<TQ1_0>;
        case TQ2_0: return run_rows<TQ2_0>;
    }
    return nullptr;
}

}  // namespace

/* One [n_rows, k] tensor of ggml `type` (as gguf.GGMLQuantizationType numbers it) from its raw
 * blocks (n_rows * k / weights-per-block blocks, row-major) into codes uint8 [n_rows, k] and
 * fp16 scales and zeros [n_rows, k / group]. Returns 0; 1 when a TQ2_0 tensor holds a field of
 * 3 (its codes are then 2-bit, not ternary); -1 for a type with no grouped form or a k that is
 * not whole blocks; -2 when a scale or value does not fit fp16 (the outputs are then partly
 * written). Threads: the library's pool (lutlm_set_num_threads). */
extern "C" LUTLM_API int lutlm_ggml_groups(int type, const uint8_t *raw, int64_t n_rows, int64_t k, uint8_t *codes,
                                           uint16_t *scales_f16, uint16_t *zeros_f16) {
    const TypeInfo *t = find_type(type);
    if (!t || n_rows < 0 || k <= 0 || k % t->weights) return -1;
    if (n_rows == 0) return 0;
    Job j;
    j.raw = raw;
    j.n_rows = n_rows;
    j.k = k;
    j.codes = codes;
    j.scales = scales_f16;
    j.zeros = zeros_f16;
    /* Tasks of whole rows, about 64 KiB of weights or more each, several per thread. */
    const int64_t threads = lutlm_get_num_threads();
    const int64_t min_rows = std::max<int64_t>(1, (64 << 10) / k);
    j.rows_per_task = std::max(min_rows, (n_rows + 8 * threads - 1) / (8 * threads));
    const int64_t n_tasks = (n_rows + j.rows_per_task - 1) / j.rows_per_task;
    lutlm_parallel_for((int)n_tasks, task_for(type), &j);
    if (j.bad.load()) return -2;
    return j.three.load() ? 1 : 0;
}

namespace {

/* ---- The K-quants' own two-level scales (lutlm_ggml_super_dot): per 256-weight block, fp16 d and
 * dmin and an integer sc (and m) per sub-block, w = (d sc) q - dmin m; for the symmetric Q3_K
 * and Q6_K, m = sc and dmin = d * zero (4, 32: exact in fp16 unless it overflows). ---- */

/* Block b's d, dmin (fp16 bits) and sub-block sc[16], m[16]; false if dmin overflows. */
template <int TYPE>
bool super_fields(const uint8_t *b, uint16_t *d, uint16_t *dmin, int8_t *sc, int8_t *m) {
    const auto f16 = [](const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); };
    switch (TYPE) {
        case Q2_K:
            *d = f16(b + 80), *dmin = f16(b + 82);
            for (int i = 0; i < 16; i++) sc[i] = (int8_t)(b[i] & 0x0F), m[i] = (int8_t)(b[i] >> 4);
            return true;
        case Q3_K:
            *d = f16(b + 108);
            for (int i = 0; i < 16; i++) sc[i] = (int8_t)q3_k_scale(b + 96, i);
            *dmin = f2h(h2f(*d) * 4.0f);
            return (*dmin & 0x7c00u) != 0x7c00u;
        case Q4_K:
        case Q5_K:
            *d = f16(b), *dmin = f16(b + 2);
            for (int i = 0; i < 8; i++) {
                int isc, im;
                k_sc_m(b + 4, i, &isc, &im);
                sc[i] = (int8_t)isc, m[i] = (int8_t)im;
            }
            return true;
        case Q6_K:
            *d = f16(b + 208);
            for (int i = 0; i < 16; i++) sc[i] = (int8_t)b[192 + i];
            *dmin = f2h(h2f(*d) * 32.0f);
            return (*dmin & 0x7c00u) != 0x7c00u;
    }
    return false;
}

/* Straight into the dot kernels' layout with super-block scales (lutlm.h): each task decodes
 * the 16 rows of a tile into a buffer of codes and packs them, writing the tile's scales from
 * the blocks' own fields; no tensor of codes is ever whole. */
struct SuperDotJob {
    const uint8_t *raw;
    const int64_t *row_of; /* output row -> source row (q/k's rotary order), or NULL */
    int64_t n_rows, k, tiles, n_tasks, super_bytes;
    int scale_kind;
    uint8_t *out_codes, *out_scales;
    std::atomic<int> bad{0};
};

template <int TYPE>
void run_super_dot(int task, void *arg) {
    SuperDotJob &j = *(SuperDotJob *)arg;
    const TypeInfo &t = *find_type(TYPE);
    const int per = t.weights / t.group;
    const int64_t blocks = j.k / t.weights, tile_code_bytes = j.k / LUTLM_STEP * 64 * t.bits;
    std::vector<uint8_t> codes((size_t)(LUTLM_TILE_ROWS * j.k));
    float A[kMaxGroups], B[kMaxGroups];
    int8_t sc[kMaxGroups], m[kMaxGroups];
    bool ok = true;
    for (int64_t tile = j.tiles * task / j.n_tasks; tile < j.tiles * (task + 1) / j.n_tasks; tile++) {
        const int rows = (int)std::min<int64_t>(LUTLM_TILE_ROWS, j.n_rows - tile * LUTLM_TILE_ROWS);
        uint8_t *scales = j.out_scales + tile * blocks * j.super_bytes;
        memset(scales, 0, (size_t)(blocks * j.super_bytes)); /* padded rows: 0 */
        for (int r = 0; r < rows; r++) {
            const int64_t row = tile * LUTLM_TILE_ROWS + r, src = j.row_of ? j.row_of[row] : row;
            const uint8_t *b = j.raw + src * blocks * t.bytes;
            for (int64_t i = 0; i < blocks; i++, b += t.bytes) {
                decode<TYPE>(b, codes.data() + r * j.k + i * t.weights, A, B);
                uint16_t d, dmin;
                ok &= super_fields<TYPE>(b, &d, &dmin, sc, m);
                uint8_t *sb = scales + i * j.super_bytes;
                memcpy(sb + 2 * r, &d, 2);
                memcpy(sb + 32 + 2 * r, &dmin, 2);
                for (int g = 0; g < per; g++) {
                    if (j.scale_kind == LUTLM_SCALES_SUPER_NIBBLE) {
                        sb[64 + 16 * g + r] = (uint8_t)((sc[g] & 15) | (m[g] << 4));
                    } else {
                        sb[64 + 16 * g + r] = (uint8_t)sc[g];
                        if (j.scale_kind == LUTLM_SCALES_SUPER) sb[64 + 16 * (per + g) + r] = (uint8_t)m[g];
                    }
                }
            }
        }
        lutlm_dot_pack_tile(codes.data(), j.k, rows, j.k, j.k, t.bits, j.out_codes + tile * tile_code_bytes);
    }
    if (!ok) j.bad.store(1, std::memory_order_relaxed);
}

TaskFn super_dot_task_for(int type) {
    switch (type) {
        case Q2_K: return run_super_dot<Q2_K>;
        case Q3_K: return run_super_dot<Q3_K>;
        case Q4_K: return run_super_dot<Q4_K>;
        case Q5_K: return run_super_dot<Q5_K>;
        case Q6_K: return run_super_dot<Q6_K>;
    }
    return nullptr;
}

}  // namespace

/* One [n_rows, k] K-quant tensor straight into the dot kernels' layout with super-block scales
 * (lutlm.h): out_codes (lutlm_dot_shape's code_bytes for the type's bits and group) and
 * out_scales (tiles x k / 256 x super_bytes: Q2_K nibbles, Q3_K and Q6_K symmetric, Q4_K and
 * Q5_K sc and m). row_of[r] is the source row of output row r (NULL: the same). The bytes
 * lutlm.kernels.cpu.prepare_super_rows writes from lutlm.formats.gguf_packed.ggml_super's arrays. Returns 0; -1
 * for another type or a k that is not whole blocks; -2 when a dmin = d * zero overflows fp16. */
extern "C" LUTLM_API int lutlm_ggml_super_dot(int type, const uint8_t *raw, int64_t n_rows, int64_t k,
                                              const int64_t *row_of, uint8_t *out_codes, uint8_t *out_scales) {
    const TypeInfo *t = find_type(type);
    const TaskFn fn = super_dot_task_for(type);
    if (!t || !fn || n_rows <= 0 || k <= 0 || k % t->weights) return -1;
    SuperDotJob j;
    j.raw = raw, j.row_of = row_of, j.n_rows = n_rows, j.k = k, j.out_codes = out_codes, j.out_scales = out_scales;
    j.scale_kind = type == Q2_K ? LUTLM_SCALES_SUPER_NIBBLE
                   : type == Q3_K || type == Q6_K ? LUTLM_SCALES_SUPER_SYM : LUTLM_SCALES_SUPER;
    const int per = t->weights / t->group;
    j.super_bytes = 64 + 16 * per * (j.scale_kind == LUTLM_SCALES_SUPER ? 2 : 1);
    j.tiles = (n_rows + LUTLM_TILE_ROWS - 1) / LUTLM_TILE_ROWS;
    j.n_tasks = std::min<int64_t>(j.tiles, 8 * (int64_t)lutlm_get_num_threads());
    lutlm_parallel_for((int)j.n_tasks, fn, &j);
    return j.bad.load() ? -2 : 0;
}

/* x[n] -> fp16 bits, rounding as the decoder does (exported for its tests). */
extern "C" LUTLM_API void lutlm_float_to_half(const float *x, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = f2h(x[i]);
}
