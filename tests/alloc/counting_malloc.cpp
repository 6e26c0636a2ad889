// Replaces the C allocation functions of the test program with counting wrappers around glibc's own
// (__libc_*), so that every heap allocation is seen: operator new, Eigen's aligned_malloc, everything.
#include "alloc/counting_malloc.hpp"

#include <execinfo.h>

#include <atomic>
#include <cerrno>
#include <cstddef>

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
}

namespace {
std::atomic<bool> g_counting{false};
std::atomic<long> g_calls{0};
std::atomic<std::size_t> g_bytes{0};
std::atomic<bool> g_keep_stacks{false};
constexpr long kMaxStacks = 4096;
rankwise::test_support::AllocationStack g_stacks[kMaxStacks];
std::atomic<long> g_stack_count{0};
thread_local bool t_in_backtrace = false;  // backtrace() must not count (or record) itself

void note(std::size_t bytes) {
  if (!g_counting.load(std::memory_order_relaxed) || t_in_backtrace) return;
  g_calls.fetch_add(1, std::memory_order_relaxed);
  g_bytes.fetch_add(bytes, std::memory_order_relaxed);
  if (!g_keep_stacks.load(std::memory_order_relaxed)) return;
  const long i = g_stack_count.fetch_add(1, std::memory_order_relaxed);
  if (i >= kMaxStacks) return;
  t_in_backtrace = true;
  g_stacks[i].depth = backtrace(g_stacks[i].frames, rankwise::test_support::AllocationStack::capacity);
  g_stacks[i].bytes = bytes;
  t_in_backtrace = false;
}
}  // namespace

extern "C" {
void* malloc(std::size_t n) {
  note(n);
  return __libc_malloc(n);
}
void* calloc(std::size_t count, std::size_t n) {
  note(count * n);
  return __libc_calloc(count, n);
}
void* realloc(void* p, std::size_t n) {
  note(n);
  return __libc_realloc(p, n);
}
void* memalign(std::size_t alignment, std::size_t n) {
  note(n);
  return __libc_memalign(alignment, n);
}
void* aligned_alloc(std::size_t alignment, std::size_t n) {
  note(n);
  return __libc_memalign(alignment, n);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t n) {
  note(n);
  void* p = __libc_memalign(alignment, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
void free(void* p) { __libc_free(p); }
}

namespace rankwise::test_support {
void start_counting_allocations(bool keep_stacks) {
  if (keep_stacks) {  // the first backtrace() loads the unwinder, which allocates: do it before counting
    void* warm[4];
    backtrace(warm, 4);
  }
  g_calls = 0;
  g_bytes = 0;
  g_stack_count = 0;
  g_keep_stacks = keep_stacks;
  g_counting = true;
}
AllocationCount stop_counting_allocations() {
  g_counting = false;
  g_keep_stacks = false;
  return {g_calls.load(), g_bytes.load()};
}
std::span<const AllocationStack> counted_stacks() {
  const long n = g_stack_count.load() < kMaxStacks ? g_stack_count.load() : kMaxStacks;
  return {g_stacks, static_cast<std::size_t>(n)};
}
}  // namespace rankwise::test_support
