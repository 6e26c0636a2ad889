#pragma once
/// \file rankwise/io/peft.hpp
/// PEFT adapter directories (Hugging Face PEFT's save_pretrained layout), so that adapters move
/// between rankwise, PEFT and llama.cpp's convert_lora_to_gguf.py.
///
///   <dir>/adapter_model.safetensors  base_model.model.<path>.lora_A.weight [r, in]
///                                    base_model.model.<path>.lora_B.weight [out, r]
///   <dir>/adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules, use_rslora,
///                                    rank_pattern / alpha_pattern (modules whose rank or alpha differ), ...
/// PEFT's scale of a module is alpha_m / r_m (alpha_m / sqrt(r_m) with use_rslora). rankwise's LoRA
/// keeps s = alpha / r0 through rank surgery, so a module saved at rank r_m carries alpha_m = s r_m
/// (s sqrt(r_m)), chosen to the last bit so that alpha_m / r_m gives back s exactly. llama.cpp reads a
/// single lora_alpha; PeftAlpha::FoldIntoB writes one alpha and folds each module's ratio into B.
/// Every adapter kind that reduces exactly to a plain LoRA plugs in through lora_factors(adapter)
/// -> LoRAFactors (adapters/lora_export.hpp). Docs: docs/io/peft-interop.md

#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/lora_export.hpp>
#include <rankwise/adapters/vera.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/io/atomic_file.hpp>
#include <rankwise/io/detail/file.hpp>
#include <rankwise/io/peft_config.hpp>
#include <rankwise/io/named_adapter.hpp>
#include <rankwise/io/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace rankwise {

/// One module of a PEFT LoRA adapter: its path, its factors (adapters/lora_export.hpp) and what the
/// config records about it.
template <FloatScalar Scalar>
struct PeftLoRAModule {
  std::string path;
  LoRAFactors<Scalar> factors;
  bool use_rslora = false;  ///< write alpha as scale * sqrt(r) (a LoRA that uses rsLoRA)
  double dropout = 0.0;     ///< lora_dropout
  LoRAInit init = LoRAInit::KaimingUniform;
};

/// A PEFT LoRA directory as read: its config and its modules (sorted by path), each with the scale
/// PEFT would give it.
template <FloatScalar Scalar>
struct PeftLoRAAdapter {
  PeftConfig config;
  std::vector<PeftLoRAModule<Scalar>> modules;
};

/// How per-module scales are written.
enum class PeftAlpha {
  Pattern,    ///< exact A and B; modules whose alpha differs go to alpha_pattern (PEFT reads it; llama.cpp does not)
  FoldIntoB,  ///< one lora_alpha for all; B of a module with another alpha is multiplied by alpha_m / lora_alpha,
              ///< so that llama.cpp's single-alpha rule gives each module its scale (exact up to one rounding of B)
};

/// How load_peft_adapter() reads a directory (LoRA and VeRA; read_peft_vera() too).
struct PeftLoadOptions {
  /// Accept factors holding NaN or infinity (refused by default: a file from a diverged run).
  bool allow_non_finite = false;
};

struct PeftSaveOptions {
  DType dtype = DType::F32;                   ///< F32, F16, BF16 or F64
  PeftAlpha alpha = PeftAlpha::Pattern;
  std::vector<std::string> target_modules{};   ///< empty: the full paths of the saved modules
  std::string base_model_name_or_path{};       ///< empty: null
  std::string task_type{};                     ///< empty: null; else one of PEFT's task types
  std::map<std::string, std::string> metadata{};  ///< extra __metadata__ strings ("format" is "pt")
  bool durable = true;  ///< fsync the files (false: still atomic, but a power loss may lose the save)
};

/// The PEFT module of any adapter with an exact plain-LoRA form (lora_factors(adapter), found by
/// argument-dependent lookup: LoRA, DyLoRA at its active rank, VeRA, MELoRA, ...).
template <typename AdapterType>
  requires requires(const AdapterType& a) { lora_factors(a); }
auto peft_lora_module(std::string path, const AdapterType& adapter) {
  using Factors = std::remove_cvref_t<decltype(lora_factors(adapter))>;
  using Scalar = typename decltype(Factors::A)::Scalar;
  return PeftLoRAModule<Scalar>{std::move(path), lora_factors(adapter)};
}

/// A LoRA also records its rsLoRA flag, dropout and initialisation in the config.
template <FloatScalar Scalar, typename Base>
PeftLoRAModule<Scalar> peft_lora_module(std::string path, const LoRA<Scalar, Base>& lora) {
  return {std::move(path), lora_factors(lora), lora.options().use_rslora, lora.options().dropout, lora.options().init};
}

/// A model slot (adapters/any_linear.hpp): its adapter's plain-LoRA form; InvalidArgument for a slot
/// without one (a plain Linear, RED), which rankwise's own adapter directory saves instead.
template <FloatScalar Scalar>
PeftLoRAModule<Scalar> peft_lora_module(std::string path, const AnyLinear<Scalar>& slot) {
  if (const auto* lora = slot.template get_if<LoRA<Scalar>>()) return peft_lora_module(std::move(path), *lora);
  std::optional<LoRAFactors<Scalar>> factors = slot.lora_factors();
  if (!factors)
    detail::fail("rankwise::save_peft_adapter", "module '", path, "' holds a '", slot.kind(),
                 "' layer, whose update is not a plain LoRA; save it with save_rankwise_adapter");
  return {std::move(path), std::move(*factors)};
}

