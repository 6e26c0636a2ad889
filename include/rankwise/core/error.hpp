#pragma once
/// \file rankwise/core/error.hpp
/// What rankwise throws. Every exception derives from rankwise::Error, and its message reads
/// "[where] what must hold (got what was seen)", e.g.
///   [rankwise::LoRA] rank must be in [1, min(in, out)] = [1, 64] (got 0)
///
///   InvalidArgument  bad options, shapes or indices from the caller
///   StateError       a call in the wrong state (backward() before forward(), merge() twice, ...)
///   FormatError      bytes on disk or in a buffer that are not what the reader expects
///   IoError          the operating system refused (open, write, rename)
/// Numerical outcomes (a NaN loss, a budget that cannot be met) are reported as a Status instead.
/// Docs: docs/errors.md

#include <rankwise/core/config.hpp>

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace rankwise {

/// Root of every exception rankwise throws: `catch (const rankwise::Error&)` catches them all.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Bad options, shapes, names or indices passed by the caller.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// A call made in a state that does not allow it.
class StateError : public Error {
 public:
  using Error::Error;
};

/// Bytes that are not what the reader expects (truncated, corrupted or hostile files).
class FormatError : public Error {
 public:
  using Error::Error;
};

/// The operating system refused an operation on a path.
class IoError : public Error {
 public:
  using Error::Error;
};

/// Outcome of a numerical operation that may legitimately fail (never used for bad input).
enum class Status {
  Ok,          ///< the operation did what it was asked
  NonFinite,   ///< a NaN or infinity was met; nothing was changed
  NotApplied,  ///< the operation was configured but never had the chance to act
};

/// Human-readable name of a Status.
inline const char* to_string(Status s) noexcept {
  switch (s) {
    case Status::Ok: return "Ok";
    case Status::NonFinite: return "NonFinite";
    case Status::NotApplied: return "NotApplied";
  }
  return "Unknown";
}

namespace detail {
/// Throws E("[where] " + parts...). Keep `where` a qualified name such as "rankwise::LoRA".
template <typename E = InvalidArgument, typename... Parts>
[[noreturn]] void fail(const char* where, Parts&&... parts) {
  std::ostringstream os;
  os.precision(9);
  os << '[' << where << "] ";
  (os << ... << std::forward<Parts>(parts));
  throw E(os.str());
}
}  // namespace detail

}  // namespace rankwise
