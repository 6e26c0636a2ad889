#pragma once
/// \file rankwise/io/detail/safetensors_header.hpp
/// The safetensors header: dtype names, the description of one tensor, and the parser that checks
/// every rule of the format before a single tensor byte is read.
///
///   file   = [u64 little-endian N][N bytes of UTF-8 JSON, right-padded with spaces][data buffer]
///   header = {"__metadata__": {str: str}, "<name>": {"dtype": D, "shape": [...], "data_offsets": [b, e]}, ...}
/// Offsets are relative to the data buffer; sorted by offset, the tensors tile it exactly from 0 to
/// its end. Docs: docs/io/safetensors.md (the list of checks and their messages).

#include <rankwise/core/config.hpp>
#include <rankwise/core/error.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

namespace rankwise {

/// Element types of safetensors, in the reference implementation's order (by increasing alignment):
/// its writer sorts tensors by descending position in this list, then by name.
enum class DType : std::uint8_t {
  Bool, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ,
  I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64,
};

namespace detail {
struct DTypeEntry {
  DType dtype;
  const char* name;
  unsigned bits;
};
inline constexpr std::array<DTypeEntry, 22> dtype_table{{
    {DType::Bool, "BOOL", 8},        {DType::F4, "F4", 4},
    {DType::F6_E2M3, "F6_E2M3", 6},  {DType::F6_E3M2, "F6_E3M2", 6},
    {DType::U8, "U8", 8},            {DType::I8, "I8", 8},
    {DType::F8_E5M2, "F8_E5M2", 8},  {DType::F8_E4M3, "F8_E4M3", 8},
    {DType::F8_E8M0, "F8_E8M0", 8},  {DType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {DType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8}, {DType::I16, "I16", 16},
    {DType::U16, "U16", 16},         {DType::F16, "F16", 16},
    {DType::BF16, "BF16", 16},       {DType::I32, "I32", 32},
    {DType::U32, "U32", 32},         {DType::F32, "F32", 32},
    {DType::C64, "C64", 64},         {DType::F64, "F64", 64},
    {DType::I64, "I64", 64},         {DType::U64, "U64", 64},
}};
}  // namespace detail

/// The exact name a safetensors header uses ("F32", "BF16", ...).
inline const char* to_string(DType dtype) { return detail::dtype_table[std::size_t(dtype)].name; }

/// Bits per element (4 and 6 for the packed sub-byte types).
inline unsigned dtype_bits(DType dtype) { return detail::dtype_table[std::size_t(dtype)].bits; }

/// The dtype with this exact (case-sensitive) name, if any.
inline std::optional<DType> dtype_from_name(std::string_view name) {
  for (const detail::DTypeEntry& e : detail::dtype_table)
    if (name == e.name) return e.dtype;
  return std::nullopt;
}

/// The floating-point dtypes rankwise converts to and from float and double.
inline bool is_float_dtype(DType dtype) {
  return dtype == DType::F32 || dtype == DType::F64 || dtype == DType::F16 || dtype == DType::BF16;
}

/// One tensor of a safetensors file as its header describes it.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<Index> shape;  ///< row-major (C order), as the file stores it; empty for a 0-d tensor
  std::uint64_t begin = 0;   ///< data_offsets, relative to the start of the data buffer
  std::uint64_t end = 0;

