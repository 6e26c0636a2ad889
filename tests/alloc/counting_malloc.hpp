// Counts heap allocations of the whole process by replacing malloc and friends (glibc only).
#pragma once

#include <cstddef>

namespace rankwise::test_support {
struct AllocationCount {
  long calls = 0;
  std::size_t bytes = 0;
};
/// Starts counting from zero.
void start_counting_allocations();
/// Stops counting and returns what was counted since start.
AllocationCount stop_counting_allocations();
}  // namespace rankwise::test_support
