/* The loops around the tile kernels: activation buffers, blocking and threads.
 *
 * GEMV (one token): threads split the 16-row tiles; when there are few tiles they also
 * split K (each part accumulates into its own buffer, summed at the end). The items go out
 * in kTasksPerThread chunks per thread, taken as threads come free: on a shared machine one
 * thread is often descheduled for a while, and with one chunk each the other would wait.
 * GEMM (a batch): tokens go in blocks of kTokenBlock, whose activation buffers are built
 * first; the K range is cut into slices of kSliceInputs, and each slice's tables of a few
 * tokens at a time stay in L1 while the tiles stream past (see gemm_task), or, for a
 * kernel that walks the tokens itself (tile_batch), each tile's slice of weights stays in
 * L1 while all tokens pass. Threads split tiles.
 */
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "internal.h"

namespace {

constexpr int64_t kTokenBlock = 64; /* tokens whose activation buffers are built at a time */
constexpr int64_t kSliceInputs = 512;
constexpr int64_t kTasksPerThread = 4; /* GEMV chunks per thread (see above) */
constexpr size_t kGemvTableBudget = 24 * 1024; /* activation-buffer bytes per GEMV K slice */
/* Below this many weight bits times tokens a call runs on one thread: waking the pool
 * costs a few microseconds, as much as the whole product. Settable (tests set 0). */
double parallel_work = 8e6;

/* Grow-only 64-byte-aligned scratch memory, one per calling thread. */
struct Scratch {
    void *p = nullptr;
    size_t size = 0;
    ~Scratch() { free(p); }
    void *get(size_t bytes) {
        if (bytes > size) {
            free(p);
            size = lutlm_align64(bytes);
            p = aligned_alloc(64, size);
        }
        return p;
    }
};
thread_local Scratch act_scratch, acc_scratch, x_scratch;

struct Job {
    const Geometry *g;
    const TileKernels *k;
    const float *x;   /* [batch][k] */
    float *xpad;      /* [threads][k_padded] when k < k_padded, else null */
    uint8_t *act;     /* [tokens of the block][act bytes] */
    float *acc;       /* GEMV: [k_parts][tiles * 16];  GEMM: [tiles][tokens][16] */
    int64_t token0, tokens, k_parts, n_tasks;
};

int64_t part_begin(int64_t n, int64_t parts, int64_t i) { return n * i / parts; }

void build_tokens(int task, void *arg) {
    Job &j = *(Job *)arg;
    const lutlm_weight *w = j.g->w;
    for (int64_t t = task; t < j.tokens; t += j.n_tasks) {
        const float *x = j.x + (j.token0 + t) * w->k;
        if (j.xpad) {
            float *xp = j.xpad + (int64_t)task * w->k_padded;
            memcpy(xp, x, w->k * sizeof(float));
            memset(xp + w->k, 0, (w->k_padded - w->k) * sizeof(float));
            x = xp;
        }
        j.k->build(j.g, x, j.act + t * j.g->act.bytes);
    }
}

/* A task's share of the (K part, tile) items, walked in order: tiles within a part. Where
 * the token's activation buffer outgrows kGemvTableBudget (the tables of 2-bit and ternary
 * weights at K = 4096 and more), the part's K range is cut into slices whose tables stay in
 * L1 while the task's tiles pass, instead of streaming all tables from L2 for every tile. */
void gemv_task(int task, void *arg) {
    Job &j = *(Job *)arg;
    const int64_t tiles = j.g->tiles, items = tiles * j.k_parts, n_qblocks = j.g->n_qblocks;
    const int64_t i0 = part_begin(items, j.n_tasks, task), i1 = part_begin(items, j.n_tasks, task + 1);
    const int64_t slices = (int64_t)((j.g->act.bytes + kGemvTableBudget - 1) / kGemvTableBudget);
    const int64_t slice = std::max<int64_t>(1, (n_qblocks + slices - 1) / slices);
    for (int64_t part = i0 / tiles, i = i0; i < i1; part++) {
        const int64_t q0 = part_begin(n_qblocks, j.k_parts, part), q1 = part_begin(n_qblocks, j.k_parts, part + 1);
        const int64_t first = i - part * tiles, last = std::min(tiles, first + (i1 - i));
        float *acc = j.acc + part * tiles * LUTLM_TILE_ROWS;
        for (int64_t qs = q0; qs < q1; qs += slice)
            for (int64_t tile = first; tile < last; tile++)
                j.k->tile(j.g, tile, qs, std::min(q1, qs + slice), j.act, acc + tile * LUTLM_TILE_ROWS);
        i += last - first;
    }
}

/* Loop order: K slice, then groups of LUTLM_GEMM_TOKENS tokens, then the task's tiles. A
 * group's tables for one slice (about 24 KiB at 2 bits) stay in L1 while the tiles'
 * weights for that slice (at most 1 MiB for 4096 rows at 4 bits) stream from L2. With
 * tile_batch: K slice, then tiles, each with all tokens (a tile's slice of 4-bit weights
 * is 4 KiB, the tokens' int8 activations for it 512 bytes each). */
void gemm_task(int task, void *arg) {
    Job &j = *(Job *)arg;
    const TileKernels &k = *j.k;
    const int64_t slice = std::max<int64_t>(1, kSliceInputs / j.g->w->q_block);
    const int64_t t0 = part_begin(j.g->tiles, j.n_tasks, task), t1 = part_begin(j.g->tiles, j.n_tasks, task + 1);
    const size_t act_bytes = j.g->act.bytes;
    const int64_t group = k.tile_tokens ? LUTLM_GEMM_TOKENS : 1;
    for (int64_t q0 = 0; q0 < j.g->n_qblocks; q0 += slice) {
        const int64_t q1 = std::min(j.g->n_qblocks, q0 + slice);
        if (k.tile_batch) {
            for (int64_t tile = t0; tile < t1; tile++)
                k.tile_batch(j.g, tile, q0, q1, j.act, act_bytes, j.tokens, j.acc + tile * j.tokens * LUTLM_TILE_ROWS);
            continue;
        }
        for (int64_t t = 0; t < j.tokens; t += group) {
            const int64_t n = std::min(group, j.tokens - t);
            for (int64_t tile = t0; tile < t1; tile++) {
                float *acc = j.acc + (tile * j.tokens + t) * LUTLM_TILE_ROWS;
                if (n == LUTLM_GEMM_TOKENS && k.tile_tokens) {
                    k.tile_tokens(j.g, tile, q0, q1, j.act + t * act_bytes, act_bytes, acc);
                    continue;
                }
                for (int64_t i = 0; i < n; i++)
                    k.tile(j.g, tile, q0, q1, j.act + (t + i) * act_bytes, acc + i * LUTLM_TILE_ROWS);
            }
        }
    }
}

}  // namespace

