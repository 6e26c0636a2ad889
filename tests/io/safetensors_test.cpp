// Tests for rankwise/io/safetensors.hpp and rankwise/io/atomic_file.hpp (and io/detail/: header, half, transpose).
#include <rankwise/io/safetensors.hpp>

#include "support/matchers.hpp"
#include "support/temp_dir.hpp"
#include "support/paths.hpp"

#include <catch2/catch.hpp>

#include <Eigen/Core>

#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>


using rankwise::DType;
using rankwise::FormatError;
using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::SafetensorsReader;
using rankwise::SafetensorsWriter;
using rankwise::test_support::random_matrix;
using rankwise::test_support::same_bits;
using rankwise::test_support::test_data_dir;
using rankwise::test_support::read_bytes;
using rankwise::test_support::TempDir;
using Catch::Contains;

namespace fs = std::filesystem;

namespace {




// A file made by hand: the length prefix (by default the header's size), the header, the data.
std::vector<unsigned char> craft(const std::string& header, std::size_t data_bytes = 0,
                                 std::optional<std::uint64_t> length = {}) {
  const std::uint64_t n = length.value_or(header.size());
  std::vector<unsigned char> out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<unsigned char>(n >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data_bytes, 0);
  return out;
}

SafetensorsReader open_bytes(const std::vector<unsigned char>& bytes) {
  return SafetensorsReader::from_bytes(bytes, "crafted.safetensors");
}


}  // namespace

// --- golden files -------------------------------------------------------------------------------

TEST_CASE("SafetensorsReader: reads every kind of tensor of a golden file", "[io][safetensors]") {
  SafetensorsReader file(test_data_dir() / "basic.safetensors");
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.metadata().at("note") == "golden");
  REQUIRE(file.size() == 5);
  // Offset order of the reference writer: I64, F64, then F32 by name.
  CHECK(file.tensors()[0].name == "counts");
  CHECK(file.tensors()[1].name == "precise");
  CHECK(file.tensors()[2].name == "bias");
  CHECK(file.tensors()[4].name == "weight");
  CHECK(file.data_start() % 8 == 0);

  const Matrix<float> w = file.matrix<float>("weight");  // file [[1, 2, 3], [4, 5, 6]]
  REQUIRE(w.rows() == 2);
  REQUIRE(w.cols() == 3);
  for (Index i = 0; i < 2; ++i)
    for (Index j = 0; j < 3; ++j) CHECK(w(i, j) == float(3 * i + j + 1));

  const Matrix<double> b = file.matrix<double>("bias");
  REQUIRE(b.rows() == 3);
  REQUIRE(b.cols() == 1);
  CHECK(b(0) == 0.5);
  CHECK(b(1) == -1.25);
  CHECK(b(2) == 3.0);
  const Matrix<float> s = file.matrix<float>("scale");
  CHECK(s.rows() == 1);
  CHECK(s.cols() == 1);
  CHECK(s(0, 0) == 2.5f);
  CHECK(file.info("scale").shape.empty());

  const Matrix<double> p = file.matrix<double>("precise");
  CHECK(p(0, 0) == 1.0 / 3.0);
  CHECK(p(0, 1) == 2.0 / 3.0);
  CHECK(p(1, 0) == -1e-300);
  CHECK(p(1, 1) == 1e300);
  CHECK(file.matrix<float>("precise")(0, 0) == float(1.0 / 3.0));  // F64 -> float rounds once

  CHECK(file.info("counts").dtype == DType::I64);
  const std::vector<unsigned char> counts = file.bytes("counts");
  REQUIRE(counts.size() == 16);
  std::int64_t c[2];
  std::memcpy(c, counts.data(), 16);
  CHECK(c[0] == 7);
  CHECK(c[1] == -3);
}

