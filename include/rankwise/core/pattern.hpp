#pragma once
/// \file rankwise/core/pattern.hpp
/// Regular expressions over module paths (target_regex, PEFT's target_modules and exclude_modules
/// strings, rank_pattern and alpha_pattern keys), matched against the whole path by RE2: time linear
/// in the path, memory bounded, no recursion on the pattern's nesting. A pattern from a file is
/// untrusted input, and std::regex (backtracking, recursive) can hang or overflow the stack on one.
///
///   PathPattern::compile(p)   the compiled pattern, or the reason it is refused: a syntax error,
///                             more than max_path_pattern_length characters, or a program over the
///                             memory bound
///   full_match(path)          whether the pattern matches the whole of `path`
/// The syntax is RE2's: Python re's and ECMAScript's common core (classes, groups, alternation,
/// repetition); backreferences and lookaround are refused. Docs: docs/conventions.md#patterns

#include <re2/re2.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace rankwise {

/// The longest pattern accepted: far above any module-path pattern, low enough that compiling one
/// costs next to nothing.
inline constexpr std::size_t max_path_pattern_length = 4096;

class PathPattern {
 public:
  /// The compiled pattern, or std::nullopt with the reason in `error`.
  static std::optional<PathPattern> compile(std::string_view pattern, std::string& error) {
    if (pattern.size() > max_path_pattern_length) {
      error = "it has " + std::to_string(pattern.size()) + " characters, more than the " +
              std::to_string(max_path_pattern_length) + " accepted";
      return std::nullopt;
    }
    RE2::Options options;
    options.set_log_errors(false);
    options.set_max_mem(std::int64_t(8) << 20);
    auto re = std::make_shared<const RE2>(re2::StringPiece(pattern.data(), pattern.size()), options);
    if (!re->ok()) {
      error = re->error();
      return std::nullopt;
    }
    return PathPattern(std::move(re));
  }

  /// Whether the pattern matches all of `path`.
  bool full_match(std::string_view path) const {
    return RE2::FullMatch(re2::StringPiece(path.data(), path.size()), *m_re);
  }

 private:
  explicit PathPattern(std::shared_ptr<const RE2> re) : m_re(std::move(re)) {}
  std::shared_ptr<const RE2> m_re;
};

}  // namespace rankwise
