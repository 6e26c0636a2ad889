// libFuzzer program of the target "adapter_directory": the adapter directory loaders.
// The target is rankwise::fuzz::adapter_directory (fuzz/targets/adapter_directory.hpp), which
// fuzz/replay.cpp also runs on the corpus. Run: scripts/fuzz.sh (clang, libFuzzer, ASan, UBSan).
#include "targets/adapter_directory.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return rankwise::fuzz::adapter_directory(data, size);
}
