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
 * All tensors are contiguous float32, all memory belongs to the caller (nothing is
 * allocated per call). Each function is compiled three times (AVX-512, AVX2, baseline
 * x86-64) with target_clones; the loader picks one at run time, so the library runs on any
 * x86-64 CPU. The arithmetic follows lutlm/model.py (the reference the tests compare with);
 * only the order of float additions differs.
 *
 * KV cache layout, as lutlm.model.Attention allocates it for batch row 0:
 *     cache[h][s][d]   h < n_kv_heads, s < max_seq, d < head_dim
 * Rotary layout: Hugging Face's rotate_half, pairs (d, d + head_dim / 2), with the model's
 * cos and sin rows of length head_dim for the token's position.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* One query token at position `pos` (q [n_heads][head_dim], k and v [n_kv_heads][head_dim]):
 * rotates q and k in place, stores k and v at `pos` of the caches, and writes the attention
 * output [n_heads][head_dim] over positions 0..pos. `scores` holds pos + 1 floats. Query
 * head h reads key/value head h / (n_heads / n_kv_heads), as grouped-query attention does. */
API CLONES void lutlm_attend_one(float *q, float *k, const float *v, const float *cos, const float *sin,
                                 float *k_cache, float *v_cache, int64_t n_heads, int64_t n_kv_heads,
                                 int64_t head_dim, int64_t max_seq, int64_t pos, float *scores, float *out) {
    const int64_t head_stride = max_seq * head_dim, group = n_heads / n_kv_heads;
    for (int64_t h = 0; h < n_kv_heads; h++) {
        float *kh = k + h * head_dim;
        rotate(kh, cos, sin, head_dim);
        float *kc = k_cache + h * head_stride + pos * head_dim, *vc = v_cache + h * head_stride + pos * head_dim;
        for (int64_t d = 0; d < head_dim; d++) {
            kc[d] = kh[d];
            vc[d] = v[h * head_dim + d];
        }
    }
    const float scale = 1.0f / sqrtf((float)head_dim);
    for (int64_t h = 0; h < n_heads; h++) {
        float *qh = q + h * head_dim, *oh = out + h * head_dim;
        rotate(qh, cos, sin, head_dim);
        const float *keys = k_cache + (h / group) * head_stride, *values = v_cache + (h / group) * head_stride;
        const int64_t n = pos + 1, n4 = n - n % 4;
        for (int64_t s = 0; s < n4; s += 4) dot4(qh, keys + s * head_dim, head_dim, scores + s);
        for (int64_t s = n4; s < n; s++) scores[s] = dot(qh, keys + s * head_dim, head_dim);
        float top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (int64_t s = 0; s < n; s++) {
            scores[s] *= scale;
            top = scores[s] > top ? scores[s] : top;
        }
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t s = 0; s < n; s++) {
            scores[s] = exp_vec(scores[s] - top);
            total += scores[s];
        }
        /* out = sum_s p_s v_s, four positions per pass over the output row; normalized once. */
        for (int64_t d = 0; d < head_dim; d++) oh[d] = 0.0f;
        for (int64_t s = 0; s < n4; s += 4) {
            const float p0 = scores[s], p1 = scores[s + 1], p2 = scores[s + 2], p3 = scores[s + 3];
            const float *v0 = values + s * head_dim, *v1 = v0 + head_dim, *v2 = v1 + head_dim, *v3 = v2 + head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) oh[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
        }
        for (int64_t s = n4; s < n; s++) {
            const float p = scores[s], *vs = values + s * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) oh[d] += p * vs[d];
        }
        const float inv_total = 1.0f / total;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; d++) oh[d] *= inv_total;
    }
}
