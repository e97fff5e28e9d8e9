/* The non-matmul work of one decode step, fused into a few C calls.
 *
 * A decode step of a Llama layer is seven matrix-vector products (the table-lookup
 * kernels) and, around them, about thirty small element-wise operations. In PyTorch each of
 * those costs several microseconds of dispatch however small the vector, and scaled dot
 * product attention costs over 100 us for one query: on SmolLM2 (30 layers of width 576)
 * that is more than the kernels themselves. Here they are four calls per layer:
 *
 *     lutlm_add_rmsnorm   x += delta; h = rmsnorm(x) * w         (residual + next norm)
 *     lutlm_rmsnorm       h = rmsnorm(x) * w                     (first norm of the step)
 *     lutlm_attend_one    RoPE on q and k, k and v into the cache, attention of one query
 *     lutlm_silu_mul      a = silu(gate) * up
 *
 * All tensors are contiguous float32 (the KV cache float32 or fp16), all memory belongs to
 * the caller (nothing is allocated per call). Each function is compiled three times
 * (AVX-512, AVX2, baseline x86-64) with target_clones; the loader picks one at run time, so
 * the library runs on any x86-64 CPU. The arithmetic follows lutlm/model.py (the reference the tests compare with);
 * only the order of float additions differs.
 *
 * KV cache layout of one sequence, a slot of lutlm.kv_cache.KVCache:
 *     cache[h][s][d]   h < n_kv_heads, s < max_seq, d < head_dim
 * Rotary layout: Hugging Face's rotate_half, pairs (d, d + head_dim / 2), with the model's
 * cos and sin rows of length head_dim for the token's position.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#define API extern "C" __attribute__((visibility("default")))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
/* Helpers must be inlined into each clone to be compiled for its instruction set. */
#define INLINE static inline __attribute__((always_inline))

namespace {

INLINE float sum_squares(const float *x, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    return s;
}

INLINE void scale_by_weight(const float *x, const float *w, float r, int64_t n, float *out) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

INLINE float dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* q . k for four consecutive rows k[0..3][n] at once: four independent sums keep the FMA
 * units busy where one sum would wait on its own latency. */
INLINE void dot4(const float *q, const float *k, int64_t n, float *out) {
    const float *k0 = k, *k1 = k + n, *k2 = k + 2 * n, *k3 = k + 3 * n;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t i = 0; i < n; i++) {
        a0 += q[i] * k0[i];
        a1 += q[i] * k1[i];
        a2 += q[i] * k2[i];
        a3 += q[i] * k3[i];
    }
    out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

/* 16 floats: one AVX-512 register, two AVX2 ones, four SSE ones (GCC >= 12 or Clang vectors). */
typedef float vec16 __attribute__((vector_size(64)));

INLINE vec16 load16(const float *p) {
    vec16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Lane s of the result: the sum of the 16 lanes of a[s]. Four levels, each adding the
 * halves of pairs of vectors side by side, so that 16 dot products cost 15 shuffle pairs
 * and adds instead of 16 separate reductions. */
INLINE vec16 sum_lanes16(const vec16 *a) {
    vec16 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* q . k for 16 consecutive rows k[0..15][HD], HD a multiple of 16. */
template <int HD>
INLINE void dot16(const float *q, const float *k, float *out) {
    vec16 qv[HD / 16], acc[16];
    for (int i = 0; i < HD / 16; i++) qv[i] = load16(q + 16 * i);
    for (int s = 0; s < 16; s++) {
        acc[s] = qv[0] * load16(k + s * HD);
        for (int i = 1; i < HD / 16; i++) acc[s] += qv[i] * load16(k + s * HD + 16 * i);
    }
    const vec16 sums = sum_lanes16(acc);
    memcpy(out, &sums, sizeof sums);
}

/* e^x in float, written so that loops over it vectorize (a call to expf does not): Cephes'
 * expf, e^x = 2^n e^r with n = round(x / ln 2) and |r| <= ln 2 / 2, e^r by a degree-7
 * polynomial. Relative error below 2e-7 (about two ulp, as expf's own one or two); inputs
 * are clamped to [-87.3, 88.3], where 2^n stays a normal float. */
INLINE float exp_vec(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    const float n = floorf(x * 1.44269504f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  /* ln 2 split in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* x <- x * cos + rotate_half(x) * sin, for one head of `dim` values. */
INLINE void rotate(float *x, const float *cos, const float *sin, int64_t dim) {
    const int64_t half = dim / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

}  // namespace

API CLONES void lutlm_rmsnorm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    scale_by_weight(x, weight, 1.0f / sqrtf(sum_squares(x, n) / (float)n + eps), n, out);
}

API CLONES void lutlm_add_rmsnorm(float *x, const float *delta, const float *weight, int64_t n, float eps,
                                  float *out) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) x[i] += delta[i];
    scale_by_weight(x, weight, 1.0f / sqrtf(sum_squares(x, n) / (float)n + eps), n, out);
}

API CLONES void lutlm_silu_mul(const float *gate, const float *up, int64_t n, float *out) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + exp_vec(-gate[i])) * up[i];
}

