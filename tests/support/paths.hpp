// Where the tests find the repository's files: the source tree (docs, benchmark test data) and the
// golden files of the I/O tests (tests/io/data/README.md). The paths are compiled into one small
// translation unit (support/paths.cpp) so that every other test source is the same text in every
// checkout, which lets a compiler cache share their objects between checkouts.
#pragma once

#include <filesystem>

namespace rankwise::test_support {

/// The repository's root directory.
const std::filesystem::path& source_dir();

/// tests/io/data: the golden files of the I/O tests.
const std::filesystem::path& test_data_dir();

}  // namespace rankwise::test_support
