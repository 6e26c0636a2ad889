#pragma once
/// \file rankwise/io/safetensors.hpp
/// safetensors files (Hugging Face's tensor format): SafetensorsReader and SafetensorsWriter.
///
///   read   F32, F64, F16, BF16 -> float or double; any dtype as raw little-endian bytes
///   write  F32 by default, F16 / BF16 / F64 on request; any dtype from raw bytes
///   layout file shapes are row-major (PyTorch); Eigen matrices are column-major. A 2-D tensor
///          [rows, cols] is a rows x cols Matrix (transposed while copying), a 1-D tensor [n] an
///          n x 1 column, a 0-d tensor a 1 x 1 matrix; N-D tensors are read and written as flat
///          row-major value lists with their shape, as given.
/// The reader checks the whole header against the file before reading data (see
/// detail/safetensors_header.hpp) and copies every tensor out with positioned reads, so unaligned
/// files are read like aligned ones and nothing outside the file is ever touched. The writer orders
/// tensors like the reference writer (descending dtype, then name), pads the header with spaces to
/// a multiple of 8, writes `__metadata__` {"format": "pt", ...}, and replaces files atomically.
/// Docs: docs/io/safetensors.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/io/atomic_file.hpp>
#include <rankwise/io/detail/file.hpp>
#include <rankwise/io/detail/half.hpp>
#include <rankwise/io/detail/safetensors_header.hpp>
#include <rankwise/io/detail/transpose.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace rankwise {

/// The dtype that stores Scalar without loss: F32 for float, F64 for double.
template <FloatScalar Scalar>
constexpr DType native_dtype() {
  return std::is_same_v<Scalar, float> ? DType::F32 : DType::F64;
}

namespace detail {

inline constexpr bool little_endian_host = std::endian::native == std::endian::little;

template <typename U>
U byteswap_value(U v) {
  unsigned char b[sizeof(U)];
  std::memcpy(b, &v, sizeof(U));
  std::reverse(b, b + sizeof(U));
  std::memcpy(&v, b, sizeof(U));
  return v;
}

template <typename U>
U load_le(const unsigned char* p) {
  U v;
  std::memcpy(&v, p, sizeof(U));
  if constexpr (!little_endian_host) v = byteswap_value(v);
  return v;
}

template <typename U>
void store_le(unsigned char* p, U v) {
  if constexpr (!little_endian_host) v = byteswap_value(v);
  std::memcpy(p, &v, sizeof(U));
}

/// Bytes per element of a float dtype.
inline std::size_t float_dtype_size(DType dtype) { return dtype_bits(dtype) / 8; }

/// Decodes `count` little-endian elements of a float dtype into Scalar.
template <FloatScalar Scalar>
void decode_floats(DType dtype, const unsigned char* src, Scalar* dst, std::size_t count) {
  switch (dtype) {
    case DType::F32:
      if constexpr (std::is_same_v<Scalar, float> && little_endian_host) {
        std::memcpy(dst, src, count * 4);
      } else {
        for (std::size_t i = 0; i < count; ++i)
          dst[i] = Scalar(std::bit_cast<float>(load_le<std::uint32_t>(src + 4 * i)));
      }
      return;
    case DType::F64:
      if constexpr (std::is_same_v<Scalar, double> && little_endian_host) {
        std::memcpy(dst, src, count * 8);
      } else {
        for (std::size_t i = 0; i < count; ++i)
          dst[i] = Scalar(std::bit_cast<double>(load_le<std::uint64_t>(src + 8 * i)));
      }
      return;
    case DType::F16:
      for (std::size_t i = 0; i < count; ++i) dst[i] = Scalar(half_to_float(load_le<std::uint16_t>(src + 2 * i)));
      return;
    case DType::BF16:
      for (std::size_t i = 0; i < count; ++i)
        dst[i] = Scalar(bfloat16_to_float(load_le<std::uint16_t>(src + 2 * i)));
      return;
    default: RANKWISE_ASSERT(false, "decode_floats: not a float dtype");
  }
}

/// Encodes `count` Scalars as little-endian elements of a float dtype.
template <FloatScalar Scalar>
void encode_floats(DType dtype, const Scalar* src, unsigned char* dst, std::size_t count) {
  switch (dtype) {
    case DType::F32:
      if constexpr (std::is_same_v<Scalar, float> && little_endian_host) {
        std::memcpy(dst, src, count * 4);
      } else {
        for (std::size_t i = 0; i < count; ++i) store_le(dst + 4 * i, std::bit_cast<std::uint32_t>(float(src[i])));
      }
      return;
    case DType::F64:
      if constexpr (std::is_same_v<Scalar, double> && little_endian_host) {
        std::memcpy(dst, src, count * 8);
      } else {
        for (std::size_t i = 0; i < count; ++i) store_le(dst + 8 * i, std::bit_cast<std::uint64_t>(double(src[i])));
      }
      return;
    case DType::F16:
      for (std::size_t i = 0; i < count; ++i) store_le(dst + 2 * i, float_to_half(float(src[i])));
      return;
    case DType::BF16:
      for (std::size_t i = 0; i < count; ++i) store_le(dst + 2 * i, float_to_bfloat16(float(src[i])));
      return;
    default: RANKWISE_ASSERT(false, "encode_floats: not a float dtype");
  }
}

/// Rows per block when transposing between row-major bytes and a column-major matrix: a block of
/// about 256 KiB stays in cache while its columns are scattered.
inline Index transpose_block_rows(Index rows, Index cols, std::size_t element_size) {
  const std::size_t row_bytes = std::size_t(cols) * element_size;
  const Index by_size = Index((std::size_t(256) << 10) / std::max<std::size_t>(row_bytes, 1));
  return std::min(rows, std::max<Index>(by_size, 16));
}

/// Where the reader's bytes come from: a file (positioned reads) or a buffer it owns.
using ByteSource = std::variant<ReadOnlyFile, std::vector<unsigned char>>;

}  // namespace detail

