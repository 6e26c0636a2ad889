#pragma once
/// \file rankwise/core/parallel.hpp
/// rankwise's own threads: a product is cut into a fixed number of parts (column blocks of the batch,
/// or row blocks of a weight gradient) that the calling thread and a pool of sleeping workers claim
/// one at a time. The cut depends only on the thread count, so results are bit for bit the same run
/// after run for a given count, whichever thread computes which part. A worker that is not running
/// (the other core is busy) never holds the caller up: the caller claims the parts nobody has taken,
/// so a step is never much slower than with one thread. Idle workers sleep instead of spinning.
///
///   rankwise::set_num_threads(2);   // default 1: everything runs on the calling thread
///
/// Inside a part the Eigen product runs on its thread alone; leave Eigen's own OpenMP threads at 1
/// (Eigen::setNbThreads(1)) when rankwise's are above 1, or the two teams compete for the cores.
/// Docs: docs/core/threads.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/types.hpp>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace rankwise {

namespace detail {

/// Workers that sleep on a condition variable between jobs. A job is `parts` calls of one function;
/// the caller and the workers claim parts through one atomic counter.
class WorkerPool {
 public:
  static WorkerPool& instance() {
    static WorkerPool pool;
    return pool;
  }

  int threads() const { return int(m_workers.size()) + 1; }

  void resize(int threads) {
    stop_workers();
    m_stop = false;
    for (int i = 1; i < threads; ++i) m_workers.emplace_back([this] { work(); });
  }

  /// Runs call(context, p) for p in [0, parts), on the caller and the workers; returns when all are
  /// done. Allocates nothing.
  void run(Index parts, void (*call)(void*, Index), void* context) {
    if (parts <= 0) return;
    if (m_workers.empty() || parts == 1) {  // the same semantics on the calling thread alone
      std::exception_ptr error;
      for (Index p = 0; p < parts; ++p) {
        try {
          call(context, p);
        } catch (...) {
          if (!error) error = std::current_exception();
        }
      }
      if (error) std::rethrow_exception(error);
      return;
    }
    // Callers on several threads of the user's program (two models trained side by side) take turns;
    // a part must not start a job of its own on the pool (it would wait for itself).
    const std::lock_guard<std::mutex> one_job(m_job);
    {
      // A worker that woke late for the previous job may still be leaving it: the job is not changed
      // under it.
      std::unique_lock<std::mutex> lock(m_mutex);
      m_idle.wait(lock, [&] { return m_active == 0; });
      m_call = call;
      m_context = context;
      m_parts = parts;
      m_next.store(0, std::memory_order_relaxed);
      m_done.store(0, std::memory_order_relaxed);
      ++m_generation;
    }
    m_wake.notify_all();
    claim_parts();
    // Wait for parts a worker claimed and is still computing (never for one nobody has claimed).
    if (m_done.load(std::memory_order_acquire) < parts) {
      std::unique_lock<std::mutex> lock(m_mutex);
      m_finished.wait(lock, [&] { return m_done.load(std::memory_order_acquire) >= m_parts; });
    }
    // A part that threw (std::bad_alloc from a product's buffers) is rethrown here, once every part
    // has finished: no thread still uses the caller's data when the exception leaves run().
    std::exception_ptr error;
    {
      std::lock_guard<std::mutex> lock(m_mutex);
      error = std::exchange(m_error, nullptr);
    }
    if (error) std::rethrow_exception(error);
  }

  ~WorkerPool() { stop_workers(); }

 private:
  WorkerPool() = default;

  void claim_parts() {
    for (;;) {
      const Index p = m_next.fetch_add(1, std::memory_order_relaxed);
      if (p >= m_parts) return;
      try {
        m_call(m_context, p);
      } catch (...) {  // kept for the caller; the part counts as done
        std::lock_guard<std::mutex> lock(m_mutex);
        if (!m_error) m_error = std::current_exception();
      }
      if (m_done.fetch_add(1, std::memory_order_acq_rel) + 1 == m_parts) {
        std::lock_guard<std::mutex> lock(m_mutex);  // pairs with the caller's wait
        m_finished.notify_all();
      }
    }
  }

