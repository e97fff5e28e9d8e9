/* A small persistent thread pool for the kernels.
 *
 * Its own pthreads rather than OpenMP: PyTorch ships its own OpenMP runtime, and a second
 * one in the same process would keep a second set of spinning threads. Workers spin for a
 * short while after each job (a model runs hundreds of matmuls back to back, and waking a
 * sleeping thread costs several microseconds), then sleep, so that between calls they do
 * not take the cores from PyTorch's own threads. The caller takes tasks too, and a job
 * waits only for the workers that joined it before the caller took its last task (run).
 */
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include <immintrin.h>

#include "internal.h"

namespace {

constexpr auto kSpin = std::chrono::microseconds(50);

class Pool {
public:
    ~Pool() { resize(1); }

    int size() const { return n_threads_; }

    void resize(int n_threads) {
        if (n_threads < 1) n_threads = 1;
        if (n_threads == n_threads_) return;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
            generation_.fetch_add(1);
        }
        wake_.notify_all();
        for (auto &t : workers_) t.join();
        workers_.clear();
        stop_ = false;
        n_threads_ = n_threads;
        /* A worker starts from the generation current now, not when it first runs, so
         * that a job or a resize posted before it runs is not missed. */
        const uint64_t start = generation_.load();
        for (int i = 1; i < n_threads; i++) workers_.emplace_back([this, start] { work(start); });
    }

    /* A job is open to workers until the caller has taken its last task: a worker joins it
     * only while it is open, and the caller then waits for the workers that joined, not for
     * all of them. On a shared machine a worker is often descheduled for a while; waiting
     * for it to check out of a job whose tasks the caller already ran stalled every product
     * for as long (2-thread decode under outside load). */
    void run(int n_tasks, TaskFn fn, void *arg) {
        if (workers_.empty() || n_tasks <= 1) {
            for (int i = 0; i < n_tasks; i++) fn(i, arg);
            return;
        }
        std::lock_guard<std::mutex> serialize(run_mutex_);
        fn_ = fn;
        arg_ = arg;
        n_tasks_ = n_tasks;
        next_task_.store(0);
        done_.store(0);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            const uint64_t job = generation_.load() + 1;
            gate_.store(job_tag(job), std::memory_order_release); /* open, none joined */
            generation_.store(job, std::memory_order_release);
        }
        wake_.notify_all();
        take_tasks();
        const uint64_t joined = gate_.fetch_or(kClosed, std::memory_order_acq_rel) & kJoinedMask;
        while (done_.load(std::memory_order_acquire) != joined) _mm_pause();
    }

private:
    void take_tasks() {
        for (int i; (i = next_task_.fetch_add(1)) < n_tasks_;) fn_(i, arg_);
    }

    /* The gate: the job's generation in the high 32 bits, kClosed, and the count of
     * workers that joined in the low bits. */
    static constexpr uint64_t kClosed = 1ull << 31, kJoinedMask = kClosed - 1;
    static uint64_t job_tag(uint64_t generation) { return generation << 32; }

    /* Joins job `generation` if it is still open; the job's fields are read only then. */
    void join(uint64_t generation) {
        uint64_t gate = gate_.load(std::memory_order_acquire);
        while ((gate & ~kJoinedMask) == job_tag(generation)) {
            if (gate_.compare_exchange_weak(gate, gate + 1, std::memory_order_acq_rel)) {
                take_tasks();
                done_.fetch_add(1, std::memory_order_release);
                return;
            }
        }
    }

    void work(uint64_t seen) {
        for (;;) {
            const auto start = std::chrono::steady_clock::now();
            while (generation_.load(std::memory_order_acquire) == seen &&
                   std::chrono::steady_clock::now() - start < kSpin)
                _mm_pause();
            if (generation_.load(std::memory_order_acquire) == seen) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_.load() != seen; });
            }
            seen = generation_.load(std::memory_order_acquire);
            if (stop_) return;
            join(seen);
        }
    }

    std::vector<std::thread> workers_;
    int n_threads_ = 1;
    std::mutex mutex_, run_mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0}, gate_{kClosed};
    std::atomic<int> next_task_{0};
    std::atomic<uint64_t> done_{0};
    bool stop_ = false;
    TaskFn fn_ = nullptr;
    void *arg_ = nullptr;
    int n_tasks_ = 0;
};

Pool &pool() {
    static Pool p;
    return p;
}

}  // namespace

void lutlm_parallel_for(int n_tasks, TaskFn fn, void *arg) { pool().run(n_tasks, fn, arg); }

extern "C" void lutlm_set_num_threads(int n) { pool().resize(n); }

extern "C" int lutlm_get_num_threads(void) { return pool().size(); }