class SafetensorsReader {
 public:
  /// Opens `path` and checks its header against the file (throws FormatError or IoError).
  explicit SafetensorsReader(const std::filesystem::path& path)
      : m_label(path.string()), m_source(detail::ReadOnlyFile(path, "rankwise::SafetensorsReader")) {
    init(std::get<detail::ReadOnlyFile>(m_source).size());
  }

  /// Reads a file held in memory (copied); `label` names it in error messages.
  static SafetensorsReader from_bytes(std::span<const unsigned char> bytes, std::string label = "<memory>") {
    return SafetensorsReader(std::vector<unsigned char>(bytes.begin(), bytes.end()), std::move(label));
  }

  /// The path (or label) that error messages name.
  const std::string& label() const { return m_label; }
  /// The `__metadata__` strings (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return m_header.metadata; }
  /// Every tensor, in the order of their data in the file.
  const std::vector<TensorInfo>& tensors() const { return m_header.tensors; }
  std::size_t size() const { return m_header.tensors.size(); }
  bool contains(std::string_view name) const { return m_header.index.find(name) != m_header.index.end(); }
  /// File offset of the data buffer (8 + header length).
  std::uint64_t data_start() const { return m_header.data_start; }
  std::uint64_t file_size() const { return m_header.file_size; }

  /// The header entry of `name`; FormatError if the file has no such tensor.
  const TensorInfo& info(std::string_view name) const {
    auto it = m_header.index.find(name);
    if (it == m_header.index.end())
      detail::fail<FormatError>("rankwise::SafetensorsReader", "'", m_label, "' has no tensor named '", name,
                                "' (it holds ", m_header.tensors.size(), " tensors)");
    return m_header.tensors[it->second];
  }

  /// A tensor of rank 0, 1 or 2 as a matrix (0-d: 1 x 1, [n]: n x 1, [r, c]: r x c).
  template <FloatScalar Scalar>
  Matrix<Scalar> matrix(std::string_view name) const {
    Matrix<Scalar> out;
    read_matrix(name, out);
    return out;
  }

