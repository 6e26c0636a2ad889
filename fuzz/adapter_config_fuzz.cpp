// libFuzzer program of the target "adapter_config": the adapter_config.json parser.
// The target is rankwise::fuzz::adapter_config (fuzz/targets/adapter_config.hpp), which
// fuzz/replay.cpp also runs on the corpus. Run: scripts/fuzz.sh (clang, libFuzzer, ASan, UBSan).
#include "targets/adapter_config.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return rankwise::fuzz::adapter_config(data, size);
}