namespace detail {

inline constexpr const char* peft_prefix = "base_model.model.";
inline constexpr const char* peft_config_file = "adapter_config.json";
inline constexpr const char* peft_weights_file = "adapter_model.safetensors";

/// The alpha that PEFT turns back into `scale` for a module of rank r: alpha / r (or / sqrt(r))
/// must reproduce scale to the last bit, so the nearest neighbours of scale * r are tried too.
inline double peft_alpha_for_scale(double scale, Index rank, bool use_rslora) {
  const double denominator = use_rslora ? std::sqrt(double(rank)) : double(rank);
  const double guess = scale * denominator;
  double up = guess, down = guess;
  for (int i = 0; i < 8; ++i) {
    if (up / denominator == scale) return up;
    if (down / denominator == scale) return down;
    up = std::nextafter(up, HUGE_VAL);
    down = std::nextafter(down, -HUGE_VAL);
  }
  return guess;  // no double does it exactly; the scale then differs in its last bit
}

inline double peft_scale(double alpha, Index rank, bool use_rslora) {
  return use_rslora ? alpha / std::sqrt(double(rank)) : alpha / double(rank);
}

/// An integral alpha is written as an integer, as PEFT users write it.
inline nlohmann::json json_number(double value) {
  if (std::floor(value) == value && std::abs(value) < 9007199254740992.0) return std::int64_t(value);
  return value;
}

/// The most frequent value; ties go to the largest.
template <typename T>
T most_frequent(const std::vector<T>& values) {
  std::map<T, int> counts;
  for (const T& v : values) ++counts[v];
  T best = values.front();
  int best_count = 0;
  for (const auto& [value, count] : counts)
    if (count >= best_count) {
      best = value;
      best_count = count;
    }
  return best;
}

inline bool is_peft_task_type(const std::string& t) {
  return t == "SEQ_CLS" || t == "SEQ_2_SEQ_LM" || t == "CAUSAL_LM" || t == "TOKEN_CLS" || t == "QUESTION_ANS" ||
         t == "FEATURE_EXTRACTION";
}

inline std::string read_text_file(const std::filesystem::path& path, std::size_t limit, const char* where) {
  ReadOnlyFile file(path, where);
  if (file.size() > limit)
    fail<FormatError>(where, "'", file.path(), "' at byte 0: expected at most ", limit, " bytes (got ", file.size(), ")");
  std::string text(std::size_t(file.size()), '\0');
  if (!file.read_at(0, text.data(), text.size(), where))
    fail<FormatError>(where, "'", file.path(), "': the file shrank while it was read");
  return text;
}

inline void create_directory(const std::filesystem::path& dir, const char* where) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) fail<IoError>(where, "cannot create directory '", dir.string(), "': ", ec.message());
}

/// Splits "base_model.model.<path>.lora_A.weight" into path and "A"/"B"; false for any other key.
inline bool split_peft_lora_key(const std::string& key, std::string& path, char& which) {
  const std::string prefix = peft_prefix;
  for (const char* suffix : {".lora_A.weight", ".lora_B.weight"}) {
    const std::string s = suffix;
    if (key.size() > prefix.size() + s.size() && key.compare(0, prefix.size(), prefix) == 0 &&
        key.compare(key.size() - s.size(), s.size(), s) == 0) {
      path = key.substr(prefix.size(), key.size() - prefix.size() - s.size());
      which = s[6];
      return true;
    }
  }
  return false;
}

inline std::string peft_key(const std::string& path, char which) {
  return std::string(peft_prefix) + path + (which == 'A' ? ".lora_A.weight" : ".lora_B.weight");
}

/// What a PEFT LoRA directory holds, checked for internal consistency before any tensor is read.
struct PeftLoRAIndex {
  std::filesystem::path dir;
  PeftConfig config;
  SafetensorsReader reader;
  std::map<std::string, Index> ranks;  ///< module path -> rank, for modules with both lora_A and lora_B
  std::vector<std::string> problems;
};