  void work() {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(m_mutex);
        m_wake.wait(lock, [&] { return m_stop || m_generation != seen; });
        if (m_stop) return;
        seen = m_generation;
        ++m_active;  // the job (read under this lock) stays as it is until m_active is 0 again
      }
      claim_parts();
      {
        std::lock_guard<std::mutex> lock(m_mutex);
        if (--m_active == 0) m_idle.notify_all();
      }
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(m_mutex);
      m_stop = true;
    }
    m_wake.notify_all();
    for (std::thread& t : m_workers) t.join();
    m_workers.clear();
  }

  std::vector<std::thread> m_workers;
  std::mutex m_job;  // held by the caller of run() for the whole job
  std::mutex m_mutex;
  std::condition_variable m_wake, m_finished, m_idle;
  bool m_stop = false;
  int m_active = 0;  // workers inside claim_parts()
  std::uint64_t m_generation = 0;
  void (*m_call)(void*, Index) = nullptr;
  void* m_context = nullptr;
  Index m_parts = 0;
  std::exception_ptr m_error;  // the first exception a part threw in the current job
  std::atomic<Index> m_next{0};
  std::atomic<Index> m_done{0};
};

inline std::atomic<int>& configured_threads() {
  static std::atomic<int> threads{1};
  return threads;
}

/// Calls f(p) for p in [0, parts) on rankwise's threads (see the file comment).
template <typename F>
void parallel_parts(Index parts, F&& f) {
  using Fn = std::remove_reference_t<F>;
  WorkerPool::instance().run(parts, [](void* context, Index p) { (*static_cast<Fn*>(context))(p); },
                             const_cast<void*>(static_cast<const void*>(&f)));
}

/// [begin, end) of part p when n items are cut into `parts` nearly equal blocks, each a multiple of
/// `align` long except the last (so that vectorised kernels see whole vectors).
inline std::pair<Index, Index> part_range(Index n, Index parts, Index p, Index align = 16) {
  const Index blocks = (n + align - 1) / align;
  const Index begin = std::min(n, blocks * p / parts * align), end = std::min(n, blocks * (p + 1) / parts * align);
  return {begin, end};
}
}  // namespace detail

/// The number of threads rankwise's layers split their products over (1: none; at most 64). Starts or
/// stops the sleeping workers; call it between steps, not while a layer runs on another thread.
inline void set_num_threads(int threads) {
  if (threads < 1 || threads > 64) detail::fail("rankwise::set_num_threads", "threads must be in [1, 64] (got ", threads, ")");
  if (threads == detail::configured_threads().load()) return;
  detail::WorkerPool::instance().resize(threads);
  detail::configured_threads().store(threads);
}

inline int num_threads() { return detail::configured_threads().load(); }

namespace detail {
/// How many parts a product of `n` columns (or rows) is cut into: one per thread, and none smaller
/// than `min_block` (a smaller product costs more to hand over than it saves).
inline Index parts_for(Index n, Index min_block = 128) {
  const Index threads = num_threads();
  if (threads <= 1) return 1;
  return std::max<Index>(1, std::min<Index>(threads, n / min_block));
}

/// Calls f(begin, count) for each block of [0, n) in that cut, on rankwise's threads: f(0, n) on the
/// calling thread when there is one block (one thread, or a product too small to cut).
template <typename F>
void parallel_blocks(Index n, Index min_block, F&& f) {
  const Index parts = parts_for(n, min_block);
  if (parts == 1) {
    f(Index(0), n);
    return;
  }
  parallel_parts(parts, [&](Index p) {
    const auto [begin, end] = part_range(n, parts, p);
    f(begin, end - begin);
  });
}
}  // namespace detail

}  // namespace rankwise
