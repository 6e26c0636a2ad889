// Tests for rankwise/core/pattern.hpp: whole-path matching, and the patterns PathPattern refuses.
#include <rankwise/core/pattern.hpp>

#include <catch2/catch.hpp>

#include <optional>
#include <string>

TEST_CASE("PathPattern: matches the whole path, as Python's re.fullmatch", "[core][pattern]") {
  std::string error;
  const std::optional<rankwise::PathPattern> p = rankwise::PathPattern::compile(R"(.*\.(q|v)_proj)", error);
  REQUIRE(p);
  CHECK(error.empty());
  CHECK(p->full_match("layers.0.attn.q_proj"));
  CHECK(p->full_match("layers.11.attn.v_proj"));
  CHECK_FALSE(p->full_match("layers.0.attn.k_proj"));
  CHECK_FALSE(p->full_match("layers.0.attn.q_proj.lora_A"));  // a prefix match is not enough
  CHECK_FALSE(p->full_match("q_proj"));
}

TEST_CASE("PathPattern: refuses what it cannot match in linear time, saying why", "[core][pattern][errors]") {
  std::string error;
  CHECK_FALSE(rankwise::PathPattern::compile("(q|v", error));
  CHECK_THAT(error, Catch::Contains("missing )"));
  CHECK_FALSE(rankwise::PathPattern::compile(R"((q)\1)", error));  // backreference
  CHECK_FALSE(error.empty());
  CHECK_FALSE(rankwise::PathPattern::compile("(?=q)q", error));  // lookahead
  CHECK_FALSE(error.empty());
  CHECK(rankwise::PathPattern::compile(std::string(rankwise::max_path_pattern_length, 'a'), error));
  CHECK_FALSE(rankwise::PathPattern::compile(std::string(rankwise::max_path_pattern_length + 1, 'a'), error));
  CHECK_THAT(error, Catch::Contains("4097 characters, more than the 4096 accepted"));
}
