// libFuzzer target: the adapter_config.json reader on arbitrary bytes. It either returns a config or
// throws a rankwise::Error; it never crashes, hangs or leaks. Module matching is exercised too, with
// the input's regular expressions and pattern keys (RE2: linear time, bounded memory).
// Run: scripts/fuzz.sh (builds with clang, -fsanitize=fuzzer,address,undefined).
#include <rankwise/io/peft_config.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const rankwise::PeftConfig config =
        rankwise::parse_peft_config(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.json");
    for (const char* path : {"model.layers.0.self_attn.q_proj", "lm_head"}) {
      (void)rankwise::peft_targets(config, path);
      (void)rankwise::peft_rank_for(config, path);
      (void)rankwise::peft_alpha_for(config, path);
    }
  } catch (const rankwise::Error&) {
  }
  return 0;
}