TEST_CASE("SafetensorsWriter: reproduces the golden file byte for byte", "[io][safetensors]") {
  Matrix<float> weight(2, 3);
  weight << 1, 2, 3, 4, 5, 6;
  Matrix<float> bias(3, 1);
  bias << 0.5f, -1.25f, 3.0f;
  Matrix<double> precise(2, 2);
  precise << 1.0 / 3.0, 2.0 / 3.0, -1e-300, 1e300;
  std::vector<unsigned char> counts(16);
  const std::int64_t c[2] = {7, -3};
  std::memcpy(counts.data(), c, 16);

  SafetensorsWriter writer;
  writer.add("weight", weight);  // added in another order than the file's: the writer sorts
  writer.add_raw("counts", DType::I64, {2}, counts);
  writer.add_vector("bias", bias);
  writer.add("precise", precise, DType::F64);
  writer.add_scalar("scale", 2.5);
  writer.set_metadata("note", "golden");
  CHECK(writer.serialize() == read_bytes(test_data_dir() / "basic.safetensors"));
}

TEST_CASE("SafetensorsReader: widens F16 and BF16 edge values exactly", "[io][safetensors]") {
  SafetensorsReader file(test_data_dir() / "half.safetensors");
  const std::vector<float> h = file.values<float>("f16");
  const std::vector<float> expected_h = {0.0f, -0.0f, std::ldexp(1.0f, -24), std::ldexp(1023.0f, -24),
                                         std::ldexp(1.0f, -14), 1.0f, -2.0f, 65504.0f,
                                         std::numeric_limits<float>::infinity(),
                                         -std::numeric_limits<float>::infinity()};
  REQUIRE(h.size() == 11);
  for (std::size_t i = 0; i < expected_h.size(); ++i) {
    CAPTURE(i);
    CHECK(std::bit_cast<std::uint32_t>(h[i]) == std::bit_cast<std::uint32_t>(expected_h[i]));
  }
  CHECK(std::isnan(h[10]));

  const std::vector<double> b = file.values<double>("bf16");
  const std::vector<double> expected_b = {0.0, -0.0, std::ldexp(1.0, -133), std::ldexp(127.0, -133),
                                          std::ldexp(1.0, -126), 1.0, -2.0, std::ldexp(255.0, 120),
                                          std::numeric_limits<double>::infinity(),
                                          -std::numeric_limits<double>::infinity()};
  REQUIRE(b.size() == 11);
  for (std::size_t i = 0; i < expected_b.size(); ++i) {
    CAPTURE(i);
    CHECK(b[i] == expected_b[i]);
    CHECK(std::signbit(b[i]) == std::signbit(expected_b[i]));
  }
  CHECK(std::isnan(b[10]));
}

TEST_CASE("SafetensorsReader: reads data that starts at an unaligned offset", "[io][safetensors]") {
  SafetensorsReader file(test_data_dir() / "unaligned.safetensors");
  CHECK(file.data_start() % 4 != 0);
  const Matrix<float> m = file.matrix<float>("m");
  Matrix<float> expected(2, 2);
  expected << 1.5f, -2.5f, 3.5f, -4.5f;
  CHECK(m == expected);
}

TEST_CASE("SafetensorsReader: a file without tensors is valid", "[io][safetensors]") {
  SafetensorsReader empty(test_data_dir() / "empty.safetensors");
  CHECK(empty.size() == 0);
  CHECK(empty.metadata().empty());
  SafetensorsReader metadata_only(test_data_dir() / "metadata_only.safetensors");
  CHECK(metadata_only.size() == 0);
  CHECK(metadata_only.metadata().at("format") == "pt");

  SafetensorsWriter writer;
  CHECK(writer.serialize() == read_bytes(test_data_dir() / "metadata_only.safetensors"));
}

