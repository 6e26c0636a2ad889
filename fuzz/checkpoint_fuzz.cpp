// libFuzzer program of the target "checkpoint": CheckpointReader and restore().
// The target is rankwise::fuzz::checkpoint (fuzz/targets/checkpoint.hpp), which
// fuzz/replay.cpp also runs on the corpus. Run: scripts/fuzz.sh (clang, libFuzzer, ASan, UBSan).
#include "targets/checkpoint.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return rankwise::fuzz::checkpoint(data, size);
}
