#pragma once
/// \file rankwise/io/peft_config.hpp
/// adapter_config.json of a PEFT adapter directory: PeftConfig (the keys rankwise reads), its parser
/// (unknown keys are ignored, as PEFT ignores them; known keys are type-checked), and PEFT's rules
/// for which modules a config targets and which rank and alpha each module gets.
///
///   target_modules  list: a module matches when its path equals an entry or ends with "." + entry;
///                   string: a regular expression that must match the whole path; "all-linear": all
///   rank_pattern / alpha_pattern  the first key k (in file order) for which the regular expression
///                   "(.*\.)?(k)$" matches the whole path overrides r / lora_alpha for that module
/// Docs: docs/io/peft-interop.md

#include <rankwise/core/config.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/pattern.hpp>

#include <nlohmann/json.hpp>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace rankwise {

/// The keys of adapter_config.json that rankwise reads, with PEFT's defaults.
struct PeftConfig {
  std::string peft_type;                            ///< "LORA", "VERA", ...
  Index r = 8;                                      ///< LoRA's default; VeRA's is 256
  double lora_alpha = 8.0;
  std::vector<std::string> target_modules;          ///< names matched against the end of module paths
  std::optional<std::string> target_modules_regex;  ///< set when the file gives a single string
  std::vector<std::string> exclude_modules;
  std::optional<std::string> exclude_modules_regex;
  bool use_rslora = false;
  std::vector<std::pair<std::string, Index>> rank_pattern;    ///< in file order
  std::vector<std::pair<std::string, double>> alpha_pattern;  ///< in file order
  double lora_dropout = 0.0;
  std::string bias = "none";                        ///< "none", "all" or "lora_only"
  bool fan_in_fan_out = false;
  std::string init_lora_weights = "true";           ///< "true", "false" or a method name ("gaussian", ...)
  bool inference_mode = false;
  std::optional<std::string> task_type;
  std::optional<std::string> base_model_name_or_path;
  bool use_dora = false;
  bool lora_bias = false;
  std::vector<std::string> modules_to_save;
  // VeRA
  bool save_projection = true;
  std::uint64_t projection_prng_key = 0;
  double d_initial = 0.1;
  double vera_dropout = 0.0;
};

namespace detail {

inline constexpr std::size_t max_adapter_config_bytes = std::size_t(16) << 20;

/// Byte offset of `"key":` in a JSON text (0 if not found), for error messages.
inline std::size_t json_key_offset(std::string_view text, const std::string& key) {
  const std::string quoted = "\"" + key + "\"";
  std::size_t pos = text.find(quoted);
  while (pos != std::string_view::npos) {
    std::size_t after = pos + quoted.size();
    while (after < text.size() && std::isspace(static_cast<unsigned char>(text[after]))) ++after;
    if (after < text.size() && text[after] == ':') return pos;
    pos = text.find(quoted, pos + 1);
  }
  return 0;
}

class PeftConfigParser {
 public:
  PeftConfigParser(std::string_view text, std::string label) : m_text(text), m_label(std::move(label)) {}