// --- round trips ------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("SafetensorsWriter: matrices, vectors and scalars round-trip bit for bit", "[io][safetensors]",
                   float, double) {
  Random rng(7);
  // Sizes above and below the transposition block, tall and wide, vectors both ways.
  const Matrix<TestType> a = random_matrix<TestType>(37, 1500, rng);
  const Matrix<TestType> b = random_matrix<TestType>(3000, 5, rng);
  const Matrix<TestType> row = random_matrix<TestType>(1, 9, rng);
  const Matrix<TestType> col = random_matrix<TestType>(9, 1, rng);
  rankwise::Vector<TestType> vec = random_matrix<TestType>(6, 1, rng);
  SafetensorsWriter writer(rankwise::native_dtype<TestType>());
  writer.add("a", a);
  writer.add("b", b);
  writer.add("row", row);
  writer.add_vector("col", col);
  writer.add_vector("vec", vec);
  writer.add_scalar("s", -0.375);
  const std::vector<unsigned char> bytes = writer.serialize();
  SafetensorsReader file = SafetensorsReader::from_bytes(bytes);
  CHECK(same_bits(file.matrix<TestType>("a"), a));
  CHECK(same_bits(file.matrix<TestType>("b"), b));
  CHECK(same_bits(file.matrix<TestType>("row"), row));
  CHECK(file.info("row").shape == std::vector<Index>{1, 9});
  CHECK(file.info("col").shape == std::vector<Index>{9});
  CHECK(same_bits(file.matrix<TestType>("col"), col));
  CHECK(same_bits(file.matrix<TestType>("vec"), Matrix<TestType>(vec)));
  CHECK(file.matrix<TestType>("s")(0, 0) == TestType(-0.375));
  CHECK(file.info("a").dtype == rankwise::native_dtype<TestType>());

  // Reading into a matrix of the right size reuses its storage.
  Matrix<TestType> reused(37, 1500);
  const TestType* storage = reused.data();
  file.read_matrix("a", reused);
  CHECK(reused.data() == storage);
  CHECK(same_bits(reused, a));
}

TEST_CASE("SafetensorsWriter: the file is row-major, as PyTorch's [out, in]", "[io][safetensors]") {
  Matrix<float> m(2, 3);
  m << 1, 2, 3, 4, 5, 6;
  SafetensorsWriter writer;
  writer.add("m", m);
  SafetensorsReader file = SafetensorsReader::from_bytes(writer.serialize());
  CHECK(file.values<float>("m") == std::vector<float>{1, 2, 3, 4, 5, 6});
  CHECK(file.info("m").shape == std::vector<Index>{2, 3});
}

TEST_CASE("SafetensorsWriter: zero-size, 0-d and N-D tensors", "[io][safetensors]") {
  SafetensorsWriter writer;
  writer.add("empty_rows", Matrix<float>(0, 3));
  writer.add("empty_cols", Matrix<double>(4, 0));
  writer.add_tensor<float>("empty_nd", {2, 0, 5}, {});
  writer.add_tensor<double>("cube", {2, 2, 2}, {0, 1, 2, 3, 4, 5, 6, 7});
  writer.add_scalar("zero_d", 3.0, DType::BF16);
  SafetensorsReader file = SafetensorsReader::from_bytes(writer.serialize());
  CHECK(file.matrix<float>("empty_rows").rows() == 0);
  CHECK(file.matrix<float>("empty_rows").cols() == 3);
  CHECK(file.matrix<double>("empty_cols").rows() == 4);
  CHECK(file.matrix<double>("empty_cols").cols() == 0);
  CHECK(file.info("empty_rows").byte_size() == 0);
  CHECK(file.info("empty_nd").shape == std::vector<Index>{2, 0, 5});
  CHECK(file.values<float>("empty_nd").empty());
  CHECK(file.values<float>("cube") == std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7});
  CHECK(file.info("zero_d").dtype == DType::BF16);
  CHECK(file.matrix<float>("zero_d")(0, 0) == 3.0f);
  REQUIRE_THROWS_WITH(file.matrix<float>("cube"), Contains("at most 2 dimensions"));
}