inline PeftLoRAIndex index_peft_lora(const std::filesystem::path& dir, const char* where) {
  const std::filesystem::path config_path = dir / peft_config_file;
  const std::filesystem::path weights_path = dir / peft_weights_file;
  PeftConfig config = parse_peft_config(read_text_file(config_path, max_adapter_config_bytes, where), config_path.string());
  if (config.peft_type != "LORA")
    fail<FormatError>(where, "'", config_path.string(), "': peft_type must be \"LORA\" to load LoRA adapters (got \"",
                      config.peft_type, "\")");
  if (!std::filesystem::exists(weights_path) && std::filesystem::exists(dir / "adapter_model.bin"))
    fail<FormatError>(where, "'", dir.string(), "' holds adapter_model.bin (a pickle), which rankwise does not read; "
                      "save it with safe_serialization=True");
  PeftLoRAIndex index{dir, std::move(config), SafetensorsReader(weights_path), {}, {}};
  const PeftConfig& c = index.config;
  const std::string label = config_path.string();
  if (c.use_dora) index.problems.push_back("the config uses DoRA (use_dora), which rankwise does not load");
  if (c.lora_bias) index.problems.push_back("the config trains LoRA biases (lora_bias), which rankwise does not load");
  if (c.bias != "none")
    index.problems.push_back("the config saves base biases (bias \"" + c.bias + "\"), which rankwise does not load");

  std::map<std::string, std::pair<const TensorInfo*, const TensorInfo*>> pairs;
  for (const TensorInfo& t : index.reader.tensors()) {
    std::string path;
    char which = 0;
    if (!split_peft_lora_key(t.name, path, which)) {
      index.problems.push_back("tensor '" + t.name + "' is not a LoRA weight (base_model.model.<path>.lora_A.weight "
                               "or .lora_B.weight)" + (c.modules_to_save.empty() ? "" : "; modules_to_save is not supported"));
      continue;
    }
    (which == 'A' ? pairs[path].first : pairs[path].second) = &t;
  }
  const std::string file = weights_path.string();
  for (const auto& [path, ab] : pairs) {
    const TensorInfo* a = ab.first;
    const TensorInfo* b = ab.second;
    std::ostringstream p;
    p << "module '" << path << "': ";
    if (!a || !b) {
      p << "has " << (a ? "lora_A" : "lora_B") << " but no " << (a ? "lora_B" : "lora_A") << " in '" << file << "'";
      index.problems.push_back(p.str());
      continue;
    }
    bool ok = true;
    for (const TensorInfo* t : {a, b}) {
      if (t->shape.size() != 2 || !is_float_dtype(t->dtype)) {
        std::ostringstream q;
        q << "module '" << path << "': '" << t->name << "' must be a 2-D tensor of F32, F64, F16 or BF16 (got "
          << t->shape.size() << "-D " << to_string(t->dtype) << ", at byte " << index.reader.data_start() + t->begin
          << " of '" << file << "')";
        index.problems.push_back(q.str());
        ok = false;
      }
    }
    if (!ok) continue;
    const Index r = a->shape[0];
    if (b->shape[1] != r) {
      p << "lora_A is [" << a->shape[0] << ", " << a->shape[1] << "] and lora_B [" << b->shape[0] << ", "
        << b->shape[1] << "]: their ranks differ";
      index.problems.push_back(p.str());
      continue;
    }
    const Index expected = peft_rank_for(c, path, label);
    if (r != expected) {
      p << "has rank " << r << " but the config gives it rank " << expected << " (r or rank_pattern)";
      index.problems.push_back(p.str());
      continue;
    }
    const double alpha = peft_alpha_for(c, path, label);
    if (!(alpha > 0.0) || !std::isfinite(alpha)) {
      p << "alpha must be a finite number > 0 (got " << alpha << " from lora_alpha or alpha_pattern)";
      index.problems.push_back(p.str());
      continue;
    }
    index.ranks.emplace(path, r);
  }
  return index;
}

/// rankwise's exact scales, kept in the weights' __metadata__ under "rankwise.scales" (PEFT ignores
/// it): PEFT's alpha / r cannot express every double, and a rankwise-to-rankwise round trip should
/// give back the scale to the last bit.
inline constexpr const char* exact_scales_key = "rankwise.scales";

inline std::map<std::string, double> exact_scales(const SafetensorsReader& reader, const char* where) {
  std::map<std::string, double> out;
  auto it = reader.metadata().find(exact_scales_key);
  if (it == reader.metadata().end()) return out;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(it->second);
  } catch (const nlohmann::json::exception&) {
    fail<FormatError>(where, "'", reader.label(), "': __metadata__ \"", exact_scales_key, "\" must be a JSON object of numbers");
  }
  if (!j.is_object())
    fail<FormatError>(where, "'", reader.label(), "': __metadata__ \"", exact_scales_key, "\" must be a JSON object of numbers");
  for (const auto& [path, value] : j.items())
    if (value.is_number()) out.emplace(path, value.get<double>());
  return out;
}

/// The scale a loaded module gets: PEFT's alpha / r, or rankwise's exact scale when the file holds
/// one that agrees with it (a config edited by hand since, disagrees, and PEFT's value wins).
inline double loaded_scale(double peft, const std::map<std::string, double>& exact, const std::string& path) {
  auto it = exact.find(path);
  if (it == exact.end() || !(it->second > 0.0) || !std::isfinite(it->second)) return peft;
  return std::abs(it->second - peft) <= 1e-12 * peft ? it->second : peft;
}

[[noreturn]] inline void fail_with_problems(const char* where, const std::string& what,
                                            const std::vector<std::string>& problems) {
  std::ostringstream os;
  os << what << " (" << problems.size() << (problems.size() == 1 ? " problem" : " problems") << "):";
  for (const std::string& p : problems) os << "\n  - " << p;
  fail<FormatError>(where, os.str());
}

}  // namespace detail

