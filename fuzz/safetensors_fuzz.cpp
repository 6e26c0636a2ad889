// libFuzzer program of the target "safetensors": SafetensorsReader on arbitrary bytes.
// The target is rankwise::fuzz::safetensors (fuzz/targets/safetensors.hpp), which
// fuzz/replay.cpp also runs on the corpus. Run: scripts/fuzz.sh (clang, libFuzzer, ASan, UBSan).
#include "targets/safetensors.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return rankwise::fuzz::safetensors(data, size);
}