/* Cached rows as floats: float rows as they are, fp16 ones converted once into `buf` (then
 * used by every query head of the group). */
template <typename T>
INLINE const float *as_float(const T *rows, int64_t count, float *buf) {
    if constexpr (std::is_same_v<T, float>) {
        return rows;
    } else {
        /* 16 at a time with integer operations (the conversion instruction, vcvtph2ps, made
         * this attention twice as slow on Zen 5): exponent and mantissa bits moved into place
         * and rescaled by 2^112, which also handles subnormals (finite values only). */
        typedef uint16_t u16x16 __attribute__((vector_size(32)));
        typedef uint32_t u32x16 __attribute__((vector_size(64)));
        int64_t i = 0;
        for (; i + 16 <= count; i += 16) {
            u16x16 h;
            memcpy(&h, rows + i, sizeof h);
            const u32x16 w = __builtin_convertvector(h, u32x16);
            const u32x16 magnitude = (w & 0x7fffu) << 13;
            vec16 f;
            memcpy(&f, &magnitude, sizeof f);
            f *= 0x1p112f;
            u32x16 bits;
            memcpy(&bits, &f, sizeof bits);
            bits |= (w & 0x8000u) << 16;
            memcpy(buf + i, &bits, sizeof bits);
        }
        for (; i < count; i++) buf[i] = (float)rows[i];
        return buf;
    }
}

constexpr int64_t MAX_HEAD_DIM = 256;  /* the largest head size: the buffer of widened fp16 rows */

/* One query token at position `pos` (q [n_heads][head_dim], k and v [n_kv_heads][head_dim]):
 * rotates q and k in place, stores k and v at `pos` of the caches (T: float or _Float16),
 * and writes the attention output [n_heads][head_dim] over positions 0..pos. Query head h
 * reads key/value head h / (n_heads / n_kv_heads), as grouped-query attention does; the
 * query heads of one key/value head are taken together, so that each cached row is read
 * from memory (and widened from fp16) once for all of them. `scores` holds
 * (n_heads / n_kv_heads) * (pos + 1) floats; head_dim is at most MAX_HEAD_DIM. */
