#pragma once
/// \file rankwise/core/config.hpp
/// Configuration macros and the assertion policy.
///
/// RANKWISE_ASSERT(cond, msg) guards invariants that only a bug inside rankwise (or a user who
/// bypasses the public API) can break. Bad user input is never an assert: it throws (core/error.hpp).
///   - default: the standard `assert` (compiled out by NDEBUG);
///   - RANKWISE_THROW_ON_ASSERT defined: throws rankwise::AssertionError, even under NDEBUG
///     (the test suite does this, so that a test can prove the check exists);
///   - define RANKWISE_ASSERT yourself before including rankwise to route it elsewhere.
/// Docs: docs/errors.md

#include <Eigen/Core>

#include <cassert>
#include <stdexcept>
#include <string>

namespace rankwise {

/// Sizes and indices everywhere: the same type as Eigen's.
using Index = Eigen::Index;

/// Thrown by RANKWISE_ASSERT when RANKWISE_THROW_ON_ASSERT is defined.
class AssertionError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

namespace detail {
[[noreturn]] inline void assertion_failed(const char* expr, const char* msg, const char* file, int line) {
  throw AssertionError(std::string(file) + ":" + std::to_string(line) + ": " + msg + " [" + expr + "]");
}
}  // namespace detail

}  // namespace rankwise

#ifndef RANKWISE_ASSERT
#if defined(RANKWISE_THROW_ON_ASSERT)
#define RANKWISE_ASSERT(cond, msg) \
  ((cond) ? static_cast<void>(0) : ::rankwise::detail::assertion_failed(#cond, msg, __FILE__, __LINE__))
#elif defined(NDEBUG)
// sizeof keeps `cond` unevaluated yet "used", so release builds get no unused-variable warnings.
#define RANKWISE_ASSERT(cond, msg) static_cast<void>(sizeof(!(cond)))
#else
#define RANKWISE_ASSERT(cond, msg) assert((cond) && (msg))
#endif
#endif