  std::uint64_t byte_size() const { return end - begin; }
  /// The product of the shape: 0 when a dimension is 0, else at most Index's maximum (the reader
  /// refuses larger products). Computed in unsigned arithmetic, so no order of the factors overflows.
  Index element_count() const {
    std::uint64_t n = 1;
    for (Index d : shape) {
      if (d == 0) return 0;
      n *= std::uint64_t(d);
    }
    return Index(n);
  }
};

namespace detail {

inline constexpr std::uint64_t max_safetensors_header_length = 100'000'000;

/// What the header of a valid file says, with the tensors in offset order.
struct SafetensorsHeader {
  std::uint64_t header_length = 0;  ///< N
  std::uint64_t data_start = 0;     ///< 8 + N: file offset of the data buffer
  std::uint64_t file_size = 0;
  std::map<std::string, std::string> metadata;
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::size_t, std::less<>> index;  ///< name -> position in tensors
};

template <typename... Parts>
[[noreturn]] void safetensors_fail(const std::string& label, std::uint64_t offset, Parts&&... parts) {
  fail<FormatError>("rankwise::SafetensorsReader", "'", label, "' at byte ", offset, ": ",
                    std::forward<Parts>(parts)...);
}

/// The header length from the first 8 bytes; checks the bound and that the header fits in the file.
inline std::uint64_t checked_header_length(const unsigned char* prefix, std::uint64_t file_size,
                                           const std::string& label) {
  if (file_size < 8)
    safetensors_fail(label, 0, "expected an 8-byte header length, but the file has only ", file_size,
                     " bytes; truncated or not a safetensors file?");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | prefix[i];
  if (n > max_safetensors_header_length)
    safetensors_fail(label, 0, "header length must be at most ", max_safetensors_header_length, " bytes (got ", n,
                     "); not a safetensors file?");
  if (n > file_size - 8)
    safetensors_fail(label, 0, "header length ", n, " does not fit in the file (", file_size,
                     " bytes, so at most ", file_size - 8, "); truncated or not a safetensors file?");
  return n;
}

/// File offset of the header entry for `key` (its quoted name followed by ':'), or of the header.
inline std::uint64_t header_entry_offset(std::string_view text, const std::string& key) {
  std::string quoted;
  try {
    quoted = nlohmann::json(key).dump();
  } catch (const nlohmann::json::exception&) {
    return 8;
  }
  std::size_t pos = text.find(quoted);
  while (pos != std::string_view::npos) {
    std::size_t after = pos + quoted.size();
    while (after < text.size() && (text[after] == ' ' || text[after] == '\t' || text[after] == '\n' ||
                                   text[after] == '\r'))
      ++after;
    if (after < text.size() && text[after] == ':') return 8 + pos;
    pos = text.find(quoted, pos + 1);
  }
  return 8;
}

inline const char* json_kind(const nlohmann::json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null: return "null";
    case nlohmann::json::value_t::object: return "an object";
    case nlohmann::json::value_t::array: return "an array";
    case nlohmann::json::value_t::string: return "a string";
    case nlohmann::json::value_t::boolean: return "a boolean";
    case nlohmann::json::value_t::number_integer: return "a negative integer";
    case nlohmann::json::value_t::number_unsigned: return "an integer";
    case nlohmann::json::value_t::number_float: return "a non-integer number";
    default: return "an unexpected value";
  }
}

/// Parses the JSON with every key checked for duplicates and nesting limited to what a header needs
/// (object -> entry object -> arrays of numbers). Throws FormatError.
inline nlohmann::json parse_header_json(std::string_view text, const std::string& label) {
  std::vector<std::unordered_set<std::string>> keys;  // keys seen in each open object
  std::string entry;                                  // the top-level key being parsed
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) -> bool {
    using Event = nlohmann::json::parse_event_t;
    switch (event) {
      case Event::object_start:
      case Event::array_start:
        if (depth >= 3)
          safetensors_fail(label, header_entry_offset(text, entry), "entry '", entry,
                           "' nests deeper than a safetensors header allows (expected arrays of integers)");
        if (event == Event::object_start) keys.emplace_back();
        break;
      case Event::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case Event::key: {
        std::string key = parsed.get<std::string>();
        if (depth == 1) entry = key;
        if (!keys.empty() && !keys.back().insert(key).second) {
          if (depth == 1)
            safetensors_fail(label, 8, "the header names '", key, "' twice; names must be unique");
          safetensors_fail(label, header_entry_offset(text, entry), "entry '", entry, "' has the key '", key,
                           "' twice");
        }
        break;
      }
      default: break;
    }
    return true;
  };
  // nlohmann's lexer takes a NUL byte for the end of input and would ignore what follows; valid
  // JSON never holds one (strings must escape control characters), so reject it here.
  if (const std::size_t nul = text.find('\0'); nul != std::string_view::npos)
    safetensors_fail(label, 8 + nul, "the header is not valid JSON (a NUL byte; the header may be padded with spaces only)");
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback);
  } catch (const nlohmann::json::parse_error& e) {
    const std::uint64_t at = 8 + (e.byte > 0 ? std::uint64_t(e.byte) - 1 : 0);
    std::string what = e.what();
    const std::size_t colon = what.find(": ");
    safetensors_fail(label, at, "the header is not valid JSON (",
                     colon == std::string::npos ? what : what.substr(colon + 2), ")");
  } catch (const nlohmann::json::exception& e) {  // e.g. a number too large for a double
    safetensors_fail(label, 8, "the header is not valid JSON (", e.what(), ")");
  }
}