  /// Like matrix(), into `out` (reusing its storage when the size matches). On failure `out` keeps
  /// its size but its values are unspecified.
  template <FloatScalar Scalar>
  void read_matrix(std::string_view name, Matrix<Scalar>& out) const {
    const TensorInfo& t = info(name);
    check_float(t);
    if (t.shape.size() > 2)
      detail::fail<FormatError>("rankwise::SafetensorsReader", "'", m_label, "' at byte ", tensor_offset(t),
                                ": tensor '", t.name, "' must have at most 2 dimensions to be read as a matrix (got ",
                                t.shape.size(), "); read it with values()");
    const Index rows = t.shape.empty() ? 1 : t.shape[0];
    const Index cols = t.shape.size() == 2 ? t.shape[1] : 1;
    out.resize(rows, cols);
    if (rows <= 1 || cols <= 1) {
      read_elements(t, out.data(), 0, std::size_t(out.size()));  // same bytes in both layouts
      return;
    }
    // Row-major file, column-major matrix: read a block of rows into a buffer whose row stride is
    // padded by a cache line (power-of-two strides would alias in the cache), then transpose it.
    const Index block = detail::transpose_block_rows(rows, cols, sizeof(Scalar));
    const Index ld = cols + Index(64 / sizeof(Scalar));
    std::vector<Scalar> buffer(std::size_t(block * ld));
    for (Index r0 = 0; r0 < rows; r0 += block) {
      const Index k = std::min(block, rows - r0);
      read_rows(t, r0, k, cols, buffer.data(), ld);
      detail::transpose_copy(buffer.data(), k, cols, ld, out.data() + r0, rows);
    }
  }

  /// Any float tensor as its values in row-major order (the file's order), with info(name).shape.
  template <FloatScalar Scalar>
  std::vector<Scalar> values(std::string_view name) const {
    const TensorInfo& t = info(name);
    check_float(t);
    std::vector<Scalar> out(std::size_t(t.element_count()));
    read_elements(t, out.data(), 0, out.size());
    return out;
  }

  /// The raw little-endian bytes of any tensor.
  std::vector<unsigned char> bytes(std::string_view name) const {
    const TensorInfo& t = info(name);
    std::vector<unsigned char> out(std::size_t(t.byte_size()));
    read_raw(t, t.begin, out.data(), out.size());
    return out;
  }

 private:
  SafetensorsReader(std::vector<unsigned char> bytes, std::string label)
      : m_label(std::move(label)), m_source(std::move(bytes)) {
    init(std::get<std::vector<unsigned char>>(m_source).size());
  }

  void init(std::uint64_t file_size) {
    unsigned char prefix[8] = {};
    if (file_size >= 8) read_source(0, prefix, 8);
    const std::uint64_t n = detail::checked_header_length(prefix, file_size, m_label);
    std::string text(std::size_t(n), '\0');
    read_source(8, text.data(), text.size());
    m_header = detail::parse_safetensors_header(text, file_size, m_label);
  }

  void read_source(std::uint64_t offset, void* out, std::size_t size) const {
    if (size == 0) return;
    if (const auto* file = std::get_if<detail::ReadOnlyFile>(&m_source)) {
      if (!file->read_at(offset, out, size, "rankwise::SafetensorsReader"))
        detail::fail<FormatError>("rankwise::SafetensorsReader", "'", m_label, "' at byte ", offset, ": expected ",
                                  size, " more bytes, but the file ended (it shrank after it was opened)");
      return;
    }
    const auto& buffer = std::get<std::vector<unsigned char>>(m_source);
    RANKWISE_ASSERT(offset <= buffer.size() && size <= buffer.size() - offset, "read outside a validated buffer");
    std::memcpy(out, buffer.data() + offset, size);
  }

  /// Bytes [at, at + size) of the data buffer, which validation guarantees lie inside the tensor.
  void read_raw(const TensorInfo& t, std::uint64_t at, void* out, std::size_t size) const {
    RANKWISE_ASSERT(at >= t.begin && size <= t.end - at, "read outside the tensor");
    read_source(m_header.data_start + at, out, size);
  }