template <int HD, typename T>
INLINE void attend(float *q, float *k, const float *v, const float *cos, const float *sin, T *k_cache, T *v_cache,
                   int64_t n_heads, int64_t n_kv_heads, int64_t head_dim_arg, int64_t max_seq, int64_t pos,
                   float *scores, float *out) {
    const int64_t head_dim = HD ? HD : head_dim_arg;
    const int64_t head_stride = max_seq * head_dim, group = n_heads / n_kv_heads;
    const int64_t n = pos + 1, n4 = n - n % 4;
    const float scale = 1.0f / sqrtf((float)head_dim);
    float buf[16 * MAX_HEAD_DIM];
    for (int64_t h = 0; h < n_heads; h++) rotate(q + h * head_dim, cos, sin, head_dim);
    for (int64_t g = 0; g < n_kv_heads; g++) {
        float *kh = k + g * head_dim;
        rotate(kh, cos, sin, head_dim);
        const T *keys = k_cache + g * head_stride, *values = v_cache + g * head_stride;
        T *kc = k_cache + g * head_stride + pos * head_dim, *vc = v_cache + g * head_stride + pos * head_dim;
        for (int64_t d = 0; d < head_dim; d++) {
            kc[d] = (T)kh[d];
            vc[d] = (T)v[g * head_dim + d];
        }
        const float *qg = q + g * group * head_dim;
        float *og = out + g * group * head_dim;
        /* Scores: blocks of 16 cached rows (4 where the head size is not templated, then single
         * rows), each block against every query head of the group while it is in L1. */
        int64_t done = 0;
        if constexpr (HD % 16 == 0 && HD > 0) {
            for (; done + 16 <= n; done += 16) {
                const float *rows = as_float(keys + done * HD, 16 * HD, buf);
                for (int64_t j = 0; j < group; j++) dot16<HD>(qg + j * HD, rows, scores + j * n + done);
            }
        }
        for (int64_t s = done; s + 4 <= n; s += 4) {
            const float *rows = as_float(keys + s * head_dim, 4 * head_dim, buf);
            for (int64_t j = 0; j < group; j++) dot4(qg + j * head_dim, rows, head_dim, scores + j * n + s);
        }
        for (int64_t s = n4; s < n; s++) {
            const float *row = as_float(keys + s * head_dim, head_dim, buf);
            for (int64_t j = 0; j < group; j++) scores[j * n + s] = dot(qg + j * head_dim, row, head_dim);
        }
        for (int64_t j = 0; j < group; j++) {
            float *sj = scores + j * n, top = -INFINITY, total = 0.0f;
#pragma omp simd reduction(max : top)
            for (int64_t s = 0; s < n; s++) {
                sj[s] *= scale;
                top = sj[s] > top ? sj[s] : top;
            }
#pragma omp simd reduction(+ : total)
            for (int64_t s = 0; s < n; s++) {
                sj[s] = exp_vec(sj[s] - top);
                total += sj[s];
            }
            const float inv_total = 1.0f / total;  /* normalized here: the outputs need no second pass */
#pragma omp simd
            for (int64_t s = 0; s < n; s++) sj[s] *= inv_total;
        }
        /* out = sum_s p_s v_s, four positions per pass over each output row. */
        for (int64_t d = 0; d < group * head_dim; d++) og[d] = 0.0f;
        for (int64_t s = 0; s < n4; s += 4) {
            const float *v0 = as_float(values + s * head_dim, 4 * head_dim, buf), *v1 = v0 + head_dim,
                        *v2 = v1 + head_dim, *v3 = v2 + head_dim;
            for (int64_t j = 0; j < group; j++) {
                const float *p = scores + j * n + s;
                const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
                float *__restrict oj = og + j * head_dim;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) oj[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
            }
        }
        for (int64_t s = n4; s < n; s++) {
            const float *vs = as_float(values + s * head_dim, head_dim, buf);
            for (int64_t j = 0; j < group; j++) {
                const float p = scores[j * n + s];
                float *__restrict oj = og + j * head_dim;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) oj[d] += p * vs[d];
            }
        }
    }
}

/* The common head sizes with the size known at compile time: their loops unroll into registers. */
template <typename T>
INLINE void attend_any(float *q, float *k, const float *v, const float *cos, const float *sin, T *k_cache, T *v_cache,
                       int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t max_seq, int64_t pos,
                       float *scores, float *out) {
    if (head_dim == 64) attend<64>(q, k, v, cos, sin, k_cache, v_cache, n_heads, n_kv_heads, head_dim, max_seq, pos, scores, out);
    else if (head_dim == 128) attend<128>(q, k, v, cos, sin, k_cache, v_cache, n_heads, n_kv_heads, head_dim, max_seq, pos, scores, out);
    else attend<0>(q, k, v, cos, sin, k_cache, v_cache, n_heads, n_kv_heads, head_dim, max_seq, pos, scores, out);
}