/// Reads one non-negative integer of a shape or offset list.
inline std::uint64_t header_uint(const nlohmann::json& v, const std::string& label, std::uint64_t at,
                                 const std::string& name, const char* field) {
  if (!v.is_number_unsigned())
    safetensors_fail(label, at, "tensor '", name, "': every entry of ", field,
                     " must be a non-negative integer (got ", json_kind(v), ")");
  return v.get<std::uint64_t>();
}

/// Checks every rule of the format. `text` is the N header bytes; `file_size` the whole file's size.
inline SafetensorsHeader parse_safetensors_header(std::string_view text, std::uint64_t file_size,
                                                  const std::string& label) {
  SafetensorsHeader header;
  header.header_length = text.size();
  header.data_start = 8 + std::uint64_t(text.size());
  header.file_size = file_size;
  if (text.empty() || text.front() != '{')
    safetensors_fail(label, 8, "the header must be a JSON object starting with '{' (got ",
                     text.empty() ? std::string("an empty header") : "byte " + std::to_string(int((unsigned char)text[0])),
                     ")");
  const nlohmann::json root = parse_header_json(text, label);
  if (!root.is_object()) safetensors_fail(label, 8, "the header must be a JSON object (got ", json_kind(root), ")");

  const std::uint64_t data_size = file_size - header.data_start;
  for (const auto& [name, entry] : root.items()) {
    const std::uint64_t at = header_entry_offset(text, name);
    if (name == "__metadata__") {
      if (entry.is_null()) continue;
      if (!entry.is_object())
        safetensors_fail(label, at, "__metadata__ must be an object of strings (got ", json_kind(entry), ")");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string())
          safetensors_fail(label, at, "__metadata__ values must be strings (got ", json_kind(value), " for key '",
                           key, "')");
        header.metadata.emplace(key, value.get<std::string>());
      }
      continue;
    }
    if (!entry.is_object())
      safetensors_fail(label, at, "tensor '", name, "' must be described by an object (got ", json_kind(entry), ")");
    TensorInfo info;
    info.name = name;
    const auto dtype_it = entry.find("dtype");
    const auto shape_it = entry.find("shape");
    const auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || shape_it == entry.end() || offsets_it == entry.end())
      safetensors_fail(label, at, "tensor '", name, "' must have \"dtype\", \"shape\" and \"data_offsets\"");
    if (!dtype_it->is_string())
      safetensors_fail(label, at, "tensor '", name, "': dtype must be a string (got ", json_kind(*dtype_it), ")");
    const std::string dtype_name = dtype_it->get<std::string>();
    const std::optional<DType> dtype = dtype_from_name(dtype_name);
    if (!dtype)
      safetensors_fail(label, at, "tensor '", name, "': dtype must be one of BOOL, U8, I8, I16, U16, F16, BF16, I32, "
                       "U32, F32, F64, I64, U64, C64, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, F4, F6_E2M3, "
                       "F6_E3M2 (got \"", dtype_name, "\")");
    info.dtype = *dtype;
    if (!shape_it->is_array())
      safetensors_fail(label, at, "tensor '", name, "': shape must be an array (got ", json_kind(*shape_it), ")");
    // The element count in unsigned arithmetic: 0 when any dimension is 0 (wherever it stands), else
    // at most Index's maximum, so that every size computed from it later fits.
    constexpr std::uint64_t max_elements = std::uint64_t(std::numeric_limits<Index>::max());
    std::uint64_t elements = 1;
    bool zero = false, too_many = false;
    for (const nlohmann::json& d : *shape_it) {
      const std::uint64_t dim = header_uint(d, label, at, name, "shape");
      if (dim > max_elements)
        safetensors_fail(label, at, "tensor '", name, "': a dimension must be at most ", max_elements, " (got ", dim,
                         ")");
      info.shape.push_back(Index(dim));
      if (dim == 0)
        zero = true;
      else if (!too_many && elements > max_elements / dim)
        too_many = true;
      else if (!too_many)
        elements *= dim;
    }
    if (zero)
      elements = 0;
    else if (too_many)
      safetensors_fail(label, at, "tensor '", name, "': the product of the shape exceeds ", max_elements,
                       " elements");
    if (!offsets_it->is_array() || offsets_it->size() != 2)
      safetensors_fail(label, at, "tensor '", name, "': data_offsets must be an array of two integers [begin, end]");
    info.begin = header_uint((*offsets_it)[0], label, at, name, "data_offsets");
    info.end = header_uint((*offsets_it)[1], label, at, name, "data_offsets");
    if (info.end < info.begin)
      safetensors_fail(label, at, "tensor '", name, "': data_offsets must have begin <= end (got [", info.begin, ", ",
                       info.end, "])");
    const unsigned bits = dtype_bits(info.dtype);
    if (elements > std::numeric_limits<std::uint64_t>::max() / bits)
      safetensors_fail(label, at, "tensor '", name, "': shape x dtype size overflows 64 bits");
    if ((elements * bits) % 8 != 0)
      safetensors_fail(label, at, "tensor '", name, "': ", elements, " elements of ", dtype_name,
                       " do not fill a whole number of bytes");
    const std::uint64_t bytes = elements * bits / 8;
    if (bytes != info.end - info.begin)
      safetensors_fail(label, at, "tensor '", name, "': shape x dtype size is ", bytes,
                       " bytes but data_offsets span ", info.end - info.begin, " bytes ([", info.begin, ", ", info.end,
                       "))");
    if (info.end > data_size)
      safetensors_fail(label, at, "tensor '", name, "': data_offsets [", info.begin, ", ", info.end,
                       ") run past the end of the file (the data buffer holds ", data_size, " bytes from byte ",
                       header.data_start, ")");
    header.tensors.push_back(std::move(info));
  }

  std::stable_sort(header.tensors.begin(), header.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t expected = 0;
  for (const TensorInfo& info : header.tensors) {
    if (info.begin != expected)
      safetensors_fail(label, header.data_start + std::min(info.begin, expected), "tensor '", info.name,
                       "' starts at data offset ", info.begin, " but the previous tensor ends at ", expected,
                       "; tensors must be contiguous from offset 0, without holes or overlaps");
    expected = info.end;
  }
  if (expected != data_size)
    safetensors_fail(label, header.data_start + expected, "the tensors end at data offset ", expected,
                     " but the data buffer holds ", data_size, " bytes; the last tensor must end at the end of the file");
  for (std::size_t i = 0; i < header.tensors.size(); ++i) header.index.emplace(header.tensors[i].name, i);
  return header;
}

}  // namespace detail
}  // namespace rankwise
