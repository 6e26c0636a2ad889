#pragma once
// The fuzz targets as plain functions, so that the libFuzzer programs (fuzz/<name>_fuzz.cpp) are
// thin wrappers and fuzz/replay.cpp runs the same code on the corpus without libFuzzer.
//
// Contract of every target: for any bytes it returns 0, having either succeeded or caught a
// rankwise::Error (bad input is refused with one). Anything else is a finding: another exception
// escapes the target (rankwise::AssertionError, thrown by RANKWISE_ASSERT under
// RANKWISE_THROW_ON_ASSERT, derives from std::logic_error, not from rankwise::Error, so an
// internal assertion is never taken for a refusal; a broken oracle throws fuzz::Finding), and
// crashes, undefined behaviour, leaks and hangs are caught by the sanitizers and libFuzzer.
//
//   safetensors        SafetensorsReader on the bytes
//   adapter_config     the adapter_config.json parser and PEFT's module rules
//   adapter_directory  a config and a weights file: the PEFT LoRA and VeRA loaders and rankwise's
//                      adapter directory loader
//   checkpoint         checkpoint.json and its tensors file: CheckpointReader and restore()
// The structured inputs (the last two) hold their two parts separated by the line "----8<----".
// Each target lives in fuzz/targets/<name>.hpp, so that a fuzzer compiles its own only.
// Docs: docs/testing/suite.md#fuzzing

#include "targets/adapter_config.hpp"
#include "targets/adapter_directory.hpp"
#include "targets/checkpoint.hpp"
#include "targets/safetensors.hpp"

#include <array>
#include <cstddef>
#include <cstdint>

namespace rankwise::fuzz {

struct Target {
  const char* name;  ///< also the corpus directory fuzz/corpus/<name>/ and the program <name>_fuzz
  int (*run)(const std::uint8_t* data, std::size_t size);
};

inline constexpr std::array<Target, 4> targets = {{
    {"safetensors", &safetensors},
    {"adapter_config", &adapter_config},
    {"adapter_directory", &adapter_directory},
    {"checkpoint", &checkpoint},
}};

}  // namespace rankwise::fuzz
