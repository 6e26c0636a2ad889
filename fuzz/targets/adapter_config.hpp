#pragma once
// Target "adapter_config": the adapter_config.json parser on arbitrary bytes, with PEFT's module
// rules evaluated for a few paths (the input's regular expressions and pattern keys included: RE2,
// linear time, bounded memory). It either returns a config or throws a rankwise::Error.

#include "common.hpp"

#include <rankwise/io/peft_config.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace rankwise::fuzz {

inline int adapter_config(const std::uint8_t* data, std::size_t size) {
  try {
    const PeftConfig config = parse_peft_config(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.json");
    for (const char* path : {"model.layers.0.self_attn.q_proj", "lm_head"}) {
      (void)peft_targets(config, path);
      (void)peft_rank_for(config, path);
      (void)peft_alpha_for(config, path);
    }
  } catch (const Error&) {
  }
  return 0;
}

}  // namespace rankwise::fuzz
