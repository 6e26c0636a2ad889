#pragma once
// What the fuzz targets share: how a finding is raised, how a structured input splits into its
// parts, the per-process scratch directory the file-based targets write into, and snapshots that
// prove a refused load left its target unchanged. See fuzz/targets.hpp for the contract.

#include <rankwise/core/error.hpp>
#include <rankwise/core/types.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <unistd.h>

namespace rankwise::fuzz {

/// A broken oracle: thrown by a target (never caught inside it), so libFuzzer reports a crash and
/// the replay program a failure. Deliberately not a rankwise::Error.
class Finding : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

inline void require(bool ok, const std::string& what) {
  if (!ok) throw Finding(what);
}

/// The line that separates the parts of a structured input: "<config>\n----8<----\n<weights>".
/// The first occurrence splits; without one, the whole input is the first part and the second is
/// empty. Listed in the targets' dictionaries.
inline constexpr std::string_view part_separator = "\n----8<----\n";

struct Parts {
  std::string_view first;
  std::string_view second;
};

inline Parts split_parts(const std::uint8_t* data, std::size_t size) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  const std::size_t at = all.find(part_separator);
  if (at == std::string_view::npos) return {all, {}};
  return {all.substr(0, at), all.substr(at + part_separator.size())};
}

/// A directory of this process's own, made on first use and removed at exit. Each execution
/// overwrites the files it writes; a target that writes files under varying names removes the old
/// ones itself, so that the directory never grows.
class ScratchDirectory {
 public:
  ScratchDirectory() {
    std::string pattern = (std::filesystem::temp_directory_path() / "rankwise-fuzz-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw Finding("fuzz harness: cannot create a temporary directory");
    m_path = pattern;
  }
  ScratchDirectory(const ScratchDirectory&) = delete;
  ScratchDirectory& operator=(const ScratchDirectory&) = delete;
  ~ScratchDirectory() {
    std::error_code ignored;
    std::filesystem::remove_all(m_path, ignored);
  }
  const std::filesystem::path& path() const { return m_path; }

 private:
  std::filesystem::path m_path;
};

/// The scratch subdirectory `name` (one per target, so that targets never see each other's files).
inline std::filesystem::path scratch(const std::string& name) {
  static const ScratchDirectory root;
  const std::filesystem::path dir = root.path() / name;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw Finding("fuzz harness: cannot create " + dir.string() + ": " + ec.message());
  return dir;
}

inline void write_file(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  out.close();
  if (!out) throw Finding("fuzz harness: cannot write " + path.string());
}

/// An adapter's (or optimizer's, or generator's) state as plain values, compared bit for bit (a
/// NaN equals itself when its bits do).
struct Snapshot {
  std::vector<Matrix<float>> matrices;
  std::vector<std::uint64_t> words;

  Snapshot& append(const Snapshot& other) {
    matrices.insert(matrices.end(), other.matrices.begin(), other.matrices.end());
    words.insert(words.end(), other.words.begin(), other.words.end());
    return *this;
  }
  Snapshot& add(const Matrix<float>& m) {
    matrices.push_back(m);
    words.push_back(std::uint64_t(m.rows()));
    words.push_back(std::uint64_t(m.cols()));
    return *this;
  }
  Snapshot& add(double v) {
    words.push_back(std::bit_cast<std::uint64_t>(v));
    return *this;
  }
  Snapshot& add(std::int64_t v) {
    words.push_back(std::uint64_t(v));
    return *this;
  }
  Snapshot& add(bool v) {
    words.push_back(v ? 1 : 0);
    return *this;
  }
  Snapshot& add(const std::string& s) {
    words.push_back(std::hash<std::string>{}(s));
    return *this;
  }

  friend bool operator==(const Snapshot& a, const Snapshot& b) {
    if (a.words != b.words || a.matrices.size() != b.matrices.size()) return false;
    for (std::size_t i = 0; i < a.matrices.size(); ++i) {
      const Matrix<float>& x = a.matrices[i];
      const Matrix<float>& y = b.matrices[i];
      if (x.rows() != y.rows() || x.cols() != y.cols() ||
          std::memcmp(x.data(), y.data(), sizeof(float) * std::size_t(x.size())) != 0)
        return false;
    }
    return true;
  }
};

/// With the environment variable RANKWISE_FUZZ_TRACE set, every load says on stderr whether it
/// succeeded or why it was refused (to see how far a seed gets: RANKWISE_FUZZ_TRACE=1
/// rankwise_fuzz_replay fuzz/corpus checkpoint).
/// The loads that succeeded since the process started (the replay checks that a valid seed still
/// loads: a seed a format change left behind would only exercise the refusals).
inline long& successful_loads() {
  static long count = 0;
  return count;
}

inline void trace(const std::string& what, const char* outcome, const char* detail = "") {
  if (std::string_view(outcome) == "loaded") ++successful_loads();
  static const bool enabled = std::getenv("RANKWISE_FUZZ_TRACE") != nullptr;
  if (enabled) std::fprintf(stderr, "  %s: %s%s%s\n", what.c_str(), outcome, *detail ? ": " : "", detail);
}

/// Runs `load` on input bytes. Returns true when it succeeded; a rankwise::Error is the expected
/// answer to bad input (false), after which `snapshot()` must be what it was before: the loaders
/// promise that a refused load changes nothing. Any other exception propagates as a finding.
template <typename Load, typename Snap>
bool attempt(const std::string& what, Load&& load, Snap&& snapshot) {
  const Snapshot before = snapshot();
  try {
    load();
    trace(what, "loaded");
    return true;
  } catch (const Error& e) {
    trace(what, "refused", e.what());
    if (!(snapshot() == before)) throw Finding(what + " refused the input but changed its target: " + e.what());
    return false;
  }
}

/// Like attempt(), for loaders that do not promise to leave their target unchanged.
template <typename Load>
bool attempt(const std::string& what, Load&& load) {
  return attempt(what, std::forward<Load>(load), [] { return Snapshot{}; });  // an empty snapshot never differs
}

}  // namespace rankwise::fuzz