/// Writes `modules` as a PEFT LoRA directory (created if needed). Modules of rank 0 are left out
/// (PEFT has no rank-0 LoRA; a module that is not targeted is simply not adapted). The weights are
/// written before the config, each file atomically. Returns the config written.
template <FloatScalar Scalar>
PeftConfig save_peft_lora(const std::filesystem::path& dir, const std::vector<PeftLoRAModule<Scalar>>& modules,
                          const PeftSaveOptions& options = {}) {
  const char* where = "rankwise::save_peft_adapter";
  if (!is_float_dtype(options.dtype))
    detail::fail(where, "dtype must be F32, F16, BF16 or F64 (got ", to_string(options.dtype), ")");
  if (!options.task_type.empty() && !detail::is_peft_task_type(options.task_type))
    detail::fail(where, "task_type must be empty or one of SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, "
                 "FEATURE_EXTRACTION (got \"", options.task_type, "\")");
  std::vector<const PeftLoRAModule<Scalar>*> saved;
  std::set<std::string> paths;
  for (const PeftLoRAModule<Scalar>& m : modules) {
    if (m.path.empty()) detail::fail(where, "every module needs a non-empty path");
    if (!paths.insert(m.path).second) detail::fail(where, "module path '", m.path, "' is listed twice");
    const LoRAFactors<Scalar>& f = m.factors;
    if (f.A.rows() != f.B.cols())
      detail::fail(where, "module '", m.path, "': A is ", f.A.rows(), " x ", f.A.cols(), " and B ", f.B.rows(), " x ",
                   f.B.cols(), "; their ranks must agree");
    if (!(f.scale > 0.0) || !std::isfinite(f.scale))
      detail::fail(where, "module '", m.path, "': scale must be a finite number > 0 (got ", f.scale, ")");
    if (f.rank() > 0) saved.push_back(&m);
  }
  if (saved.empty()) detail::fail(where, "no module of rank > 0 to save (PEFT needs at least one adapted module)");
  std::sort(saved.begin(), saved.end(), [](const auto* a, const auto* b) { return a->path < b->path; });

  // Scales become alphas; the most common rank and alpha become r and lora_alpha.
  bool use_rslora = options.alpha == PeftAlpha::Pattern;
  for (const auto* m : saved) use_rslora = use_rslora && m->use_rslora;
  std::vector<Index> ranks;
  std::vector<double> alphas, dropouts;
  for (const auto* m : saved) {
    ranks.push_back(m->factors.rank());
    alphas.push_back(detail::peft_alpha_for_scale(m->factors.scale, m->factors.rank(), use_rslora));
    dropouts.push_back(m->dropout);
  }
  PeftConfig config;
  config.peft_type = "LORA";
  config.r = detail::most_frequent(ranks);
  config.lora_alpha = detail::most_frequent(alphas);
  config.use_rslora = use_rslora;
  config.lora_dropout = detail::most_frequent(dropouts);
  config.inference_mode = true;
  bool all_gaussian = true;
  for (const auto* m : saved) all_gaussian = all_gaussian && m->init == LoRAInit::Gaussian;
  config.init_lora_weights = all_gaussian ? "gaussian" : "true";
  if (!options.base_model_name_or_path.empty()) config.base_model_name_or_path = options.base_model_name_or_path;
  if (!options.task_type.empty()) config.task_type = options.task_type;
  for (std::size_t i = 0; i < saved.size(); ++i) {
    config.target_modules.push_back(saved[i]->path);
    if (ranks[i] != config.r) config.rank_pattern.emplace_back(saved[i]->path, ranks[i]);
    if (options.alpha == PeftAlpha::Pattern && alphas[i] != config.lora_alpha)
      config.alpha_pattern.emplace_back(saved[i]->path, alphas[i]);
  }
  if (!options.target_modules.empty()) config.target_modules = options.target_modules;
  // PEFT's rules must give every module back its own rank and alpha, and target it.
  const std::string label = (dir / detail::peft_config_file).string();
  for (std::size_t i = 0; i < saved.size(); ++i) {
    const std::string& path = saved[i]->path;
    if (!peft_targets(config, path, label))
      detail::fail(where, "target_modules does not match module '", path, "'");
    if (peft_rank_for(config, path, label) != ranks[i] ||
        (options.alpha == PeftAlpha::Pattern && peft_alpha_for(config, path, label) != alphas[i]))
      detail::fail(where, "module '", path, "' gets another module's rank or alpha under PEFT's pattern rule "
                   "(\"(.*\\.)?(key)$\"); rename the modules so that no path is a dotted suffix of another");
  }

  SafetensorsWriter writer(options.dtype);
  for (const auto& [key, value] : options.metadata) writer.set_metadata(key, value);
  if (options.alpha == PeftAlpha::Pattern) {
    nlohmann::json scales = nlohmann::json::object();
    for (const auto* m : saved) scales[m->path] = m->factors.scale;
    writer.set_metadata(detail::exact_scales_key, scales.dump());
  }
  for (std::size_t i = 0; i < saved.size(); ++i) {
    const PeftLoRAModule<Scalar>& m = *saved[i];
    writer.add(detail::peft_key(m.path, 'A'), m.factors.A);
    if (options.alpha == PeftAlpha::FoldIntoB && alphas[i] != config.lora_alpha)
      writer.add(detail::peft_key(m.path, 'B'), Matrix<Scalar>(m.factors.B * Scalar(alphas[i] / config.lora_alpha)));
    else
      writer.add(detail::peft_key(m.path, 'B'), m.factors.B);
  }

  nlohmann::json j;
  nlohmann::json rank_pattern = nlohmann::json::object(), alpha_pattern = nlohmann::json::object();
  for (const auto& [path, rank] : config.rank_pattern) rank_pattern[path] = rank;
  for (const auto& [path, alpha] : config.alpha_pattern) alpha_pattern[path] = detail::json_number(alpha);
  j["alpha_pattern"] = alpha_pattern;
  j["base_model_name_or_path"] = config.base_model_name_or_path ? nlohmann::json(*config.base_model_name_or_path) : nullptr;
  j["bias"] = "none";
  j["exclude_modules"] = nullptr;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = all_gaussian ? nlohmann::json("gaussian") : nlohmann::json(true);
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["lora_alpha"] = detail::json_number(config.lora_alpha);
  j["lora_bias"] = false;
  j["lora_dropout"] = config.lora_dropout;
  j["modules_to_save"] = nullptr;
  j["peft_type"] = "LORA";
  j["r"] = config.r;
  j["rank_pattern"] = rank_pattern;
  j["revision"] = nullptr;
  j["target_modules"] = config.target_modules;
  j["task_type"] = config.task_type ? nlohmann::json(*config.task_type) : nullptr;
  j["use_dora"] = false;
  j["use_rslora"] = config.use_rslora;

  detail::create_directory(dir, where);
  writer.write(dir / detail::peft_weights_file, options.durable);
  write_file_atomically(dir / detail::peft_config_file, j.dump(2) + "\n", options.durable);
  return config;
}