API CLONES void lutlm_attend_one(float *q, float *k, const float *v, const float *cos, const float *sin,
                                 float *k_cache, float *v_cache, int64_t n_heads, int64_t n_kv_heads,
                                 int64_t head_dim, int64_t max_seq, int64_t pos, float *scores, float *out) {
    attend_any(q, k, v, cos, sin, k_cache, v_cache, n_heads, n_kv_heads, head_dim, max_seq, pos, scores, out);
}

/* The same over a cache of fp16 values (half the bytes to read at long contexts). */
API CLONES void lutlm_attend_one_f16(float *q, float *k, const float *v, const float *cos, const float *sin,
                                     _Float16 *k_cache, _Float16 *v_cache, int64_t n_heads, int64_t n_kv_heads,
                                     int64_t head_dim, int64_t max_seq, int64_t pos, float *scores, float *out) {
    attend_any(q, k, v, cos, sin, k_cache, v_cache, n_heads, n_kv_heads, head_dim, max_seq, pos, scores, out);
}

/* ---- Several sequences per step (the serving engine's batch) ----
 * Row r of x, q, k, v and out is sequence r's; each row is computed exactly as the one-row
 * functions above compute it, so that a sequence's step does not depend on its batch. */

API CLONES void lutlm_rmsnorm_rows(const float *x, const float *weight, int64_t rows, int64_t n, float eps,
                                   float *out) {
    for (int64_t r = 0; r < rows; r++)
        scale_by_weight(x + r * n, weight, 1.0f / sqrtf(sum_squares(x + r * n, n) / (float)n + eps), n, out + r * n);
}

API CLONES void lutlm_add_rmsnorm_rows(float *x, const float *delta, const float *weight, int64_t rows, int64_t n,
                                       float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * n;
        const float *dr = delta + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) xr[i] += dr[i];
        scale_by_weight(xr, weight, 1.0f / sqrtf(sum_squares(xr, n) / (float)n + eps), n, out + r * n);
    }
}

/* Row r attends at positions[r] over its own cache slot slots[r]: slot s of a cache starts
 * s * slot_stride values in ([n_kv_heads][max_seq][head_dim] each, as lutlm.kv_cache lays it
 * out). cos and sin: tables [max_seq][head_dim]. `scores` holds (n_heads / n_kv_heads) * max_seq
 * floats, reused row after row. */
template <typename T>
INLINE void attend_rows(float *q, float *k, const float *v, const float *cos_table, const float *sin_table,
                        T *k_cache, T *v_cache, int64_t slot_stride, const int64_t *slots, const int64_t *positions,
                        int64_t rows, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t max_seq,
                        float *scores, float *out) {
    const int64_t q_width = n_heads * head_dim, kv_width = n_kv_heads * head_dim;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t pos = positions[r], slot = slots[r];
        attend_any(q + r * q_width, k + r * kv_width, v + r * kv_width, cos_table + pos * head_dim,
                   sin_table + pos * head_dim, k_cache + slot * slot_stride, v_cache + slot * slot_stride, n_heads,
                   n_kv_heads, head_dim, max_seq, pos, scores, out + r * q_width);
    }
}

API CLONES void lutlm_attend_rows(float *q, float *k, const float *v, const float *cos_table, const float *sin_table,
                                  float *k_cache, float *v_cache, int64_t slot_stride, const int64_t *slots,
                                  const int64_t *positions, int64_t rows, int64_t n_heads, int64_t n_kv_heads,
                                  int64_t head_dim, int64_t max_seq, float *scores, float *out) {
    attend_rows(q, k, v, cos_table, sin_table, k_cache, v_cache, slot_stride, slots, positions, rows, n_heads,
                n_kv_heads, head_dim, max_seq, scores, out);
}

API CLONES void lutlm_attend_rows_f16(float *q, float *k, const float *v, const float *cos_table,
                                      const float *sin_table, _Float16 *k_cache, _Float16 *v_cache,
                                      int64_t slot_stride, const int64_t *slots, const int64_t *positions,
                                      int64_t rows, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                                      int64_t max_seq, float *scores, float *out) {
    attend_rows(q, k, v, cos_table, sin_table, k_cache, v_cache, slot_stride, slots, positions, rows, n_heads,
                n_kv_heads, head_dim, max_seq, scores, out);
}
