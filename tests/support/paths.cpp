// The one test source that holds absolute paths (support/paths.hpp says why).
#include "support/paths.hpp"

#ifndef RANKWISE_SOURCE_DIR
#error "RANKWISE_SOURCE_DIR must name the repository's root (tests/CMakeLists.txt defines it)"
#endif

namespace rankwise::test_support {

const std::filesystem::path& source_dir() {
  static const std::filesystem::path dir = RANKWISE_SOURCE_DIR;
  return dir;
}

const std::filesystem::path& test_data_dir() {
  static const std::filesystem::path dir = source_dir() / "tests" / "io" / "data";
  return dir;
}

}  // namespace rankwise::test_support