/// Saves the adapters of a model as a PEFT LoRA directory. Works for every adapter type with a
/// lora_factors(adapter) overload (LoRA here; adapters that reduce exactly to LoRA add theirs).
template <typename AdapterType>
PeftConfig save_peft_adapter(const std::filesystem::path& dir, const std::vector<NamedAdapter<AdapterType>>& modules,
                             const PeftSaveOptions& options = {}) {
  detail::check_named_adapters("rankwise::save_peft_adapter", modules);
  using Module = decltype(peft_lora_module(std::string(), *modules.front().adapter));
  std::vector<Module> plain;
  plain.reserve(modules.size());
  for (const NamedAdapter<AdapterType>& m : modules) plain.push_back(peft_lora_module(m.path, *m.adapter));
  return save_peft_lora(dir, plain, options);
}

/// Reads a PEFT LoRA directory: the config and every module's factors with PEFT's scale. Every
/// inconsistency (unknown tensors, missing halves, ranks that disagree with the config) is reported
/// in one FormatError.
template <FloatScalar Scalar>
PeftLoRAAdapter<Scalar> read_peft_lora(const std::filesystem::path& dir) {
  const char* where = "rankwise::read_peft_lora";
  detail::PeftLoRAIndex index = detail::index_peft_lora(dir, where);
  if (!index.problems.empty())
    detail::fail_with_problems(where, "'" + dir.string() + "' is not a LoRA adapter rankwise can load", index.problems);
  PeftLoRAAdapter<Scalar> out;
  const std::string label = (dir / detail::peft_config_file).string();
  const std::map<std::string, double> exact = detail::exact_scales(index.reader, where);
  for (const auto& [path, rank] : index.ranks) {
    PeftLoRAModule<Scalar> m;
    m.path = path;
    m.factors.A = index.reader.template matrix<Scalar>(detail::peft_key(path, 'A'));
    m.factors.B = index.reader.template matrix<Scalar>(detail::peft_key(path, 'B'));
    m.factors.scale = detail::loaded_scale(
        detail::peft_scale(peft_alpha_for(index.config, path, label), rank, index.config.use_rslora), exact, path);
    m.use_rslora = index.config.use_rslora;
    m.dropout = index.config.lora_dropout;
    m.init = index.config.init_lora_weights == "gaussian" ? LoRAInit::Gaussian : LoRAInit::KaimingUniform;
    out.modules.push_back(std::move(m));
  }
  out.config = std::move(index.config);
  return out;
}