extern "C" void lutlm_set_parallel_threshold(double work) { parallel_work = work; }

int lutlm_run_tiled(const Geometry *g, const float *x, int64_t batch, float *y, const TileKernels *k) {
    const lutlm_weight *w = g->w;
    const int64_t tiles = g->tiles;
    const double work = (double)w->n * (double)w->k_padded * w->bits * (double)batch;
    const int threads = work < parallel_work ? 1 : lutlm_get_num_threads();
    const int64_t block = std::min(batch, kTokenBlock);

    Job j = {};
    j.g = g;
    j.k = k;
    j.x = x;
    j.act = (uint8_t *)act_scratch.get(g->act.bytes * block);
    j.xpad = w->k < w->k_padded ? (float *)x_scratch.get(sizeof(float) * w->k_padded * threads) : nullptr;
    /* Split K when rows alone leave threads idle (few tiles, one token). */
    j.k_parts = (batch == 1 && tiles < 4 * threads && g->n_qblocks >= 2 * threads) ? threads : 1;
    const int64_t acc_floats = tiles * LUTLM_TILE_ROWS * (batch == 1 ? j.k_parts : block);
    j.acc = (float *)acc_scratch.get(sizeof(float) * acc_floats);
    for (j.token0 = 0; j.token0 < batch; j.token0 += block) {
        j.tokens = std::min(block, batch - j.token0);
        j.n_tasks = std::min<int64_t>(threads, j.tokens);
        lutlm_parallel_for((int)j.n_tasks, build_tokens, &j);
        memset(j.acc, 0, sizeof(float) * acc_floats);
        if (batch == 1) {
            j.n_tasks = std::min<int64_t>(threads == 1 ? 1 : threads * kTasksPerThread, tiles * j.k_parts);
            lutlm_parallel_for((int)j.n_tasks, gemv_task, &j);
            for (int64_t r = 0; r < w->n; r++) {
                float s = 0.0f;
                for (int64_t p = 0; p < j.k_parts; p++) s += j.acc[p * tiles * LUTLM_TILE_ROWS + r];
                y[r] = s;
            }
        } else {
            j.n_tasks = std::min<int64_t>(threads, tiles);
            lutlm_parallel_for((int)j.n_tasks, gemm_task, &j);
            for (int64_t t = 0; t < j.tokens; t++) {
                float *yt = y + (j.token0 + t) * w->n;
                for (int64_t tile = 0; tile < tiles; tile++) {
                    const int64_t rows = std::min<int64_t>(LUTLM_TILE_ROWS, w->n - tile * LUTLM_TILE_ROWS);
                    memcpy(yt + tile * LUTLM_TILE_ROWS, j.acc + (tile * j.tokens + t) * LUTLM_TILE_ROWS,
                           rows * sizeof(float));
                }
            }
        }
    }
    return 0;
}