  /// Rows [first, first + count) of a 2-D float tensor with `cols` columns, converted to Scalar,
  /// row i stored at out + i * ld.
  template <FloatScalar Scalar>
  void read_rows(const TensorInfo& t, Index first, Index count, Index cols, Scalar* out, Index ld) const {
    const std::size_t size = detail::float_dtype_size(t.dtype);
    const std::size_t row_bytes = std::size_t(cols) * size;
    const std::uint64_t at = t.begin + std::uint64_t(first) * row_bytes;
    RANKWISE_ASSERT(at >= t.begin && std::uint64_t(count) * row_bytes <= t.end - at, "read outside the tensor");
    if (t.dtype == native_dtype<Scalar>() && detail::little_endian_host) {
      auto* dst = reinterpret_cast<unsigned char*>(out);
      const std::size_t stride = std::size_t(ld) * sizeof(Scalar);
      if (const auto* file = std::get_if<detail::ReadOnlyFile>(&m_source)) {
        if (!file->read_rows_at(m_header.data_start + at, std::size_t(count), row_bytes, dst, stride,
                                "rankwise::SafetensorsReader"))
          detail::fail<FormatError>("rankwise::SafetensorsReader", "'", m_label, "' at byte ", m_header.data_start + at,
                                    ": expected ", std::uint64_t(count) * row_bytes,
                                    " more bytes, but the file ended (it shrank after it was opened)");
      } else {
        for (Index i = 0; i < count; ++i) read_raw(t, at + std::uint64_t(i) * row_bytes, dst + std::size_t(i) * stride, row_bytes);
      }
      return;
    }
    std::vector<unsigned char> raw(std::size_t(count) * row_bytes);
    read_raw(t, at, raw.data(), raw.size());
    for (Index i = 0; i < count; ++i)
      detail::decode_floats(t.dtype, raw.data() + std::size_t(i) * row_bytes, out + i * ld, std::size_t(cols));
  }

  /// Elements [first, first + count) of a float tensor, converted to Scalar.
  template <FloatScalar Scalar>
  void read_elements(const TensorInfo& t, Scalar* out, std::size_t first, std::size_t count) const {
    const std::size_t size = detail::float_dtype_size(t.dtype);
    const std::uint64_t at = t.begin + std::uint64_t(first) * size;
    if (t.dtype == native_dtype<Scalar>() && detail::little_endian_host) {
      read_raw(t, at, out, count * size);
      return;
    }
    constexpr std::size_t chunk = std::size_t(1) << 16;
    std::vector<unsigned char> raw(std::min(count, chunk) * size);
    for (std::size_t done = 0; done < count; done += chunk) {
      const std::size_t n = std::min(chunk, count - done);
      read_raw(t, at + std::uint64_t(done) * size, raw.data(), n * size);
      detail::decode_floats(t.dtype, raw.data(), out + done, n);
    }
  }

  void check_float(const TensorInfo& t) const {
    if (!is_float_dtype(t.dtype))
      detail::fail<FormatError>("rankwise::SafetensorsReader", "'", m_label, "' at byte ", tensor_offset(t),
                                ": tensor '", t.name, "' must have dtype F32, F64, F16 or BF16 to be read as numbers (got ",
                                to_string(t.dtype), "); read it with bytes()");
  }

  std::uint64_t tensor_offset(const TensorInfo& t) const { return m_header.data_start + t.begin; }

  std::string m_label;
  detail::ByteSource m_source;
  detail::SafetensorsHeader m_header;
};

class SafetensorsWriter {
 public:
  /// `dtype`: how float data is stored unless add() says otherwise (F32, F64, F16 or BF16).
  explicit SafetensorsWriter(DType dtype = DType::F32) : m_dtype(checked_float_dtype(dtype)) {
    m_metadata["format"] = "pt";
  }

