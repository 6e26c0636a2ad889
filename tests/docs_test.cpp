// The code the docs show is the code of the compiled examples. A docs block announced by
//   <!-- snippet: examples/<file>.cpp#<name> -->
// must equal (up to indentation) the region between two "// [snippet: <name>]" lines of that file.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "support/paths.hpp"

namespace {
namespace fs = std::filesystem;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

std::vector<std::string> trimmed_lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    const auto first = line.find_first_not_of(' ');
    lines.push_back(first == std::string::npos ? std::string() : line.substr(first));
  }
  return lines;
}

std::vector<std::string> region(const fs::path& source, const std::string& name, bool& found) {
  const std::string marker = "// [snippet: " + name + "]";
  std::vector<std::string> out;
  bool inside = false;
  found = false;
  for (const std::string& line : trimmed_lines_of(read_file(source))) {
    if (line == marker) {
      inside = !inside;
      found = true;
    } else if (inside) {
      out.push_back(line);
    }
  }
  return out;
}
}  // namespace

TEST_CASE("docs: every code block taken from an example matches the example", "[docs]") {
  const fs::path root = rankwise::test_support::source_dir();
  std::vector<fs::path> pages = {root / "README.md"};
  for (const auto& entry : fs::recursive_directory_iterator(root / "docs"))
    if (entry.path().extension() == ".md") pages.push_back(entry.path());
  int checked = 0;
  for (const fs::path& page : pages) {
    const std::vector<std::string> lines = trimmed_lines_of(read_file(page));
    for (std::size_t i = 0; i < lines.size(); ++i) {
      const std::string tag = "<!-- snippet: ";
      if (lines[i].rfind(tag, 0) != 0) continue;
      const std::string ref = lines[i].substr(tag.size(), lines[i].find(" -->") - tag.size());
      const std::string file = ref.substr(0, ref.find('#')), name = ref.substr(ref.find('#') + 1);
      INFO(page.string() << ": snippet " << ref);
      REQUIRE(i + 1 < lines.size());
      REQUIRE(lines[i + 1].rfind("```", 0) == 0);
      std::vector<std::string> shown;
      std::size_t j = i + 2;
      for (; j < lines.size() && lines[j].rfind("```", 0) != 0; ++j) shown.push_back(lines[j]);
      bool found = false;
      REQUIRE(fs::exists(root / file));
      const std::vector<std::string> code = region(root / file, name, found);
      CHECK(found);
      CHECK(shown == code);
      ++checked;
      i = j;
    }
  }
  CHECK(checked >= 2);  // the README's own snippets at least
}
