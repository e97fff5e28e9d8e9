/* Memory read bandwidth, measured the way the kernels read weights: every thread streams
 * its share of one buffer with 64-byte vector loads. The bench reports it beside each
 * kernel's effective weight bytes per second. */
#include <chrono>
#include <stdlib.h>
#include <string.h>

#include <immintrin.h>

#include "internal.h"

namespace {

struct Stream {
    const uint8_t *buf;
    int64_t bytes;
    int parts;
    __m128i sink[64]; /* per task, so the loads are not optimized away */
};

void read_part(int task, void *arg) {
    Stream &s = *(Stream *)arg;
    const int64_t begin = s.bytes * task / s.parts & ~(int64_t)63, end = s.bytes * (task + 1) / s.parts & ~(int64_t)63;
    __m128i a = _mm_setzero_si128(), b = a, c = a, d = a;
    for (int64_t i = begin; i < end; i += 64) {
        a = _mm_xor_si128(a, _mm_load_si128((const __m128i *)(s.buf + i)));
        b = _mm_xor_si128(b, _mm_load_si128((const __m128i *)(s.buf + i + 16)));
        c = _mm_xor_si128(c, _mm_load_si128((const __m128i *)(s.buf + i + 32)));
        d = _mm_xor_si128(d, _mm_load_si128((const __m128i *)(s.buf + i + 48)));
    }
    s.sink[task % 64] = _mm_xor_si128(_mm_xor_si128(a, b), _mm_xor_si128(c, d));
}

}  // namespace

extern "C" double lutlm_read_bandwidth(int64_t bytes, int repeats) {
    bytes = (int64_t)lutlm_align64((size_t)bytes);
    uint8_t *buf = (uint8_t *)aligned_alloc(64, (size_t)bytes);
    if (!buf) return -1.0;
    memset(buf, 1, (size_t)bytes);
    Stream s = {buf, bytes, lutlm_get_num_threads(), {}};
    double best = 1e30;
    for (int r = 0; r < repeats + 1; r++) { /* the first pass warms up */
        const auto t0 = std::chrono::steady_clock::now();
        lutlm_parallel_for(s.parts, read_part, &s);
        const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (r > 0 && dt < best) best = dt;
    }
    free(buf);
    return (double)bytes / best;
}