  PeftConfig parse() {
    // nlohmann's lexer takes a NUL byte for the end of input; valid JSON never holds one.
    if (const std::size_t nul = m_text.find('\0'); nul != std::string_view::npos)
      fail_at(nul, "not valid JSON (a NUL byte)");
    nlohmann::ordered_json root;
    try {
      root = nlohmann::ordered_json::parse(m_text.begin(), m_text.end());
    } catch (const nlohmann::json::parse_error& e) {
      std::string what = e.what();
      const std::size_t colon = what.find(": ");
      fail_at(e.byte > 0 ? e.byte - 1 : 0, "not valid JSON (", colon == std::string::npos ? what : what.substr(colon + 2),
              ")");
    } catch (const nlohmann::json::exception& e) {
      fail_at(0, "not valid JSON (", e.what(), ")");
    }
    if (!root.is_object()) fail_at(0, "the config must be a JSON object");
    m_root = &root;
    PeftConfig c;
    const auto type = string_value("peft_type");
    if (!type) fail_at(0, "\"peft_type\" must be given (\"LORA\", \"VERA\", ...)");
    c.peft_type = *type;
    if (c.peft_type == "VERA") c.r = 256;
    if (auto v = integer_value("r", 1)) c.r = Index(*v);
    if (auto v = number_value("lora_alpha")) c.lora_alpha = *v;
    module_list("target_modules", c.target_modules, c.target_modules_regex);
    module_list("exclude_modules", c.exclude_modules, c.exclude_modules_regex);
    if (auto v = bool_value("use_rslora")) c.use_rslora = *v;
    c.rank_pattern = int_pattern("rank_pattern");
    c.alpha_pattern = number_pattern("alpha_pattern");
    if (auto v = number_value("lora_dropout")) c.lora_dropout = *v;
    if (!(c.lora_dropout >= 0.0 && c.lora_dropout < 1.0))
      fail_key("lora_dropout", "must be in [0, 1) (got ", c.lora_dropout, ")");
    if (auto v = string_value("bias")) c.bias = *v;
    if (c.bias != "none" && c.bias != "all" && c.bias != "lora_only" && c.bias != "vera_only")
      fail_key("bias", "must be \"none\", \"all\", \"lora_only\" or \"vera_only\" (got \"", c.bias, "\")");
    if (auto v = bool_value("fan_in_fan_out")) c.fan_in_fan_out = *v;
    if (const auto* v = find("init_lora_weights")) {
      if (v->is_boolean())
        c.init_lora_weights = v->get<bool>() ? "true" : "false";
      else if (v->is_string())
        c.init_lora_weights = v->get<std::string>();
      else if (!v->is_null())
        fail_key("init_lora_weights", "must be a boolean or a string (got ", kind(*v), ")");
    }
    if (auto v = bool_value("inference_mode")) c.inference_mode = *v;
    c.task_type = string_value("task_type");
    c.base_model_name_or_path = string_value("base_model_name_or_path");
    if (auto v = bool_value("use_dora")) c.use_dora = *v;
    if (auto v = bool_value("lora_bias")) c.lora_bias = *v;
    std::optional<std::string> modules_to_save_regex;
    module_list("modules_to_save", c.modules_to_save, modules_to_save_regex);
    if (modules_to_save_regex) c.modules_to_save.push_back(*modules_to_save_regex);
    if (auto v = bool_value("save_projection")) c.save_projection = *v;
    if (auto v = integer_value("projection_prng_key", 0)) c.projection_prng_key = *v;
    if (auto v = number_value("d_initial")) c.d_initial = *v;
    if (auto v = number_value("vera_dropout")) c.vera_dropout = *v;
    return c;
  }

 private:
  template <typename... Parts>
  [[noreturn]] void fail_at(std::size_t offset, Parts&&... parts) const {
    fail<FormatError>("rankwise::read_peft_config", "'", m_label, "' at byte ", offset, ": ",
                      std::forward<Parts>(parts)...);
  }
  template <typename... Parts>
  [[noreturn]] void fail_key(const std::string& key, Parts&&... parts) const {
    fail_at(json_key_offset(m_text, key), "\"", key, "\" ", std::forward<Parts>(parts)...);
  }

  static const char* kind(const nlohmann::ordered_json& j) {
    switch (j.type()) {
      case nlohmann::json::value_t::null: return "null";
      case nlohmann::json::value_t::object: return "an object";
      case nlohmann::json::value_t::array: return "an array";
      case nlohmann::json::value_t::string: return "a string";
      case nlohmann::json::value_t::boolean: return "a boolean";
      case nlohmann::json::value_t::number_integer:
      case nlohmann::json::value_t::number_unsigned: return "an integer";
      case nlohmann::json::value_t::number_float: return "a number";
      default: return "an unexpected value";
    }
  }

  /// The value of a top-level key, or nullptr when absent or null (PEFT's "use the default").
  const nlohmann::ordered_json* find(const std::string& key) const {
    auto it = m_root->find(key);
    if (it == m_root->end() || it->is_null()) return nullptr;
    return &*it;
  }

  std::optional<std::string> string_value(const std::string& key) const {
    const auto* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_string()) fail_key(key, "must be a string (got ", kind(*v), ")");
    return v->get<std::string>();
  }

