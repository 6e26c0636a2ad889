// libFuzzer target: the adapter_config.json reader on arbitrary bytes. It either returns a config or
// throws a rankwise::Error; it never crashes or leaks. Module matching by list is exercised too
// (regular expressions from the input are not compiled: std::regex has no complexity bound).
// Run: scripts/fuzz.sh (builds with clang, -fsanitize=fuzzer,address,undefined).
#include <rankwise/io/peft_config.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const rankwise::PeftConfig config =
        rankwise::parse_peft_config(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.json");
    if (!config.target_modules_regex && !config.exclude_modules_regex)
      (void)rankwise::peft_targets(config, "model.layers.0.self_attn.q_proj");
  } catch (const rankwise::Error&) {
  }
  return 0;
}