TEST_CASE("SafetensorsWriter: F16 and BF16 on request, rounded to nearest even", "[io][safetensors]") {
  Matrix<float> m(2, 4);
  // 1 + 2^-11 is halfway between two halves (ties to even: 1); 1 + 3 * 2^-11 rounds up;
  // 65520 overflows F16 to infinity; 2^-25 is half the smallest subnormal (ties to even: 0).
  m << 1.0f + std::ldexp(1.0f, -11), 1.0f + 3 * std::ldexp(1.0f, -11), 65520.0f, std::ldexp(1.0f, -25),
      -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(), -0.0f,
      std::ldexp(3.0f, -26);
  SafetensorsWriter writer(DType::F16);
  writer.add("h", m);
  writer.add("b", m, DType::BF16);
  SafetensorsReader file = SafetensorsReader::from_bytes(writer.serialize());
  CHECK(file.info("h").dtype == DType::F16);
  CHECK(file.info("b").dtype == DType::BF16);
  const Matrix<float> h = file.matrix<float>("h");
  CHECK(h(0, 0) == 1.0f);
  CHECK(h(0, 1) == 1.0f + std::ldexp(1.0f, -9));
  CHECK(h(0, 2) == std::numeric_limits<float>::infinity());
  CHECK(h(0, 3) == 0.0f);
  CHECK(h(1, 0) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(h(1, 1)));
  CHECK(std::signbit(h(1, 2)));
  CHECK(h(1, 3) == std::ldexp(1.0f, -24));  // 1.5 * 2^-25 rounds up to the smallest subnormal
  const Matrix<float> b = file.matrix<float>("b");
  CHECK(b(0, 2) == 65536.0f);  // 65520 = 0x477ff000: halfway, ties to even -> 0x4780
  CHECK(std::isnan(b(1, 1)));
  CHECK(b(1, 0) == -std::numeric_limits<float>::infinity());
}

TEST_CASE("half conversions: every F16 value survives a round trip and matches Eigen::half", "[io][safetensors]") {
  for (std::uint32_t bits = 0; bits <= 0xffffu; ++bits) {
    const auto h = std::uint16_t(bits);
    const float f = rankwise::detail::half_to_float(h);
    const float eigen = static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(h));
    if (std::isnan(f)) {
      REQUIRE(std::isnan(eigen));
      REQUIRE(std::isnan(rankwise::detail::half_to_float(rankwise::detail::float_to_half(f))));
      continue;
    }
    REQUIRE(std::bit_cast<std::uint32_t>(f) == std::bit_cast<std::uint32_t>(eigen));
    REQUIRE(rankwise::detail::float_to_half(f) == h);
  }
}

TEST_CASE("half conversions: narrowing agrees with Eigen's half and bfloat16 on many floats", "[io][safetensors]") {
  Random rng(11);
  for (int i = 0; i < 100000; ++i) {
    // Random bit patterns cover every exponent; a second sample concentrates on F16's range.
    const auto bits = std::uint32_t(rng.next_u64());
    const float wide = std::bit_cast<float>(bits);
    const float narrow = float(rng.uniform(-70000.0, 70000.0)) * std::ldexp(1.0f, -int(rng.uniform_int(0, 30)));
    for (const float f : {wide, narrow}) {
      if (std::isnan(f)) continue;
      CAPTURE(f);
      REQUIRE(rankwise::detail::float_to_half(f) == Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(f)));
      REQUIRE(rankwise::detail::float_to_bfloat16(f) ==
              Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(f)));
    }
  }
}

// --- validation: every rule rejects a crafted file with its message ----------------------------

TEST_CASE("SafetensorsReader: rejects a bad header length", "[io][safetensors][errors]") {
  REQUIRE_THROWS_WITH(open_bytes({1, 2, 3, 4, 5}),
                      Contains("'crafted.safetensors' at byte 0") && Contains("only 5 bytes"));
  REQUIRE_THROWS_WITH(open_bytes(craft("{}", 0, 100'000'001)), Contains("at most 100000000 bytes (got 100000001)"));
  REQUIRE_THROWS_WITH(open_bytes(craft("{}", 0, 50)), Contains("header length 50 does not fit in the file (10 bytes"));
  REQUIRE_THROWS_WITH(open_bytes(craft("{}", 0, ~std::uint64_t(0))), Contains("at most 100000000"));
  REQUIRE_THROWS_AS(open_bytes(craft("{}", 0, 100'000'001)), FormatError);
}