/// Loads a PEFT LoRA directory into the LoRA adapters of a model, by PEFT's rules: a module the
/// config targets (target_modules minus exclude_modules) takes the file's A, B and scale (its rank
/// becomes the file's); a module it does not target becomes rank 0, even when the file holds weights
/// for it (PEFT adds no adapter there and ignores them). The patterns are evaluated for every module,
/// so an invalid one is always refused.
/// Paths and shapes are checked against the model first and every mismatch is reported in one
/// FormatError; nothing changes unless everything fits. The factors and scales follow the rules of
/// LoRA's constructor (rank <= min(in, out), a finite scale > 0, finite values unless
/// options.allow_non_finite). Returns the config.
template <FloatScalar Scalar, typename Base>
PeftConfig load_peft_adapter(const std::filesystem::path& dir, const std::vector<NamedAdapter<LoRA<Scalar, Base>>>& modules,
                             const PeftLoadOptions& options = {}) {
  const char* where = "rankwise::load_peft_adapter";
  detail::check_named_adapters(where, modules);
  detail::PeftLoRAIndex index = detail::index_peft_lora(dir, where);
  std::vector<std::string>& problems = index.problems;
  const std::string label = (dir / detail::peft_config_file).string();
  const std::string file = (dir / detail::peft_weights_file).string();
  std::set<std::string> model_paths;
  std::vector<bool> loads(modules.size(), false);  // targeted and in the file
  for (std::size_t i = 0; i < modules.size(); ++i) {
    const auto& m = modules[i];
    model_paths.insert(m.path);
    const LoRA<Scalar, Base>& lora = *m.adapter;
    if (lora.is_merged()) problems.push_back("module '" + m.path + "' is merged; unmerge() it before loading");
    const bool targeted = peft_targets(index.config, m.path, label);  // for every module: a bad pattern fails
    auto it = index.ranks.find(m.path);
    if (it == index.ranks.end()) {
      const bool has_any = index.reader.contains(detail::peft_key(m.path, 'A')) ||
                           index.reader.contains(detail::peft_key(m.path, 'B'));
      if (!has_any && targeted)
        problems.push_back("module '" + m.path + "' is targeted by the config but '" + file +
                           "' has no lora_A/lora_B for it");
      continue;
    }
    if (!targeted) continue;  // PEFT adds no adapter here: the file's weights for it are not loaded
    loads[i] = true;
    const TensorInfo& a = index.reader.info(detail::peft_key(m.path, 'A'));
    const TensorInfo& b = index.reader.info(detail::peft_key(m.path, 'B'));
    if (a.shape[1] != lora.in_features() || b.shape[0] != lora.out_features()) {
      std::ostringstream p;
      p << "module '" << m.path << "': lora_A is [" << a.shape[0] << ", " << a.shape[1] << "] and lora_B ["
        << b.shape[0] << ", " << b.shape[1] << "] but the model's layer needs [r, " << lora.in_features() << "] and ["
        << lora.out_features() << ", r] (at byte " << index.reader.data_start() + a.begin << " of '" << file << "')";
      problems.push_back(p.str());
    }
  }
  for (const auto& [path, rank] : index.ranks)
    if (!model_paths.count(path)) problems.push_back("module '" + path + "' is in '" + file + "' but not in the model");
  if (!problems.empty())
    detail::fail_with_problems(where, "'" + dir.string() + "' does not match the model", problems);

  // Read everything first, then assign: a read error leaves the model untouched.
  const std::map<std::string, double> exact = detail::exact_scales(index.reader, where);
  std::vector<std::pair<Matrix<Scalar>, Matrix<Scalar>>> factors(modules.size());
  for (std::size_t i = 0; i < modules.size(); ++i) {
    const std::string& path = modules[i].path;
    if (loads[i]) {
      factors[i].first = index.reader.template matrix<Scalar>(detail::peft_key(path, 'A'));
      factors[i].second = index.reader.template matrix<Scalar>(detail::peft_key(path, 'B'));
    } else {
      factors[i].first.resize(0, modules[i].adapter->in_features());
      factors[i].second.resize(modules[i].adapter->out_features(), 0);
    }
  }
  for (std::size_t i = 0; i < modules.size(); ++i) {  // the constructor's rules, before anything changes
    const LoRA<Scalar, Base>& lora = *modules[i].adapter;
    auto it = index.ranks.find(modules[i].path);
    if (!loads[i]) continue;
    try {
      LoRA<Scalar, Base>::check_factors("lora", lora.in_features(), lora.out_features(), factors[i].first,
                                        factors[i].second, options.allow_non_finite);
      LoRA<Scalar, Base>::check_scaling("lora", lora.in_features(), lora.out_features(),
                                        peft_alpha_for(index.config, modules[i].path, label), it->second,
                                        index.config.use_rslora);
    } catch (const InvalidArgument& e) {
      problems.push_back("module '" + modules[i].path + "': " + e.what());
    }
  }
  if (!problems.empty())
    detail::fail_with_problems(where, "'" + dir.string() + "' does not hold valid LoRA adapters", problems);
  for (std::size_t i = 0; i < modules.size(); ++i) {
    LoRA<Scalar, Base>& lora = *modules[i].adapter;
    lora.assign_factors(factors[i].first, factors[i].second, options.allow_non_finite);
    auto it = index.ranks.find(modules[i].path);
    if (!loads[i]) continue;
    const double alpha = peft_alpha_for(index.config, modules[i].path, label);
    lora.set_scaling(alpha, it->second, index.config.use_rslora);
    const double scale = detail::loaded_scale(lora.scale(), exact, modules[i].path);
    if (scale != lora.scale() && std::isfinite(Scalar(scale))) lora.set_scale(scale);
  }
  return index.config;
}

// --- VeRA, natively (peft_type "VERA") --------------------------------------------------------------

/// One VeRA module of a PEFT directory: its path and vectors.
template <FloatScalar Scalar>
struct PeftVeRAModule {
  std::string path;
  Matrix<Scalar> lambda_d;  ///< r x 1
  Matrix<Scalar> lambda_b;  ///< out x 1
};

/// A PEFT VeRA directory as read: config, the shared projections, the modules (sorted by path).
template <FloatScalar Scalar>
struct PeftVeRAAdapter {
  PeftConfig config;
  std::shared_ptr<const VeRAProjections<Scalar>> projections;
  std::vector<PeftVeRAModule<Scalar>> modules;
};

namespace detail {
inline constexpr const char* peft_vera_A = "base_model.vera_A";
inline constexpr const char* peft_vera_B = "base_model.vera_B";

inline bool split_peft_vera_key(const std::string& key, std::string& path, char& which) {
  const std::string prefix = peft_prefix;
  for (const char* suffix : {".vera_lambda_d", ".vera_lambda_b"}) {
    const std::string s = suffix;
    if (key.size() > prefix.size() + s.size() && key.compare(0, prefix.size(), prefix) == 0 &&
        key.compare(key.size() - s.size(), s.size(), s) == 0) {
      path = key.substr(prefix.size(), key.size() - prefix.size() - s.size());
      which = s.back();
      return true;
    }
  }
  return false;
}
}  // namespace detail

