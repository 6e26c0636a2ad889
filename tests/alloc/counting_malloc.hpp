// Counts heap allocations of the whole process by replacing malloc and friends (glibc only).
#pragma once

#include <cstddef>
#include <span>

namespace rankwise::test_support {
struct AllocationCount {
  long calls = 0;
  std::size_t bytes = 0;
};
/// The call stack of one counted allocation (return addresses, innermost first).
struct AllocationStack {
  static constexpr int capacity = 32;
  void* frames[capacity] = {};
  int depth = 0;
  std::size_t bytes = 0;
};
/// Starts counting from zero. With keep_stacks, the call stacks of the first 4096 counted
/// allocations are kept too (see counted_stacks()), so that a caller can attribute them.
void start_counting_allocations(bool keep_stacks = false);
/// Stops counting and returns what was counted since start.
AllocationCount stop_counting_allocations();
/// The stacks kept since the last start with keep_stacks (valid until the next start).
std::span<const AllocationStack> counted_stacks();
}  // namespace rankwise::test_support
