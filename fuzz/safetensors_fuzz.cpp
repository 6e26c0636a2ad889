// libFuzzer target: SafetensorsReader on arbitrary bytes. Whatever the input, the reader either
// reads every tensor or throws a rankwise::Error; it never crashes, reads out of bounds, leaks or
// trips an assertion (assertions throw AssertionError here, which the fuzzer reports).
// Run: scripts/fuzz.sh (builds with clang, -fsanitize=fuzzer,address,undefined).
#include <rankwise/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <span>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const rankwise::SafetensorsReader file =
        rankwise::SafetensorsReader::from_bytes(std::span<const unsigned char>(data, size), "fuzz.safetensors");
    for (const rankwise::TensorInfo& t : file.tensors()) {
      if (!rankwise::is_float_dtype(t.dtype)) {
        (void)file.bytes(t.name);
      } else if (t.shape.size() <= 2) {
        (void)file.matrix<float>(t.name);
      } else {
        (void)file.values<double>(t.name);
      }
    }
    (void)file.matrix<float>("not a tensor name");  // always throws FormatError
  } catch (const rankwise::Error&) {
  }
  return 0;
}