/// Writes VeRA adapters as a native PEFT VeRA directory: vera_lambda_d / vera_lambda_b per module and
/// the shared projections as base_model.vera_A [r, max_in] / vera_B [max_out, r], trimmed to the
/// largest saved layer (PEFT sizes them so), with save_projection: true — PEFT's own projections come
/// from a torch generator that C++ cannot reproduce, so they always travel with the file. All modules
/// must share one bank. Returns the config written.
template <FloatScalar Scalar, typename Base>
PeftConfig save_peft_vera(const std::filesystem::path& dir, const std::vector<NamedAdapter<VeRA<Scalar, Base>>>& modules,
                          const PeftSaveOptions& options = {}) {
  const char* where = "rankwise::save_peft_vera";
  detail::check_named_adapters(where, modules);
  if (modules.empty()) detail::fail(where, "no module to save");
  if (!is_float_dtype(options.dtype))
    detail::fail(where, "dtype must be F32, F16, BF16 or F64 (got ", to_string(options.dtype), ")");
  if (!options.task_type.empty() && !detail::is_peft_task_type(options.task_type))
    detail::fail(where, "task_type must be empty or one of SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, "
                 "FEATURE_EXTRACTION (got \"", options.task_type, "\")");
  const VeRAProjections<Scalar>& bank = modules.front().adapter->projections();
  Index max_in = 0, max_out = 0;
  std::vector<const NamedAdapter<VeRA<Scalar, Base>>*> sorted;
  for (const auto& m : modules) {
    if (&m.adapter->projections() != &bank &&
        !(m.adapter->projections().A() == bank.A() && m.adapter->projections().B() == bank.B()))
      detail::fail(where, "module '", m.path, "' uses another projection bank than '", modules.front().path,
                   "'; PEFT's VeRA shares one bank across the model");
    max_in = std::max(max_in, m.adapter->in_features());
    max_out = std::max(max_out, m.adapter->out_features());
    sorted.push_back(&m);
  }
  std::sort(sorted.begin(), sorted.end(), [](const auto* a, const auto* b) { return a->path < b->path; });
  SafetensorsWriter writer(options.dtype);
  for (const auto& [key, value] : options.metadata) writer.set_metadata(key, value);
  writer.add(detail::peft_vera_A, Matrix<Scalar>(bank.A().leftCols(max_in)));
  writer.add(detail::peft_vera_B, Matrix<Scalar>(bank.B().topRows(max_out)));
  nlohmann::json targets = nlohmann::json::array();
  for (const auto* m : sorted) {
    writer.add_vector(std::string(detail::peft_prefix) + m->path + ".vera_lambda_d", m->adapter->lambda_d());
    writer.add_vector(std::string(detail::peft_prefix) + m->path + ".vera_lambda_b", m->adapter->lambda_b());
    targets.push_back(m->path);
  }
  PeftConfig config;
  config.peft_type = "VERA";
  config.r = bank.rank();
  config.target_modules = targets.get<std::vector<std::string>>();
  config.save_projection = true;
  config.d_initial = modules.front().adapter->options().d_initial;
  config.inference_mode = true;
  if (!options.base_model_name_or_path.empty()) config.base_model_name_or_path = options.base_model_name_or_path;
  if (!options.task_type.empty()) config.task_type = options.task_type;
  nlohmann::json j;
  j["base_model_name_or_path"] = config.base_model_name_or_path ? nlohmann::json(*config.base_model_name_or_path) : nullptr;
  j["bias"] = "none";
  j["d_initial"] = config.d_initial;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_weights"] = true;
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["modules_to_save"] = nullptr;
  j["peft_type"] = "VERA";
  j["projection_prng_key"] = 0;
  j["r"] = config.r;
  j["revision"] = nullptr;
  j["save_projection"] = true;
  j["target_modules"] = targets;
  j["task_type"] = config.task_type ? nlohmann::json(*config.task_type) : nullptr;
  j["vera_dropout"] = 0.0;
  detail::create_directory(dir, where);
  writer.write(dir / detail::peft_weights_file, options.durable);
  write_file_atomically(dir / detail::peft_config_file, j.dump(2) + "\n", options.durable);
  return config;
}