TEST_CASE("SafetensorsReader: rejects a header that is not a JSON object", "[io][safetensors][errors]") {
  REQUIRE_THROWS_WITH(open_bytes(craft("")), Contains("at byte 8") && Contains("an empty header"));
  REQUIRE_THROWS_WITH(open_bytes(craft("[1, 2]  ")), Contains("starting with '{' (got byte 91)"));
  REQUIRE_THROWS_WITH(open_bytes(craft("{\"a\": }")), Contains("at byte 14") && Contains("not valid JSON"));
  REQUIRE_THROWS_WITH(open_bytes(craft("{} x")), Contains("not valid JSON"));
  REQUIRE_THROWS_WITH(open_bytes(craft(std::string("{}\0\0\0\0\0\0", 8))), Contains("not valid JSON"));
  REQUIRE_THROWS_WITH(open_bytes(craft("{\"\xff\": 1}")), Contains("not valid JSON") && Contains("UTF-8"));
  REQUIRE_THROWS_WITH(open_bytes(craft("{\"a\": 1e999}")), Contains("not valid JSON"));
}

TEST_CASE("SafetensorsReader: rejects duplicate names and deep nesting", "[io][safetensors][errors]") {
  const std::string entry = R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  REQUIRE_THROWS_WITH(open_bytes(craft("{\"a\":" + entry + ",\"a\":" + entry + "}", 4)),
                      Contains("names 'a' twice"));
  REQUIRE_THROWS_WITH(
      open_bytes(craft(R"({"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4)),
      Contains("entry 'a' has the key 'dtype' twice") && Contains("at byte 9"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}})", 4)),
                      Contains("nests deeper"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"__metadata__":{"k":"v","k":"w"}})")),
                      Contains("entry '__metadata__' has the key 'k' twice"));
}

TEST_CASE("SafetensorsReader: rejects bad metadata", "[io][safetensors][errors]") {
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"__metadata__":{"format":"pt","n":1}})")),
                      Contains("__metadata__ values must be strings (got an integer for key 'n')"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"__metadata__":["pt"]})")),
                      Contains("__metadata__ must be an object of strings (got an array)"));
  CHECK(open_bytes(craft(R"({"__metadata__":null})")).metadata().empty());
}

TEST_CASE("SafetensorsReader: rejects bad tensor entries", "[io][safetensors][errors]") {
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":[1]})")), Contains("tensor 'a' must be described by an object"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F32","shape":[1]}})", 4)),
                      Contains("must have \"dtype\", \"shape\" and \"data_offsets\""));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F31","shape":[1],"data_offsets":[0,4]}})", 4)),
                      Contains("dtype must be one of") && Contains("(got \"F31\")"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", 4)),
                      Contains("(got \"f32\")"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":32,"shape":[1],"data_offsets":[0,4]}})", 4)),
                      Contains("dtype must be a string (got an integer)"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4)),
                      Contains("shape must be a non-negative integer (got a negative integer)"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", 4)),
                      Contains("got a non-integer number"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})", 4)),
                      Contains("shape must be an array"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", 8)),
                      Contains("data_offsets must be an array of two integers"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", 4)),
                      Contains("begin <= end (got [4, 0])"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,0]}})")),
                      Contains("a dimension must be at most 9223372036854775807"));
}

TEST_CASE("SafetensorsReader: rejects sizes that do not match shape x dtype", "[io][safetensors][errors]") {
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 12)),
                      Contains("tensor 'a': shape x dtype size is 16 bytes but data_offsets span 12 bytes"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8)),
                      Contains("the product of the shape exceeds 9223372036854775807 elements"));
  // 2^62 x 2 fits 64 unsigned bits but not a signed element count.
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"U8","shape":[4611686018427387904,2],"data_offsets":[0,0]}})")),
                      Contains("the product of the shape exceeds 9223372036854775807 elements"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}})", 8)),
                      Contains("overflows 64 bits"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2)),
                      Contains("3 elements of F4 do not fill a whole number of bytes"));
  CHECK(open_bytes(craft(R"({"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}})", 2)).info("a").byte_size() == 2);
}

