#pragma once
/// \file rankwise/version.hpp
/// The library version: the single source of truth, read by CMakeLists.txt.

#define RANKWISE_VERSION_MAJOR 0
#define RANKWISE_VERSION_MINOR 1
#define RANKWISE_VERSION_PATCH 0

namespace rankwise {
/// "MAJOR.MINOR.PATCH" of the headers in use.
inline constexpr const char* version_string = "0.1.0";
}  // namespace rankwise