/// Reads a native PEFT VeRA directory; every inconsistency is reported in one FormatError, non-finite
/// projections or vectors too unless `options.allow_non_finite`.
template <FloatScalar Scalar>
PeftVeRAAdapter<Scalar> read_peft_vera(const std::filesystem::path& dir, const PeftLoadOptions& options = {}) {
  const char* where = "rankwise::read_peft_vera";
  const std::filesystem::path config_path = dir / detail::peft_config_file;
  PeftVeRAAdapter<Scalar> out;
  out.config = parse_peft_config(detail::read_text_file(config_path, detail::max_adapter_config_bytes, where),
                                 config_path.string());
  if (out.config.peft_type != "VERA")
    detail::fail<FormatError>(where, "'", config_path.string(), "': peft_type must be \"VERA\" (got \"",
                              out.config.peft_type, "\")");
  const SafetensorsReader reader(dir / detail::peft_weights_file);
  std::vector<std::string> problems;
  if (!reader.contains(detail::peft_vera_A) || !reader.contains(detail::peft_vera_B)) {
    problems.push_back("the projections base_model.vera_A / vera_B are not in the file (save_projection was false): "
                       "they were drawn by a torch generator that rankwise cannot reproduce");
    detail::fail_with_problems(where, "'" + dir.string() + "' is not a VeRA adapter rankwise can load", problems);
  }
  Matrix<Scalar> A = reader.template matrix<Scalar>(detail::peft_vera_A);
  Matrix<Scalar> B = reader.template matrix<Scalar>(detail::peft_vera_B);
  if (reader.info(detail::peft_vera_A).shape.size() != 2 || reader.info(detail::peft_vera_B).shape.size() != 2 ||
      A.rows() < 1 || B.cols() != A.rows() || A.rows() != out.config.r)
    problems.push_back("vera_A must be [r, max_in] and vera_B [max_out, r] with r = " + std::to_string(out.config.r) +
                       " (got [" + std::to_string(A.rows()) + ", " + std::to_string(A.cols()) + "] and [" +
                       std::to_string(B.rows()) + ", " + std::to_string(B.cols()) + "])");
  std::map<std::string, std::pair<const TensorInfo*, const TensorInfo*>> pairs;  // path -> (d, b)
  for (const TensorInfo& t : reader.tensors()) {
    if (t.name == detail::peft_vera_A || t.name == detail::peft_vera_B) continue;
    std::string path;
    char which = 0;
    if (!detail::split_peft_vera_key(t.name, path, which)) {
      problems.push_back("tensor '" + t.name + "' is not a VeRA tensor (base_model.model.<path>.vera_lambda_d / _b)");
      continue;
    }
    if (t.shape.size() != 1 || !is_float_dtype(t.dtype)) {
      problems.push_back("tensor '" + t.name + "' must be a 1-D float tensor");
      continue;
    }
    (which == 'd' ? pairs[path].first : pairs[path].second) = &t;
  }
  for (const auto& [path, db] : pairs) {
    if (!db.first || !db.second) {
      problems.push_back("module '" + path + "' lacks vera_lambda_" + (db.first ? "b" : "d"));
      continue;
    }
    if (db.first->shape[0] != A.rows())
      problems.push_back("module '" + path + "': vera_lambda_d has " + std::to_string(db.first->shape[0]) +
                         " entries but r = " + std::to_string(A.rows()));
    if (db.second->shape[0] > B.rows())
      problems.push_back("module '" + path + "': vera_lambda_b has " + std::to_string(db.second->shape[0]) +
                         " entries, more than vera_B's " + std::to_string(B.rows()) + " rows");
  }
  if (!problems.empty())
    detail::fail_with_problems(where, "'" + dir.string() + "' is not a VeRA adapter rankwise can load", problems);
  for (const auto& [path, db] : pairs)
    out.modules.push_back({path, reader.template matrix<Scalar>(db.first->name), reader.template matrix<Scalar>(db.second->name)});
  if (!options.allow_non_finite) {  // the constructors' rule: a file from a diverged run is refused
    const char* why = " holds a NaN or an infinity (PeftLoadOptions::allow_non_finite accepts it)";
    if (!A.allFinite()) problems.push_back(std::string(detail::peft_vera_A) + why);
    if (!B.allFinite()) problems.push_back(std::string(detail::peft_vera_B) + why);
    for (const auto& m : out.modules) {
      if (!m.lambda_d.allFinite()) problems.push_back("module '" + m.path + "': vera_lambda_d" + why);
      if (!m.lambda_b.allFinite()) problems.push_back("module '" + m.path + "': vera_lambda_b" + why);
    }
    if (!problems.empty())
      detail::fail_with_problems(where, "'" + dir.string() + "' does not hold valid VeRA adapters", problems);
  }
  out.projections = std::make_shared<const VeRAProjections<Scalar>>(std::move(A), std::move(B), options.allow_non_finite);
  return out;
}

/// Loads a native PEFT VeRA directory into a model's VeRA adapters. Their bank must hold the file's
/// projections (as its top-left block): build the adapters over read_peft_vera(dir).projections, or
/// from the same stored matrices. Every mismatch is reported in one FormatError; nothing changes
/// unless everything fits.
template <FloatScalar Scalar, typename Base>
PeftConfig load_peft_adapter(const std::filesystem::path& dir, const std::vector<NamedAdapter<VeRA<Scalar, Base>>>& modules,
                             const PeftLoadOptions& options = {}) {
  const char* where = "rankwise::load_peft_adapter";
  detail::check_named_adapters(where, modules);
  PeftVeRAAdapter<Scalar> file = read_peft_vera<Scalar>(dir, options);
  std::map<std::string, const PeftVeRAModule<Scalar>*> by_path;
  for (const auto& m : file.modules) by_path.emplace(m.path, &m);
  std::vector<std::string> problems;
  const VeRAProjections<Scalar>& saved = *file.projections;
  for (const auto& m : modules) {
    const VeRA<Scalar, Base>& v = *m.adapter;
    auto it = by_path.find(m.path);
    if (it == by_path.end()) {
      problems.push_back("module '" + m.path + "' is not in the file");
      continue;
    }
    const VeRAProjections<Scalar>& bank = v.projections();
    if (bank.rank() != saved.rank() || bank.max_in() < saved.max_in() || bank.max_out() < saved.max_out() ||
        bank.A().leftCols(saved.max_in()) != saved.A() || bank.B().topRows(saved.max_out()) != saved.B())
      problems.push_back("module '" + m.path + "': its projection bank does not hold the file's vera_A / vera_B; build "
                         "the VeRA adapters over read_peft_vera(dir).projections");
    if (it->second->lambda_b.rows() != v.out_features() || v.in_features() > saved.max_in())
      problems.push_back("module '" + m.path + "': the file's layer has out " + std::to_string(it->second->lambda_b.rows()) +
                         " (and in <= " + std::to_string(saved.max_in()) + ") but the model's has out " +
                         std::to_string(v.out_features()) + ", in " + std::to_string(v.in_features()));
    by_path.erase(it);
  }
  for (const auto& [path, m] : by_path) problems.push_back("module '" + path + "' is in the file but not in the model");
  if (!problems.empty()) detail::fail_with_problems(where, "'" + dir.string() + "' does not match the model", problems);
  std::map<std::string, const PeftVeRAModule<Scalar>*> all;
  for (const auto& m : file.modules) all.emplace(m.path, &m);
  for (const auto& m : modules) {
    m.adapter->lambda_d_parameter().value = all.at(m.path)->lambda_d;
    m.adapter->lambda_b_parameter().value = all.at(m.path)->lambda_b;
  }
  return file.config;
}

}  // namespace rankwise
