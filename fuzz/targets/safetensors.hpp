#pragma once
// Target "safetensors": SafetensorsReader on arbitrary bytes. The reader either reads every tensor
// or throws a rankwise::Error; it never crashes, reads out of bounds, leaks or trips an assertion.

#include "common.hpp"

#include <rankwise/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <span>

namespace rankwise::fuzz {

inline int safetensors(const std::uint8_t* data, std::size_t size) {
  try {
    const SafetensorsReader file = SafetensorsReader::from_bytes(std::span<const unsigned char>(data, size), "fuzz.safetensors");
    for (const TensorInfo& t : file.tensors()) {
      if (!is_float_dtype(t.dtype)) {
        require(file.bytes(t.name).size() == t.byte_size(), "safetensors: bytes() of '" + t.name + "' has another size than its header");
      } else if (t.shape.size() <= 2) {
        (void)file.matrix<float>(t.name);
      } else {
        (void)file.values<double>(t.name);
      }
    }
    (void)file.matrix<float>("not a tensor name");  // throws FormatError, unless the input has such a tensor
  } catch (const Error&) {
  }
  return 0;
}

}  // namespace rankwise::fuzz