  /// A 2-D tensor [rows, cols]. The writer keeps a reference: `m` must live until write().
  template <FloatScalar Scalar>
  void add(std::string name, const Matrix<Scalar>& m, std::optional<DType> dtype = {}) {
    add_float(std::move(name), dtype, {m.rows(), m.cols()}, m.data(), m.rows(), m.cols(), nullptr);
  }
  /// A 2-D tensor taken over by the writer.
  template <FloatScalar Scalar>
  void add(std::string name, Matrix<Scalar>&& m, std::optional<DType> dtype = {}) {
    auto owned = std::make_shared<Matrix<Scalar>>(std::move(m));
    add_float(std::move(name), dtype, {owned->rows(), owned->cols()}, owned->data(), owned->rows(), owned->cols(),
              owned);
  }

  /// A 1-D tensor [n] from a column or a row (referenced: it must live until write()).
  template <FloatScalar Scalar>
  void add_vector(std::string name, const Matrix<Scalar>& v, std::optional<DType> dtype = {}) {
    check_vector(name, v.rows(), v.cols());
    add_float(std::move(name), dtype, {v.size()}, v.data(), v.size(), 1, nullptr);
  }
  template <FloatScalar Scalar>
  void add_vector(std::string name, Matrix<Scalar>&& v, std::optional<DType> dtype = {}) {
    check_vector(name, v.rows(), v.cols());
    auto owned = std::make_shared<Matrix<Scalar>>(std::move(v));
    add_float(std::move(name), dtype, {owned->size()}, owned->data(), owned->size(), 1, owned);
  }
  template <FloatScalar Scalar>
  void add_vector(std::string name, const Vector<Scalar>& v, std::optional<DType> dtype = {}) {
    add_float(std::move(name), dtype, {v.size()}, v.data(), v.size(), 1, nullptr);
  }
  template <FloatScalar Scalar>
  void add_vector(std::string name, Vector<Scalar>&& v, std::optional<DType> dtype = {}) {
    auto owned = std::make_shared<Vector<Scalar>>(std::move(v));
    add_float(std::move(name), dtype, {owned->size()}, owned->data(), owned->size(), 1, owned);
  }

  /// A 0-d tensor (shape []).
  void add_scalar(std::string name, double value, std::optional<DType> dtype = {}) {
    auto owned = std::make_shared<double>(value);
    add_float(std::move(name), dtype, {}, owned.get(), 1, 1, owned);
  }

  /// A tensor of any rank from its row-major values (taken over by the writer).
  template <FloatScalar Scalar>
  void add_tensor(std::string name, std::vector<Index> shape, std::vector<Scalar> values,
                  std::optional<DType> dtype = {}) {
    const std::uint64_t count = checked_count(name, shape);
    if (count != values.size())
      detail::fail("rankwise::SafetensorsWriter", "tensor '", name, "': shape holds ", count, " elements but ",
                   values.size(), " values were given");
    auto owned = std::make_shared<std::vector<Scalar>>(std::move(values));
    add_float(std::move(name), dtype, std::move(shape), owned->data(), Index(owned->size()), 1, owned);
  }

  /// A tensor of any dtype from its little-endian bytes (taken over by the writer).
  void add_raw(std::string name, DType dtype, std::vector<Index> shape, std::vector<unsigned char> bytes) {
    const std::uint64_t count = checked_count(name, shape);
    const unsigned bits = dtype_bits(dtype);
    if (count > std::numeric_limits<std::uint64_t>::max() / bits || (count * bits) % 8 != 0 ||
        count * bits / 8 != bytes.size())
      detail::fail("rankwise::SafetensorsWriter", "tensor '", name, "': ", count, " elements of ", to_string(dtype),
                   " need ", (count * bits + 7) / 8, " bytes (got ", bytes.size(), ")");
    auto owned = std::make_shared<std::vector<unsigned char>>(std::move(bytes));
    Entry e = make_entry(std::move(name), dtype, std::move(shape));
    e.source = Source::Raw;
    e.data = owned->data();
    e.rows = Index(owned->size());
    e.cols = 1;
    e.bytes = owned->size();
    e.keep_alive = owned;
    m_entries.push_back(std::move(e));
  }