  std::optional<bool> bool_value(const std::string& key) const {
    const auto* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) fail_key(key, "must be true or false (got ", kind(*v), ")");
    return v->get<bool>();
  }

  std::optional<double> number_value(const std::string& key) const {
    const auto* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_number()) fail_key(key, "must be a number (got ", kind(*v), ")");
    return v->get<double>();
  }

  std::optional<std::uint64_t> integer_value(const std::string& key, std::uint64_t minimum) const {
    const auto* v = find(key);
    if (!v) return std::nullopt;
    if (!v->is_number_unsigned() || v->get<std::uint64_t>() < minimum ||
        v->get<std::uint64_t>() > std::uint64_t(std::numeric_limits<Index>::max()))
      fail_key(key, "must be an integer >= ", minimum, " (got ", v->dump(), ")");
    return v->get<std::uint64_t>();
  }

  void module_list(const std::string& key, std::vector<std::string>& names, std::optional<std::string>& regex) const {
    const auto* v = find(key);
    if (!v) return;
    if (v->is_string()) {
      regex = v->get<std::string>();
      return;
    }
    if (!v->is_array()) fail_key(key, "must be a list of module names or a regular expression (got ", kind(*v), ")");
    for (const auto& name : *v) {
      if (!name.is_string()) fail_key(key, "must list module names as strings (got ", kind(name), ")");
      names.push_back(name.get<std::string>());
    }
  }

  std::vector<std::pair<std::string, Index>> int_pattern(const std::string& key) const {
    std::vector<std::pair<std::string, Index>> out;
    const auto* v = find(key);
    if (!v) return out;
    if (!v->is_object()) fail_key(key, "must be an object of module -> rank (got ", kind(*v), ")");
    for (const auto& [name, value] : v->items()) {
      if (!value.is_number_unsigned() || value.get<std::uint64_t>() < 1 ||
          value.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<Index>::max()))
        fail_key(key, "values must be integers >= 1 (got ", value.dump(), " for '", name, "')");
      out.emplace_back(name, Index(value.get<std::uint64_t>()));
    }
    return out;
  }

  std::vector<std::pair<std::string, double>> number_pattern(const std::string& key) const {
    std::vector<std::pair<std::string, double>> out;
    const auto* v = find(key);
    if (!v) return out;
    if (!v->is_object()) fail_key(key, "must be an object of module -> alpha (got ", kind(*v), ")");
    for (const auto& [name, value] : v->items()) {
      if (!value.is_number()) fail_key(key, "values must be numbers (got ", kind(value), " for '", name, "')");
      out.emplace_back(name, value.get<double>());
    }
    return out;
  }

  std::string_view m_text;
  std::string m_label;
  const nlohmann::ordered_json* m_root = nullptr;
};

/// `pattern` compiled (core/pattern.hpp: RE2, linear time), or FormatError naming the file, `what`
/// and `shown` (the text as the file has it).
inline PathPattern peft_pattern(const std::string& pattern, const std::string& shown, const std::string& label,
                                const char* what) {
  std::string error;
  std::optional<PathPattern> compiled = PathPattern::compile(pattern, error);
  if (!compiled)
    fail<FormatError>("rankwise::read_peft_config", "'", label, "': ", what, " '",
                      shown.size() > 200 ? shown.substr(0, 200) + "..." : shown,
                      "' is not a valid regular expression (", error, ")");
  return *compiled;
}

/// PEFT's pattern rule: does "(.*\.)?(key)" match the whole path? Throws FormatError for a key
/// that is not a valid regular expression.
inline bool peft_pattern_matches(const std::string& key, const std::string& path, const std::string& label) {
  if (key.size() > max_path_pattern_length)  // the length rule applies to the key as written
    return peft_pattern(key, key, label, "pattern key").full_match(path);
  return peft_pattern("(.*\\.)?(" + key + ")", key, label, "pattern key").full_match(path);
}

inline bool peft_list_matches(const std::vector<std::string>& names, const std::optional<std::string>& regex,
                              const std::string& path, const std::string& label) {
  if (regex) {
    if (*regex == "all-linear") return true;
    return peft_pattern(*regex, *regex, label, "target").full_match(path);
  }
  for (const std::string& name : names) {
    if (name == "all-linear" || path == name) return true;
    if (path.size() > name.size() && path.compare(path.size() - name.size(), name.size(), name) == 0 &&
        path[path.size() - name.size() - 1] == '.')
      return true;
  }
  return false;
}

}  // namespace detail

/// Parses adapter_config.json text; `label` names it in errors. Throws FormatError.
inline PeftConfig parse_peft_config(std::string_view text, const std::string& label = "adapter_config.json") {
  if (text.size() > detail::max_adapter_config_bytes)
    detail::fail<FormatError>("rankwise::read_peft_config", "'", label, "' at byte 0: a config must be at most ",
                      detail::max_adapter_config_bytes, " bytes (got ", text.size(), ")");
  return detail::PeftConfigParser(text, label).parse();
}

/// Whether the config adapts the module at `path` (target_modules, minus exclude_modules).
inline bool peft_targets(const PeftConfig& config, const std::string& path, const std::string& label = "adapter_config.json") {
  if (!detail::peft_list_matches(config.target_modules, config.target_modules_regex, path, label)) return false;
  return !detail::peft_list_matches(config.exclude_modules, config.exclude_modules_regex, path, label);
}

/// The rank PEFT gives the module at `path`: rank_pattern's first matching key, else r.
inline Index peft_rank_for(const PeftConfig& config, const std::string& path, const std::string& label = "adapter_config.json") {
  for (const auto& [key, rank] : config.rank_pattern)
    if (detail::peft_pattern_matches(key, path, label)) return rank;
  return config.r;
}

/// The alpha PEFT gives the module at `path`: alpha_pattern's first matching key, else lora_alpha.
inline double peft_alpha_for(const PeftConfig& config, const std::string& path, const std::string& label = "adapter_config.json") {
  for (const auto& [key, alpha] : config.alpha_pattern)
    if (detail::peft_pattern_matches(key, path, label)) return alpha;
  return config.lora_alpha;
}

}  // namespace rankwise