TEST_CASE("SafetensorsReader: a zero after huge dimensions is an empty tensor, its size computed without overflow",
          "[io][safetensors][errors]") {
  // 2^61 x 4 = 2^63 fits 64 unsigned bits but overflowed the signed element count (undefined behaviour,
  // caught by UBSan) before the count was computed in unsigned arithmetic.
  for (const char* shape : {"[2305843009213693952,4,0]", "[0,2305843009213693952,4]", "[2305843009213693952,0,4]"}) {
    INFO(shape);
    const SafetensorsReader reader =
        open_bytes(craft(std::string(R"({"a":{"dtype":"F32","shape":)") + shape + R"(,"data_offsets":[0,0]}})"));
    CHECK(reader.info("a").element_count() == 0);
    CHECK(reader.values<float>("a").empty());
  }
}

TEST_CASE("SafetensorsReader: rejects holes, overlaps and bytes outside the tensors", "[io][safetensors][errors]") {
  const std::string a = R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  REQUIRE_THROWS_WITH(open_bytes(craft("{" + a + R"(,"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12)),
                      Contains("tensor 'b' starts at data offset 8 but the previous tensor ends at 4") &&
                          Contains("without holes or overlaps"));
  REQUIRE_THROWS_WITH(open_bytes(craft("{" + a + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[2,10]}})", 10)),
                      Contains("tensor 'b' starts at data offset 2 but the previous tensor ends at 4"));
  REQUIRE_THROWS_WITH(open_bytes(craft(R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8)),
                      Contains("starts at data offset 4 but the previous tensor ends at 0"));
  REQUIRE_THROWS_WITH(open_bytes(craft("{" + a + "}", 6)),
                      Contains("the tensors end at data offset 4 but the data buffer holds 6 bytes"));
  REQUIRE_THROWS_WITH(open_bytes(craft("{}", 3)), Contains("the tensors end at data offset 0 but the data buffer holds 3"));
  REQUIRE_THROWS_WITH(open_bytes(craft("{" + a + "}", 2)),
                      Contains("data_offsets [0, 4) run past the end of the file (the data buffer holds 2 bytes"));
  // Zero-size tensors may share an offset.
  CHECK(open_bytes(craft(R"({"z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)" + a + "}", 4)).size() == 2);
}

TEST_CASE("SafetensorsReader: asks for what the file has", "[io][safetensors][errors]") {
  SafetensorsReader file(test_data_dir() / "basic.safetensors");
  REQUIRE_THROWS_WITH(file.matrix<float>("nope"), Contains("has no tensor named 'nope'") && Contains("basic.safetensors"));
  REQUIRE_THROWS_WITH(file.values<float>("counts"), Contains("tensor 'counts' must have dtype F32, F64, F16 or BF16") &&
                                                        Contains("(got I64)") && Contains("at byte "));
  REQUIRE_THROWS_AS(SafetensorsReader(test_data_dir() / "does_not_exist.safetensors"), rankwise::IoError);
}

TEST_CASE("SafetensorsReader: a file that shrinks after opening raises FormatError", "[io][safetensors][errors]") {
  TempDir dir("shrink");
  const fs::path path = dir.path / "t.safetensors";
  SafetensorsWriter writer;
  writer.add("m", Matrix<float>(Matrix<float>::Ones(64, 64)));
  writer.write(path);
  SafetensorsReader file(path);
  fs::resize_file(path, file.data_start() + 100);
  REQUIRE_THROWS_WITH(file.matrix<float>("m"), Contains("the file ended") && Contains("t.safetensors' at byte"));
}