  /// Sets a `__metadata__` string ("format" is "pt" unless set here).
  void set_metadata(std::string key, std::string value) {
    check_json_string("metadata key", key);
    check_json_string("metadata value", value);
    m_metadata[std::move(key)] = std::move(value);
  }
  const std::map<std::string, std::string>& metadata() const { return m_metadata; }
  std::size_t size() const { return m_entries.size(); }

  /// The whole file, in memory.
  std::vector<unsigned char> serialize() const {
    std::vector<unsigned char> out;
    VectorSink sink{out};
    stream(sink);
    return out;
  }

  /// Writes the file atomically: `path` is replaced only once the new file is complete on disk
  /// (durable = false: without the fsyncs, see AtomicFile).
  void write(const std::filesystem::path& path, bool durable = true) const {
    AtomicFile file(path, durable);
    stream(file);
    file.commit();
  }

 private:
  enum class Source { Float, Double, Raw };

  struct Entry {
    std::string name;
    DType dtype = DType::F32;
    std::vector<Index> shape;
    Source source = Source::Float;
    const void* data = nullptr;
    Index rows = 0;  ///< Float/Double: source rows (column-major when rows, cols > 1); Raw: byte count
    Index cols = 0;
    std::uint64_t bytes = 0;
    std::shared_ptr<const void> keep_alive;
  };

  struct VectorSink {
    std::vector<unsigned char>& out;
    void write(const void* data, std::size_t size) {
      const auto* p = static_cast<const unsigned char*>(data);
      out.insert(out.end(), p, p + size);
    }
  };

  static DType checked_float_dtype(DType dtype) {
    if (!is_float_dtype(dtype))
      detail::fail("rankwise::SafetensorsWriter", "float data is written as F32, F64, F16 or BF16 (got ",
                   to_string(dtype), ")");
    return dtype;
  }

  static void check_json_string(const char* what, const std::string& s) {
    try {
      (void)nlohmann::json(s).dump();
    } catch (const nlohmann::json::exception&) {
      detail::fail("rankwise::SafetensorsWriter", what, " must be valid UTF-8 (got '", s, "')");
    }
  }

  static void check_vector(const std::string& name, Index rows, Index cols) {
    if (rows != 1 && cols != 1)
      detail::fail("rankwise::SafetensorsWriter", "tensor '", name, "': a vector must have one row or one column (got ",
                   rows, " x ", cols, ")");
  }

  static std::uint64_t checked_count(const std::string& name, const std::vector<Index>& shape) {
    std::uint64_t count = 1;
    for (Index d : shape) {
      if (d < 0) detail::fail("rankwise::SafetensorsWriter", "tensor '", name, "': dimensions must be >= 0 (got ", d, ")");
      if (d != 0 && count > std::numeric_limits<std::uint64_t>::max() / std::uint64_t(d))
        detail::fail("rankwise::SafetensorsWriter", "tensor '", name, "': the shape's product overflows 64 bits");
      count *= std::uint64_t(d);
    }
    return count;
  }

  Entry make_entry(std::string name, DType dtype, std::vector<Index> shape) const {
    if (std::string_view(name) == "__metadata__")  // (a std::string comparison trips GCC 12's -Wmaybe-uninitialized)
      detail::fail("rankwise::SafetensorsWriter", "'__metadata__' is reserved and cannot name a tensor");
    check_json_string("tensor name", name);
    for (const Entry& e : m_entries)
      if (e.name == name) detail::fail("rankwise::SafetensorsWriter", "tensor '", name, "' was added twice");
    Entry e;
    e.name = std::move(name);
    e.dtype = dtype;
    e.shape = std::move(shape);
    return e;
  }

  template <FloatScalar Scalar>
  void add_float(std::string name, std::optional<DType> dtype, std::vector<Index> shape, const Scalar* data, Index rows,
                 Index cols, std::shared_ptr<const void> keep_alive) {
    const DType target = checked_float_dtype(dtype.value_or(m_dtype));
    const std::uint64_t count = checked_count(name, shape);
    Entry e = make_entry(std::move(name), target, std::move(shape));
    e.source = std::is_same_v<Scalar, float> ? Source::Float : Source::Double;
    e.data = data;
    e.rows = rows;
    e.cols = cols;
    e.bytes = count * detail::float_dtype_size(target);
    e.keep_alive = std::move(keep_alive);
    m_entries.push_back(std::move(e));
  }

