// Runs every file of fuzz/corpus/<target>/ through its fuzz target (fuzz/targets.hpp), the code
// libFuzzer runs, without libFuzzer: the unit-test builds register it with ctest
// (fuzz_corpus_replay), so that the seeds and every input a fuzzing run kept or crashed on (a
// regression input once fixed) run under GCC and under the sanitizer build on every submission.
// Usage: rankwise_fuzz_replay [corpus directory] [target...]   (default: the repository's fuzz/corpus)
// Prints the number of files per target; exits 1 naming each file on which a target failed (an
// exception other than rankwise::Error, or longer than RANKWISE_FUZZ_REPLAY_SECONDS, default 10 s,
// libFuzzer's -timeout in scripts/fuzz.sh), when a target's directory holds no file, or when a
// valid seed of the structured targets (a *.seed file whose name does not begin with "broken_")
// no longer loads anywhere (the format moved on: regenerate the seeds, docs/testing/suite.md).
#include "targets.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#ifndef RANKWISE_FUZZ_CORPUS_DIR
#define RANKWISE_FUZZ_CORPUS_DIR "fuzz/corpus"
#endif

namespace {

std::vector<std::uint8_t> read_all(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Runs one input; an empty string when the target kept its contract, else what went wrong.
std::string run_one(const rankwise::fuzz::Target& target, const std::vector<std::uint8_t>& bytes, double limit_seconds) {
  const auto start = std::chrono::steady_clock::now();
  try {
    target.run(bytes.data(), bytes.size());
  } catch (const std::exception& e) {
    return std::string("an exception escaped the target: ") + e.what();
  } catch (...) {
    return "an exception of an unknown type escaped the target";
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (seconds > limit_seconds) return "took " + std::to_string(seconds) + " s (limit " + std::to_string(limit_seconds) + " s)";
  return {};
}

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path root = argc > 1 ? std::filesystem::path(argv[1]) : std::filesystem::path(RANKWISE_FUZZ_CORPUS_DIR);
  std::vector<std::string_view> selected(argv + std::min(argc, 2), argv + argc);
  const char* limit_env = std::getenv("RANKWISE_FUZZ_REPLAY_SECONDS");
  const double limit = limit_env ? std::atof(limit_env) : 10.0;
  int failures = 0;
  for (const rankwise::fuzz::Target& target : rankwise::fuzz::targets) {
    if (!selected.empty() && std::find(selected.begin(), selected.end(), target.name) == selected.end()) continue;
    const std::filesystem::path dir = root / target.name;
    std::vector<std::filesystem::path> files;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec))
      if (entry.is_regular_file()) files.push_back(entry.path());
    std::sort(files.begin(), files.end());
    if (files.empty()) {
      std::cout << target.name << ": FAILED: no input in " << dir.string() << "\n";
      ++failures;
      continue;
    }
    int failed = 0;
    for (const std::filesystem::path& file : files) {
      const long loads_before = rankwise::fuzz::successful_loads();
      std::string problem = run_one(target, read_all(file), limit);
      const std::string name = file.filename().string();
      if (problem.empty() && file.extension() == ".seed" && name.rfind("broken_", 0) != 0 &&
          rankwise::fuzz::successful_loads() == loads_before)
        problem = "a valid seed that no loader accepts any more (RANKWISE_FUZZ_TRACE=1 says why)";
      if (!problem.empty()) {
        std::cout << target.name << ": FAILED on " << file.string() << ": " << problem << "\n";
        ++failed;
      }
    }
    std::cout << target.name << ": " << files.size() << " files, " << (files.size() - std::size_t(failed)) << " passed\n";
    failures += failed;
  }
  if (failures > 0) {
    std::cout << failures << " failure(s); run the file again with <target>_fuzz <file> (scripts/fuzz.sh builds it)\n";
    return 1;
  }
  std::cout << "every input kept its target's contract\n";
  return 0;
}