TEST_CASE("SafetensorsWriter: rejects bad names, dtypes and shapes", "[io][safetensors][errors]") {
  SafetensorsWriter writer;
  const Matrix<float> m = Matrix<float>::Zero(2, 2);
  REQUIRE_THROWS_WITH(writer.add("__metadata__", m), Contains("'__metadata__' is reserved"));
  writer.add("m", m);
  REQUIRE_THROWS_WITH(writer.add("m", m), Contains("tensor 'm' was added twice"));
  REQUIRE_THROWS_WITH(writer.add("i", m, DType::I32), Contains("float data is written as F32, F64, F16 or BF16 (got I32)"));
  REQUIRE_THROWS_WITH(SafetensorsWriter(DType::U8), Contains("[rankwise::SafetensorsWriter]"));
  REQUIRE_THROWS_WITH(writer.add_vector("v", m), Contains("a vector must have one row or one column (got 2 x 2)"));
  REQUIRE_THROWS_WITH(writer.add_tensor<float>("t", {2, 3}, {1, 2}), Contains("shape holds 6 elements but 2 values"));
  REQUIRE_THROWS_WITH(writer.add_raw("r", DType::I32, {3}, {1, 2, 3}), Contains("3 elements of I32 need 12 bytes (got 3)"));
  REQUIRE_THROWS_WITH(writer.add("bad\xff", m), Contains("tensor name must be valid UTF-8"));
  CHECK(writer.size() == 1);
}

// --- nothing lost -----------------------------------------------------------------------------

TEST_CASE("SafetensorsWriter: a write that fails halfway leaves the previous file intact", "[io][safetensors]") {
  TempDir dir("fail_half");
  const fs::path path = dir.path / "weights.safetensors";
  Random rng(3);
  SafetensorsWriter first;
  first.add("w", random_matrix<float>(100, 100, rng));
  first.write(path);
  const std::vector<unsigned char> before = read_bytes(path);

  SafetensorsWriter second;
  second.add("w", random_matrix<float>(100, 100, rng));
  second.add("x", random_matrix<float>(10, 10, rng));
  {
    rankwise::ScopedWriteFailure failure(before.size() / 2);
    REQUIRE_THROWS_WITH(second.write(path), Contains("injected failure") && Contains("weights.safetensors"));
  }
  CHECK(read_bytes(path) == before);
  CHECK(rankwise::test_support::count_entries(dir.path) == 1);  // no temporary left
  second.write(path);  // without the failure the new file replaces the old one
  CHECK(SafetensorsReader(path).size() == 2);
}

TEST_CASE("AtomicFile: the target changes only at commit, and a dropped file leaves no trace", "[io][atomic_file]") {
  TempDir dir("atomic");
  const fs::path target = dir.path / "a.txt";
  rankwise::write_file_atomically(target, "first");
  {
    rankwise::AtomicFile file(target);
    file.write(std::string_view("second, longer"));
    CHECK(rankwise::test_support::read_text(target) == "first");  // not yet
    CHECK(fs::exists(file.temporary()));
    CHECK(file.temporary().parent_path() == dir.path);  // same directory, so rename is atomic
  }  // destroyed without commit
  CHECK(rankwise::test_support::read_text(target) == "first");
  CHECK(rankwise::test_support::count_entries(dir.path) == 1);
  {
    rankwise::AtomicFile file(target, /*durable=*/false);
    file.write(std::string_view("third"));
    file.commit();
    CHECK(file.bytes_written() == 5);
    CHECK_THROWS_AS(file.write(std::string_view("x")), rankwise::StateError);
    CHECK_THROWS_AS(file.commit(), rankwise::StateError);
  }
  CHECK(rankwise::test_support::read_text(target) == "third");
  CHECK_THROWS_WITH(rankwise::AtomicFile(dir.path / "missing" / "b.txt"),
                    Contains("[rankwise::AtomicFile] cannot create a temporary file next to"));
  {
    rankwise::ScopedWriteFailure outer(100);
    {
      rankwise::ScopedWriteFailure inner(2);
      CHECK_THROWS_WITH(rankwise::write_file_atomically(target, "fourth"), Contains("failed after 2 bytes"));
    }
    rankwise::write_file_atomically(target, "fifth");  // the outer budget is back
  }
  CHECK(rankwise::test_support::read_text(target) == "fifth");
  CHECK(rankwise::test_support::count_entries(dir.path) == 1);
}