  /// Entries in the reference writer's order: descending dtype, then name.
  std::vector<const Entry*> ordered() const {
    std::vector<const Entry*> order;
    for (const Entry& e : m_entries) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
      return a->dtype != b->dtype ? a->dtype > b->dtype : a->name < b->name;
    });
    return order;
  }

  std::string header_text(const std::vector<const Entry*>& order) const {
    std::string h = "{";
    if (!m_metadata.empty()) {
      h += "\"__metadata__\":{";
      bool first = true;
      for (const auto& [key, value] : m_metadata) {
        if (!first) h += ',';
        first = false;
        h += nlohmann::json(key).dump() + ":" + nlohmann::json(value).dump();
      }
      h += '}';
    }
    std::uint64_t offset = 0;
    for (const Entry* e : order) {
      if (h.size() > 1) h += ',';
      h += nlohmann::json(e->name).dump();
      h += ":{\"dtype\":\"";
      h += to_string(e->dtype);
      h += "\",\"shape\":[";
      for (std::size_t i = 0; i < e->shape.size(); ++i) {
        if (i) h += ',';
        h += std::to_string(e->shape[i]);
      }
      h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + e->bytes) + "]}";
      offset += e->bytes;
    }
    h += '}';
    h.append((8 - h.size() % 8) % 8, ' ');
    return h;
  }

  template <typename Sink>
  void stream(Sink& sink) const {
    const std::vector<const Entry*> order = ordered();
    const std::string header = header_text(order);
    unsigned char prefix[8];
    detail::store_le(prefix, std::uint64_t(header.size()));
    sink.write(prefix, 8);
    sink.write(header.data(), header.size());
    std::vector<unsigned char> buffer;
    for (const Entry* e : order) {
      if (e->source == Source::Raw)
        sink.write(e->data, std::size_t(e->bytes));
      else if (e->source == Source::Float)
        stream_floats(sink, *e, static_cast<const float*>(e->data), buffer);
      else
        stream_floats(sink, *e, static_cast<const double*>(e->data), buffer);
    }
  }

  template <typename Sink, FloatScalar Scalar>
  static void stream_floats(Sink& sink, const Entry& e, const Scalar* data, std::vector<unsigned char>& buffer) {
    const std::size_t size = detail::float_dtype_size(e.dtype);
    if (e.rows > 1 && e.cols > 1) {
      // Column-major matrix, row-major file: gather a block of rows, then encode it.
      const Index block = detail::transpose_block_rows(e.rows, e.cols, sizeof(Scalar));
      std::vector<Scalar> rows(std::size_t(block * e.cols));
      buffer.resize(std::size_t(block * e.cols) * size);
      for (Index r0 = 0; r0 < e.rows; r0 += block) {
        const Index k = std::min(block, e.rows - r0);
        // Rows r0..r0+k of the column-major matrix are columns of its row-major view (cols x rows).
        detail::transpose_copy(data + r0, e.cols, k, e.rows, rows.data(), e.cols);
        detail::encode_floats(e.dtype, rows.data(), buffer.data(), std::size_t(k * e.cols));
        sink.write(buffer.data(), std::size_t(k * e.cols) * size);
      }
      return;
    }
    const std::size_t count = std::size_t(e.rows * e.cols);
    if (e.dtype == native_dtype<Scalar>() && detail::little_endian_host) {
      sink.write(data, count * size);
      return;
    }
    constexpr std::size_t chunk = std::size_t(1) << 16;
    buffer.resize(std::min(count, chunk) * size);
    for (std::size_t done = 0; done < count; done += chunk) {
      const std::size_t n = std::min(chunk, count - done);
      detail::encode_floats(e.dtype, data + done, buffer.data(), n);
      sink.write(buffer.data(), n * size);
    }
  }

  DType m_dtype;
  std::map<std::string, std::string> m_metadata;
  std::vector<Entry> m_entries;
};

}  // namespace rankwise
