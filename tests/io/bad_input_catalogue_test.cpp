// The bad-input catalogue: malformed files (safetensors, PEFT directories, checkpoints, rankwise
// adapter directories) and bad option sets (the library's options, examples/finetune's command line),
// each generated here from a valid one by one change. Every case must be refused with the documented
// exception type and a message fragment that says what must hold; where the input is loaded into a
// model, the model must be unchanged afterwards. The fragments are the contract listed in
// docs/errors.md ("The catalogue"): the last test case checks that the page lists every one.
// Run with RANKWISE_CATALOGUE_PRINT=1 to print every case with its full message.
#include <rankwise/adapters/bora.hpp>
#include <rankwise/adapters/factory.hpp>
#include <rankwise/core/pattern.hpp>
#include <rankwise/io/checkpoint.hpp>
#include <rankwise/io/peft.hpp>
#include <rankwise/io/rankwise_adapter.hpp>
#include <rankwise/io/safetensors.hpp>
#include <rankwise/io/state.hpp>
#include <rankwise/models/adapter_set.hpp>
#include <rankwise/models/bora_host.hpp>
#include <rankwise/models/trainer.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/optim/lr_schedule.hpp>

#include "finetune_cli.hpp"
#include "support/matchers.hpp"
#include "support/paths.hpp"
#include "support/temp_dir.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace {
namespace catalogue {
namespace fs = std::filesystem;
using rankwise::AnyLinear;
using rankwise::Index;
using rankwise::Linear;
using rankwise::LoRA;
using rankwise::Matrix;
using rankwise::NamedAdapter;
using rankwise::Parameter;
using rankwise::Random;
using nlohmann::json;

// --- the catalogue's mechanics -------------------------------------------------------------------

struct Case {
  std::string input;     // which kind of input: "safetensors", "PEFT directory", ...
  std::string name;      // what is wrong with it
  std::string type;      // the exception type it must raise
  std::string fragment;  // a part of the message it must carry
  std::function<void()> attempt;               // must throw
  std::function<bool()> unchanged = nullptr;   // when set: the target is exactly as before
};

struct Outcome {
  std::string type = "nothing";
  std::string message;
};

Outcome run_attempt(const std::function<void()>& attempt) {
  try {
    attempt();
  } catch (const rankwise::InvalidArgument& e) {
    return {"InvalidArgument", e.what()};
  } catch (const rankwise::StateError& e) {
    return {"StateError", e.what()};
  } catch (const rankwise::FormatError& e) {
    return {"FormatError", e.what()};
  } catch (const rankwise::IoError& e) {
    return {"IoError", e.what()};
  } catch (const rankwise::Error& e) {
    return {"Error", e.what()};
  } catch (const std::exception& e) {  // a rankwise::AssertionError or anything else: never acceptable
    return {std::string("a non-rankwise exception (") + typeid(e).name() + ")", e.what()};
  }
  return {};
}

/// A case on a file directory: a fresh copy of the valid directory `valid` (as `copy`), changed by
/// `edit`, then loaded by `load`; `unchanged` tells whether the model loaded into is as before.
Case directory_case(std::string input, std::string name, std::string type, std::string fragment, fs::path valid,
                    fs::path copy, std::function<void(const fs::path&)> edit, std::function<void(const fs::path&)> load,
                    std::function<bool()> unchanged) {
  return {std::move(input), std::move(name), std::move(type), std::move(fragment),
          [valid = std::move(valid), copy = std::move(copy), edit = std::move(edit), load = std::move(load)] {
            fs::remove_all(copy);
            fs::copy(valid, copy, fs::copy_options::recursive);
            edit(copy);
            load(copy);
          },
          std::move(unchanged)};
}

json read_json(const fs::path& path) { return json::parse(rankwise::test_support::read_text(path)); }

void write_json(const fs::path& path, const json& j) { rankwise::test_support::write_text(path, j.dump(2)); }

/// Rewrites a safetensors file with `change` applied to its tensors (as double matrices; each keeps its
/// dtype and rank unless `change` says otherwise) and its metadata kept.
struct TensorEdit {
  std::map<std::string, Matrix<double>> matrices;  // 2-D tensors
  std::map<std::string, Matrix<double>> vectors;   // 1-D tensors (columns)
  std::map<std::string, rankwise::DType> dtypes;
};

void rewrite_tensors(const fs::path& file, const std::function<void(TensorEdit&)>& change) {
  TensorEdit edit;
  std::map<std::string, std::string> metadata;
  {
    const rankwise::SafetensorsReader reader(file);
    metadata = reader.metadata();
    for (const rankwise::TensorInfo& t : reader.tensors()) {
      edit.dtypes[t.name] = t.dtype;
      if (t.shape.size() == 1) {
        const std::vector<double> v = reader.values<double>(t.name);
        edit.vectors[t.name] = Eigen::Map<const Matrix<double>>(v.data(), Index(v.size()), 1);
      } else {
        edit.matrices[t.name] = reader.matrix<double>(t.name);
      }
    }
  }
  change(edit);
  rankwise::SafetensorsWriter writer;
  for (const auto& [key, value] : metadata) writer.set_metadata(key, value);
  const auto dtype = [&](const std::string& name) {
    auto it = edit.dtypes.find(name);
    return it == edit.dtypes.end() ? rankwise::DType::F32 : it->second;
  };
  for (auto& [name, m] : edit.matrices) writer.add(name, m, dtype(name));
  for (auto& [name, v] : edit.vectors) writer.add_vector(name, v, dtype(name));
  writer.write(file, false);
}

/// Rewrites a safetensors file's header (as JSON) and keeps its data bytes.
void edit_header(const fs::path& file, const std::function<void(json&)>& change) {
  const std::vector<unsigned char> bytes = rankwise::test_support::read_bytes(file);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[std::size_t(i)];
  json header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + std::ptrdiff_t(n));
  change(header);
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<unsigned char> out(8);
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = (unsigned char)((std::uint64_t(text.size()) >> (8 * i)) & 0xFF);
  out.insert(out.end(), text.begin(), text.end());
  out.insert(out.end(), bytes.begin() + 8 + std::ptrdiff_t(n), bytes.end());
  rankwise::test_support::write_text(file, std::string(out.begin(), out.end()));
}

/// The bytes of a safetensors file with the given header text and `data_bytes` zero bytes of data.
std::vector<unsigned char> safetensors_bytes(const std::string& header, std::size_t data_bytes = 0,
                                             std::uint64_t header_length = std::uint64_t(-1)) {
  const std::uint64_t n = header_length == std::uint64_t(-1) ? header.size() : header_length;
  std::vector<unsigned char> bytes(8);
  for (int i = 0; i < 8; ++i) bytes[std::size_t(i)] = (unsigned char)((n >> (8 * i)) & 0xFF);
  bytes.insert(bytes.end(), header.begin(), header.end());
  bytes.resize(bytes.size() + data_bytes, 0);
  return bytes;
}

void read_every_tensor(const std::vector<unsigned char>& bytes) {
  const auto reader = rankwise::SafetensorsReader::from_bytes(bytes, "catalogue.safetensors");
  for (const rankwise::TensorInfo& t : reader.tensors()) (void)reader.values<double>(t.name);
}

template <typename Scalar>
bool same_bits(const Matrix<Scalar>& a, const Matrix<Scalar>& b) {
  return rankwise::test_support::same_bits(a, b);
}

// --- the models the files are loaded into ----------------------------------------------------------

/// Two LoRA layers, as a PEFT directory holds them.
struct LoRAPair {
  std::unique_ptr<LoRA<float>> q, up;
  explicit LoRAPair(std::uint64_t seed) {
    Random rng(seed);
    q = std::make_unique<LoRA<float>>(Linear<float>(8, 8, rng), rankwise::LoRAOptions{.rank = 4, .alpha = 8.0}, rng);
    up = std::make_unique<LoRA<float>>(Linear<float>(8, 12, rng), rankwise::LoRAOptions{.rank = 2, .alpha = 4.0}, rng);
    for (LoRA<float>* l : {q.get(), up.get()})  // B is zero at initialisation: make a lost change visible
      l->assign_factors(l->A(), rankwise::test_support::random_matrix<float>(l->out_features(), l->rank(), rng));
  }
  std::vector<NamedAdapter<LoRA<float>>> named() { return {{"layers.0.attn.q_proj", q.get()}, {"layers.0.mlp.up_proj", up.get()}}; }
  std::vector<Matrix<float>> snapshot() const {
    Matrix<float> scales(1, 2);
    scales << float(q->scale()), float(up->scale());
    return {q->A(), q->B(), up->A(), up->B(), scales};
  }
};

/// One slot of every adapter kind and a plain one, over one VeRA bank.
struct Family {
  std::shared_ptr<const rankwise::VeRAProjections<float>> bank;
  std::vector<AnyLinear<float>> slots;
  explicit Family(std::uint64_t seed, std::uint64_t bank_seed = 5) {
    Random bank_rng(bank_seed);
    bank = rankwise::VeRAProjections<float>::make(4, 8, 12, bank_rng);
    Random rng(seed), base_rng(77);
    const rankwise::AdapterContext<float> context{bank};
    using rankwise::AdapterSpec;
    slots.push_back(rankwise::make_linear(Linear<float>(8, 8, base_rng), AdapterSpec{"lora", rankwise::LoRAOptions{.rank = 3}}, rng, context));
    slots.push_back(rankwise::make_linear(Linear<float>(8, 8, base_rng), AdapterSpec{"dylora", rankwise::DyLoRAOptions{.max_rank = 4}}, rng, context));
    slots.push_back(rankwise::make_linear(Linear<float>(8, 12, base_rng), AdapterSpec{"vera", std::monostate{}}, rng, context));
    slots.push_back(rankwise::make_linear(Linear<float>(8, 8, base_rng), AdapterSpec{"melora", rankwise::MELoRAOptions{.n = 2, .mini_rank = 2}}, rng, context));
    slots.push_back(rankwise::make_linear(Linear<float>(8, 8, base_rng), AdapterSpec{"red", std::monostate{}}, rng, context));
    for (auto& slot : slots) {
      slot.set_path("layers.0." + slot.kind());
      for (Parameter<float>* p : slot.parameters())
        if (p->trainable) p->value = rankwise::test_support::random_matrix<float>(p->value.rows(), p->value.cols(), rng);
    }
  }
  std::vector<NamedAdapter<AnyLinear<float>>> named() {
    std::vector<NamedAdapter<AnyLinear<float>>> out;
    for (auto& slot : slots) out.push_back({"layers.0." + slot.kind(), &slot});
    return out;
  }
  std::vector<Parameter<float>*> trainable() {
    std::vector<Parameter<float>*> out;
    for (auto& slot : slots)
      for (Parameter<float>* p : slot.parameters())
        if (p->trainable) out.push_back(p);
    return out;
  }
  std::vector<Matrix<float>> snapshot() {
    std::vector<Matrix<float>> out;
    for (auto& slot : slots)
      for (Parameter<float>* p : slot.parameters()) out.push_back(p->value);
    return out;
  }
};

template <typename Model>
std::function<bool()> unchanged_check(std::shared_ptr<Model> model) {
  auto before = std::make_shared<std::vector<Matrix<float>>>(model->snapshot());
  return [model, before] {
    const std::vector<Matrix<float>> now = model->snapshot();
    if (now.size() != before->size()) return false;
    for (std::size_t i = 0; i < now.size(); ++i)
      if (!same_bits(now[i], (*before)[i])) return false;
    return true;
  };
}

// --- the cases --------------------------------------------------------------------------------------

void add_safetensors_cases(std::vector<Case>& cases) {
  const auto bad = [&](std::string name, std::string fragment, std::vector<unsigned char> bytes) {
    cases.push_back({"safetensors", std::move(name), "FormatError", std::move(fragment),
                     [bytes = std::move(bytes)] { read_every_tensor(bytes); }});
  };
  const std::string ok = R"("w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})";
  bad("shorter than its 8-byte header length", "expected an 8-byte header length", std::vector<unsigned char>{1, 0, 0});
  bad("header length beyond the end of the file", "does not fit in the file", safetensors_bytes("{}", 0, 4096));
  bad("header length above the limit", "header length must be at most 100000000 bytes", safetensors_bytes("{}", 0, std::uint64_t(1) << 40));
  bad("header is not JSON", "the header is not valid JSON", safetensors_bytes("{\"w\": ", 0));
  bad("header is a JSON array", "the header must be a JSON object", safetensors_bytes("[1, 2]", 0));
  bad("a tensor entry that is not an object", "must be described by an object", safetensors_bytes(R"({"w": 3})", 0));
  bad("a tensor without dtype", "must have \"dtype\", \"shape\" and \"data_offsets\"", safetensors_bytes(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", 8));
  bad("an unknown dtype", "dtype must be one of", safetensors_bytes(R"({"w":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", 8));
  bad("a negative dimension", "every entry of shape must be a non-negative integer", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8));
  bad("a shape whose product overflows", "exceeds 9223372036854775807 elements",
      safetensors_bytes(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,8]}})", 8));
  bad("data_offsets of three numbers", "data_offsets must be an array of two integers", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}})", 8));
  bad("an end offset before the begin offset", "data_offsets must have begin <= end", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8));
  bad("offsets beyond the data", "run past the end of the file", safetensors_bytes("{" + ok + "}", 8));
  bad("a byte size that disagrees with the shape", "shape x dtype size is 12 bytes but data_offsets span 8 bytes", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8));
  bad("two tensors that overlap", "without holes or overlaps",
      safetensors_bytes("{" + ok + R"(,"v":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16));
  bad("a hole between tensors", "without holes or overlaps",
      safetensors_bytes(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12));
  bad("bytes after the last tensor", "the last tensor must end at the end of the file", safetensors_bytes("{" + ok + "}", 20));
  bad("__metadata__ with a value that is not a string", "__metadata__ values must be strings",
      safetensors_bytes(R"({"__metadata__":{"format":3},)" + ok + "}", 16));
  bad("a header padded with a NUL instead of spaces", "JSON", safetensors_bytes("{" + ok + "}" + std::string(1, '\0'), 16));
  cases.push_back({"safetensors", "reading a tensor the file does not hold", "FormatError", "has no tensor named",
                   [ok] {
                     const auto bytes = safetensors_bytes("{" + ok + "}", 16);
                     (void)rankwise::SafetensorsReader::from_bytes(bytes, "c").matrix<float>("v");
                   }});
  cases.push_back({"safetensors", "reading an integer tensor as floats", "FormatError", "to be read as numbers",
                   [] {
                     const auto bytes = safetensors_bytes(R"({"i":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})", 8);
                     (void)rankwise::SafetensorsReader::from_bytes(bytes, "c").matrix<float>("i");
                   }});
  cases.push_back({"safetensors", "reading a 3-D tensor as a matrix", "FormatError", "must have at most 2 dimensions to be read as a matrix",
                   [] {
                     const auto bytes = safetensors_bytes(R"({"t":{"dtype":"F32","shape":[2,1,2],"data_offsets":[0,16]}})", 16);
                     (void)rankwise::SafetensorsReader::from_bytes(bytes, "c").matrix<float>("t");
                   }});
  cases.push_back({"safetensors", "a file that does not exist", "IoError", "cannot open",
                   [] { rankwise::SafetensorsReader r(fs::path("/nonexistent-rankwise-dir/x.safetensors")); }});
  cases.push_back({"safetensors", "writing an integer dtype", "InvalidArgument", "float data is written as F32, F64, F16 or BF16 (got I32)",
                   [] { rankwise::SafetensorsWriter w(rankwise::DType::I32); }});
}

void add_peft_cases(std::vector<Case>& cases, const fs::path& scratch) {
  const fs::path valid = scratch / "peft-valid";
  {
    LoRAPair pair(1);
    rankwise::save_peft_adapter(valid, pair.named(), {.durable = false});
  }
  const std::string config = "adapter_config.json", weights = "adapter_model.safetensors";
  // A case: a copy of the valid directory, changed by `edit`, loaded into a fresh model.
  const auto bad = [&](std::string name, std::string type, std::string fragment, std::function<void(const fs::path&)> edit) {
    auto model = std::make_shared<LoRAPair>(2);
    cases.push_back(directory_case("PEFT directory", std::move(name), std::move(type), std::move(fragment), valid,
                                   scratch / ("peft-" + std::to_string(cases.size())), std::move(edit),
                                   [model](const fs::path& dir) { rankwise::load_peft_adapter(dir, model->named()); },
                                   unchanged_check(model)));
  };
  const auto config_edit = [&](std::string name, std::string fragment, std::function<void(json&)> change) {
    bad(std::move(name), "FormatError", std::move(fragment), [=](const fs::path& dir) {
      json j = read_json(dir / config);
      change(j);
      write_json(dir / config, j);
    });
  };
  const auto tensor_edit = [&](std::string name, std::string fragment, std::function<void(TensorEdit&)> change) {
    bad(std::move(name), "FormatError", std::move(fragment), [=](const fs::path& dir) { rewrite_tensors(dir / weights, change); });
  };
  const std::string qa = "base_model.model.layers.0.attn.q_proj.lora_A.weight";
  const std::string qb = "base_model.model.layers.0.attn.q_proj.lora_B.weight";

  bad("the directory does not exist", "IoError", "cannot open", [](const fs::path& dir) { fs::remove_all(dir); });
  bad("adapter_config.json is missing", "IoError", "cannot open", [=](const fs::path& dir) { fs::remove(dir / config); });
  bad("adapter_model.safetensors is missing", "IoError", "cannot open",
      [=](const fs::path& dir) { fs::remove(dir / weights); });
  bad("the config is not JSON", "FormatError", "not valid JSON",
      [=](const fs::path& dir) { rankwise::test_support::write_text(dir / config, "{\"r\": 4,"); });
  bad("the config is a JSON array", "FormatError", "the config must be a JSON object",
      [=](const fs::path& dir) { rankwise::test_support::write_text(dir / config, "[4]"); });
  bad("the weights file is truncated", "FormatError", "run past the end of the file", [=](const fs::path& dir) {
    fs::resize_file(dir / weights, fs::file_size(dir / weights) - 5);
  });
  config_edit("peft_type is not LORA", "peft_type must be \"LORA\" to load LoRA adapters (got \"IA3\")", [](json& j) { j["peft_type"] = "IA3"; });
  config_edit("r is 0", "\"r\" must be an integer >= 1 (got 0)", [](json& j) { j["r"] = 0; });
  config_edit("r is a string", "\"r\" must be an integer", [](json& j) { j["r"] = "4"; });
  config_edit("lora_alpha is negative", "alpha must be a finite number > 0 (got -1 from lora_alpha or alpha_pattern)", [](json& j) { j["lora_alpha"] = -1.0; });
  config_edit("use_dora is true", "uses DoRA (use_dora), which rankwise does not load", [](json& j) { j["use_dora"] = true; });
  config_edit("bias is \"all\"", "saves base biases (bias \"all\"), which rankwise does not load", [](json& j) { j["bias"] = "all"; });
  bad("modules_to_save weights in the file", "FormatError", "modules_to_save is not supported", [=](const fs::path& dir) {
    json j = read_json(dir / config);
    j["modules_to_save"] = json::array({"lm_head"});
    write_json(dir / config, j);
    rewrite_tensors(dir / weights, [](TensorEdit& e) {
      e.matrices["base_model.model.lm_head.modules_to_save.default.weight"] = Matrix<double>::Zero(4, 8);
    });
  });
  config_edit("target_modules is an invalid regular expression", "is not a valid regular expression (missing ): (()", [](json& j) { j["target_modules"] = "(("; });
  config_edit("target_modules uses a backreference", "is not a valid regular expression (invalid escape sequence: \\1)", [](json& j) { j["target_modules"] = "(q)\\1_proj"; });
  config_edit("target_modules holds a number", "\"target_modules\" must list module names as strings", [](json& j) { j["target_modules"] = {1, 2}; });
  config_edit("rank_pattern gives a rank of 0", "\"rank_pattern\" values must be integers >= 1 (got 0", [](json& j) { j["rank_pattern"] = {{"q_proj", 0}}; });
  tensor_edit("a targeted module is missing from the weights", "module 'layers.0.mlp.up_proj' is targeted by the config but",
              [](TensorEdit& e) {
                e.matrices.erase("base_model.model.layers.0.mlp.up_proj.lora_A.weight");
                e.matrices.erase("base_model.model.layers.0.mlp.up_proj.lora_B.weight");
              });
  config_edit("lora_alpha overflows the model's precision", "is not a finite number > 0 in the adapter's precision", [](json& j) {
    j["lora_alpha"] = 1e300;
    j["alpha_pattern"] = json::object();
  });
  tensor_edit("lora_A without lora_B", "has lora_A but no lora_B", [=](TensorEdit& e) { e.matrices.erase(qb); });
  tensor_edit("the ranks of lora_A and lora_B differ", "lora_A is [4, 8] and lora_B [8, 3]: their ranks differ", [=](TensorEdit& e) {
    e.matrices[qb] = Matrix<double>::Zero(8, 3);
  });
  tensor_edit("lora_A's width is not the layer's", "the model's layer needs [r, 8]", [=](TensorEdit& e) {
    e.matrices[qa] = Matrix<double>::Zero(4, 9);
  });
  tensor_edit("a factor that is 1-D", "must be a 2-D tensor of F32, F64, F16 or BF16 (got 1-D F32", [=](TensorEdit& e) {
    e.vectors[qa] = Matrix<double>::Zero(4, 1);
    e.matrices.erase(qa);
  });
  bad("a factor of an integer dtype", "FormatError", "must be a 2-D tensor of F32, F64, F16 or BF16 (got 2-D I32", [=](const fs::path& dir) {
    edit_header(dir / weights, [&](json& h) { h[qa]["dtype"] = "I32"; });
  });
  tensor_edit("a tensor that is no LoRA weight", "is not a LoRA weight", [=](TensorEdit& e) {
    e.matrices["base_model.model.layers.0.attn.q_proj.weight"] = Matrix<double>::Zero(2, 2);
  });
  tensor_edit("weights for a module the model lacks", "but not in the model", [=](TensorEdit& e) {
    e.matrices["base_model.model.layers.9.attn.q_proj.lora_A.weight"] = Matrix<double>::Zero(4, 8);
    e.matrices["base_model.model.layers.9.attn.q_proj.lora_B.weight"] = Matrix<double>::Zero(8, 4);
  });
  tensor_edit("a NaN in lora_B", "holds a NaN or an infinity", [=](TensorEdit& e) {
    e.matrices[qb](1, 1) = std::numeric_limits<double>::quiet_NaN();
  });
  tensor_edit("an infinity in lora_A", "holds a NaN or an infinity", [=](TensorEdit& e) {
    e.matrices[qa](0, 3) = std::numeric_limits<double>::infinity();
  });
  bad("a rank above min(in, out)", "FormatError", "the rank must be at most min(in, out) = 8 (got 9)", [=](const fs::path& dir) {
    rewrite_tensors(dir / weights, [&](TensorEdit& e) {
      e.matrices[qa] = Matrix<double>::Constant(9, 8, 0.01);
      e.matrices[qb] = Matrix<double>::Constant(8, 9, 0.01);
    });
    json j = read_json(dir / config);
    j["rank_pattern"]["layers.0.attn.q_proj"] = 9;
    write_json(dir / config, j);
  });
  {
    auto model = std::make_shared<LoRAPair>(3);
    model->q->merge();
    cases.push_back({"PEFT directory", "loading into a merged adapter", "FormatError", "is merged; unmerge() it",
                     [=] { rankwise::load_peft_adapter(valid, model->named()); }, unchanged_check(model)});
  }

  // VeRA, natively.
  const fs::path vera_valid = scratch / "peft-vera-valid";
  Random bank_rng(9);
  const auto bank = rankwise::VeRAProjections<float>::make(4, 8, 12, bank_rng);
  using VeRA = rankwise::VeRA<float>;
  auto vera_layer = [bank](std::uint64_t seed) {
    Random rng(seed);
    auto v = std::make_shared<VeRA>(Linear<float>(8, 12, rng), bank);
    v->lambda_b_parameter().value.setConstant(0.5f);
    return v;
  };
  {
    auto v = vera_layer(1);
    rankwise::save_peft_vera(vera_valid, std::vector<NamedAdapter<VeRA>>{{"layers.0.mlp.up_proj", v.get()}}, {.durable = false});
  }
  const auto vera_bad = [&](std::string name, std::string fragment, std::function<void(const fs::path&)> edit) {
    auto v = vera_layer(2);
    auto before = std::make_shared<std::vector<Matrix<float>>>(std::vector<Matrix<float>>{v->lambda_d(), v->lambda_b()});
    cases.push_back(directory_case(
        "PEFT directory", std::move(name), "FormatError", std::move(fragment), vera_valid,
        scratch / ("vera-" + std::to_string(cases.size())), std::move(edit),
        [v](const fs::path& dir) {
          rankwise::load_peft_adapter(dir, std::vector<NamedAdapter<VeRA>>{{"layers.0.mlp.up_proj", v.get()}});
        },
        [v, before] { return same_bits(v->lambda_d(), (*before)[0]) && same_bits(v->lambda_b(), (*before)[1]); }));
  };
  vera_bad("VeRA without its projections", "save_projection", [=](const fs::path& dir) {
    rewrite_tensors(dir / weights, [](TensorEdit& e) {
      e.matrices.erase("base_model.vera_A");
      e.matrices.erase("base_model.vera_B");
    });
  });
  vera_bad("VeRA with a NaN in vera_lambda_b", "vera_lambda_b holds a NaN or an infinity", [=](const fs::path& dir) {
    rewrite_tensors(dir / weights, [](TensorEdit& e) {
      e.vectors["base_model.model.layers.0.mlp.up_proj.vera_lambda_b"](3) = std::numeric_limits<double>::quiet_NaN();
    });
  });
  vera_bad("VeRA with an infinity in the projections", "base_model.vera_A holds a NaN or an infinity", [=](const fs::path& dir) {
    rewrite_tensors(dir / weights, [](TensorEdit& e) {
      e.matrices["base_model.vera_A"](0, 0) = std::numeric_limits<double>::infinity();
    });
  });
  vera_bad("VeRA with a vera_lambda_d of the wrong length", "vera_lambda_d has 3 entries but r = 4", [=](const fs::path& dir) {
    rewrite_tensors(dir / weights, [](TensorEdit& e) {
      e.vectors["base_model.model.layers.0.mlp.up_proj.vera_lambda_d"] = Matrix<double>::Ones(3, 1);
    });
  });
  vera_bad("a LoRA directory read as VeRA", "peft_type must be \"VERA\"", [=](const fs::path& dir) {
    fs::remove_all(dir);
    fs::copy(valid, dir, fs::copy_options::recursive);
  });
}

void add_checkpoint_cases(std::vector<Case>& cases, const fs::path& scratch) {
  const fs::path valid = scratch / "checkpoint-valid";
  {
    Family family(1);
    rankwise::AdamW<float> adamw(family.trainable(), {});
    for (Parameter<float>* p : family.trainable()) p->grad.setConstant(0.1f);
    adamw.step();
    Random rng(3);
    rankwise::CheckpointWriter ckpt;
    ckpt.set_step(1);
    ckpt.add("adapters", family.named());
    ckpt.add("bank", *family.bank);
    ckpt.add("optimizer", adamw);
    ckpt.add("rng", rng);
    ckpt.write(valid);
  }
  // Every case opens the changed checkpoint and restores the component it broke into a fresh family
  // (the adapters as one module list: all or nothing), its optimizer or a generator.
  const auto bad = [&](std::string name, std::string type, std::string fragment, std::string component,
                       std::function<void(const fs::path&)> edit) {
    auto family = std::make_shared<Family>(2);
    const auto restore = [family, component](const fs::path& dir) {
      const rankwise::CheckpointReader reader(dir);
      if (component == "bank") {
        (void)rankwise::read_vera_projections<float>(reader.component("bank"));
      } else if (component == "optimizer") {
        rankwise::AdamW<float> adamw(family->trainable(), {});
        reader.restore("optimizer", adamw);
      } else if (component == "rng") {
        Random rng;
        reader.restore("rng", rng);
      } else {
        reader.restore(component, family->named());
      }
    };
    cases.push_back(directory_case("checkpoint", std::move(name), std::move(type), std::move(fragment), valid,
                                   scratch / ("checkpoint-" + std::to_string(cases.size())), std::move(edit), restore,
                                   unchanged_check(family)));
  };
  const auto manifest_edit = [&](std::string name, std::string fragment, std::string component,
                                 std::function<void(json&)> change) {
    bad(std::move(name), "FormatError", std::move(fragment), std::move(component), [=](const fs::path& dir) {
      json j = read_json(dir / "checkpoint.json");
      change(j);
      write_json(dir / "checkpoint.json", j);
    });
  };
  const auto tensors_of = [](const fs::path& dir) { return dir / read_json(dir / "checkpoint.json").at("tensors").get<std::string>(); };
  const auto tensor_edit = [&](std::string name, std::string fragment, std::string component,
                               std::function<void(TensorEdit&)> change) {
    bad(std::move(name), "FormatError", std::move(fragment), std::move(component),
        [=](const fs::path& dir) { rewrite_tensors(tensors_of(dir), change); });
  };
  const auto module = [](json& j, const std::string& kind) -> json& { return j["components"]["adapters"]["layers.0." + kind]; };
  const auto nan = std::numeric_limits<double>::quiet_NaN();

  bad("no checkpoint.json", "IoError", "checkpoint.json", "adapters", [](const fs::path& dir) { fs::remove(dir / "checkpoint.json"); });
  bad("checkpoint.json is not JSON", "FormatError", "not valid JSON", "adapters",
      [](const fs::path& dir) { rankwise::test_support::write_text(dir / "checkpoint.json", "{\"format\": "); });
  bad("the tensors file is missing", "IoError", "cannot open", "adapters", [=](const fs::path& dir) { fs::remove(tensors_of(dir)); });
  bad("the tensors file is truncated", "FormatError", "does not fit in the file", "adapters", [=](const fs::path& dir) {
    fs::resize_file(tensors_of(dir), fs::file_size(tensors_of(dir)) / 2);
  });
  manifest_edit("another format", "expected a rankwise checkpoint (\"format\": \"rankwise.checkpoint\")", "adapters", [](json& j) { j["format"] = "other"; });
  manifest_edit("a newer version", "expected \"version\": 1 (got 2)", "adapters", [](json& j) { j["version"] = 2; });
  manifest_edit("a tensors file outside the directory", "expected \"tensors\" to name a file \"tensors-<n>.safetensors\" in the same directory", "adapters", [](json& j) { j["tensors"] = "../escape.safetensors"; });
  manifest_edit("components is not an object", "expected \"components\" to be an object", "adapters", [](json& j) { j["components"] = json::array(); });
  manifest_edit("a component is missing", "has no component 'rng'", "rng", [](json& j) { j["components"].erase("rng"); });
  manifest_edit("module paths that differ", "module 'layers.0.lora' is not in the checkpoint", "adapters", [](json& j) {
    json& paths = j["components"]["adapters"]["paths"];
    paths[0] = "layers.1.lora";
  });
  manifest_edit("a slot of another kind", "holds a 'dylora' slot but the model's is 'lora'", "adapters",
                [=](json& j) { module(j, "lora")["slot_kind"] = "dylora"; });
  manifest_edit("a LoRA of another size", "adapter but the model's is", "adapters", [=](json& j) { module(j, "lora")["in_features"] = 9; });
  manifest_edit("a LoRA saved with other dropout", "was saved with dropout 0.5", "adapters", [=](json& j) { module(j, "lora")["dropout"] = 0.5; });
  manifest_edit("a LoRA scale rank of 2^62", "the scale rank must be in [1, min(in, out)] = [1, 8]", "adapters",
                [=](json& j) { module(j, "lora")["scale_rank"] = std::int64_t(1) << 62; });
  manifest_edit("a LoRA alpha that overflows float", "is not a finite number > 0", "adapters",
                [=](json& j) { module(j, "lora")["alpha"] = 1e300; });
  manifest_edit("a LoRA with a negative rank", "'rank' must be >= 0", "adapters", [=](json& j) { module(j, "lora")["rank"] = -1; });
  manifest_edit("a key of the wrong type", "'enabled' must be true or false", "adapters", [=](json& j) { module(j, "lora")["enabled"] = "yes"; });
  manifest_edit("a DyLoRA window that is empty", "the window [3, 2) must lie in [0, 4]", "adapters", [=](json& j) {
    module(j, "dylora")["window_begin"] = 3;
    module(j, "dylora")["active_rank"] = 2;
  });
  manifest_edit("a DyLoRA of another maximum rank", "was saved with max_rank 6", "adapters", [=](json& j) { module(j, "dylora")["max_rank"] = 6; });
  manifest_edit("VeRA vectors trained over another bank", "was trained over other projections", "adapters",
                [=](json& j) { module(j, "vera")["bank"]["fingerprint"] = "0"; });
  manifest_edit("a MELoRA with another n", "was saved with n 4", "adapters", [=](json& j) { module(j, "melora")["n"] = 4; });
  manifest_edit("a RED that trained no bias", "was saved training scaling", "adapters", [=](json& j) { module(j, "red")["bias"] = false; });
  manifest_edit("optimizer state of another optimizer", "holds a 'SGD' optimizer, not AdamW", "optimizer", [](json& j) { j["components"]["optimizer"]["kind"] = "SGD"; });
  manifest_edit("a generator state of zeros", "'state' must not be all zero", "rng",
                [](json& j) { j["components"]["rng"]["state"] = {0, 0, 0, 0}; });
  tensor_edit("a NaN in a LoRA factor", "does not hold a valid LoRA state: [the LoRA] A and B must be finite", "adapters", [](TensorEdit& e) {
    e.matrices["adapters/layers.0.lora/lora_A"](0, 0) = std::numeric_limits<double>::quiet_NaN();
  });
  tensor_edit("a NaN in a LoRA gate", "'gates' must be finite", "adapters", [](TensorEdit& e) {
    e.vectors["adapters/layers.0.lora/gates"](0) = std::numeric_limits<double>::quiet_NaN();
  });
  tensor_edit("a NaN in a DyLoRA factor", "'lora_B' holds a NaN or an infinity", "adapters", [nan](TensorEdit& e) {
    e.matrices["adapters/layers.0.dylora/lora_B"](2, 1) = nan;
  });
  tensor_edit("an infinity in a VeRA vector", "'vera_lambda_b' holds a NaN or an infinity", "adapters", [](TensorEdit& e) {
    e.vectors["adapters/layers.0.vera/vera_lambda_b"](0) = -std::numeric_limits<double>::infinity();
  });
  tensor_edit("a NaN in VeRA's bank", "'vera_A' holds a NaN or an infinity", "bank", [nan](TensorEdit& e) {
    e.matrices["bank/vera_A"](1, 1) = nan;
  });
  tensor_edit("a NaN in a MELoRA block", "'melora_A' holds a NaN or an infinity", "adapters", [nan](TensorEdit& e) {
    e.matrices["adapters/layers.0.melora/melora_A"](0, 1) = nan;
  });
  tensor_edit("a NaN in RED's scaling", "'activation_scaling' holds a NaN or an infinity", "adapters", [nan](TensorEdit& e) {
    e.vectors["adapters/layers.0.red/activation_scaling"](2) = nan;
  });
  tensor_edit("a LoRA factor of the wrong shape", "tensor 'adapters/layers.0.lora/lora_A' must be 3 x 8 (got 3 x 9)", "adapters", [](TensorEdit& e) {
    e.matrices["adapters/layers.0.lora/lora_A"] = Matrix<double>::Zero(3, 9);
  });
  bad("a tensor of an integer dtype", "FormatError", "to be read as numbers", "adapters", [=](const fs::path& dir) {
    edit_header(tensors_of(dir), [](json& h) { h["adapters/layers.0.red/activation_bias"]["dtype"] = "I32"; });
  });
  tensor_edit("optimizer moments of the wrong shape", "does not fit the optimizer", "optimizer", [](TensorEdit& e) {
    for (auto& [name, m] : e.matrices)
      if (name.rfind("optimizer/", 0) == 0) {
        m = Matrix<double>::Zero(m.rows() + 1, m.cols());
        break;
      }
  });
}

void add_rankwise_adapter_cases(std::vector<Case>& cases, const fs::path& scratch) {
  const fs::path valid = scratch / "rankwise-valid";
  {
    Family family(1);
    rankwise::save_rankwise_adapter(valid, family.named());
  }
  const auto bad = [&](std::string name, std::string type, std::string fragment, std::function<void(const fs::path&)> edit) {
    auto family = std::make_shared<Family>(2);
    cases.push_back(directory_case("rankwise adapter", std::move(name), std::move(type), std::move(fragment), valid,
                                   scratch / ("rankwise-" + std::to_string(cases.size())), std::move(edit),
                                   [family](const fs::path& dir) { rankwise::load_rankwise_adapter(dir, family->named()); },
                                   unchanged_check(family)));
  };
  const std::string json_file = "rankwise_adapter.json", weights = "rankwise_adapter.safetensors";
  bad("rankwise_adapter.json is missing", "IoError", "cannot open", [=](const fs::path& d) { fs::remove(d / json_file); });
  bad("another format", "FormatError", "expected {\"format\": \"rankwise.adapter\"", [=](const fs::path& d) {
    json j = read_json(d / json_file);
    j["format"] = "peft";
    write_json(d / json_file, j);
  });
  bad("module paths that differ", "FormatError", "module 'layers.0.red' is not in the checkpoint", [=](const fs::path& d) {
    json j = read_json(d / json_file);
    j["modules"]["paths"].erase(j["modules"]["paths"].size() - 1);
    write_json(d / json_file, j);
  });
  bad("the weights file is truncated", "FormatError", "does not fit in the file",
      [=](const fs::path& d) { fs::resize_file(d / weights, 64); });
  bad("a NaN in a MELoRA block", "FormatError", "'melora_B' holds a NaN or an infinity", [=](const fs::path& d) {
    rewrite_tensors(d / weights, [](TensorEdit& e) {
      e.matrices["layers.0.melora/melora_B"](0, 0) = std::numeric_limits<double>::quiet_NaN();
    });
  });
  bad("an infinity in RED's bias", "FormatError", "'activation_bias' holds a NaN or an infinity", [=](const fs::path& d) {
    rewrite_tensors(d / weights, [](TensorEdit& e) {
      e.vectors["layers.0.red/activation_bias"](0) = std::numeric_limits<double>::infinity();
    });
  });
}

void add_option_cases(std::vector<Case>& cases) {
  const auto bad = [&](std::string name, std::string fragment, std::function<void()> attempt) {
    cases.push_back({"options", std::move(name), "InvalidArgument", std::move(fragment), std::move(attempt)});
  };
  const auto lora = [](rankwise::LoRAOptions o) {
    Random rng(1);
    LoRA<float> l(Linear<float>(8, 6, rng), o, rng);
  };
  bad("LoRA rank 0", "rank must be in [1, min(in, out)] = [1, 6] (got 0)", [=] { lora({.rank = 0}); });
  bad("LoRA rank above min(in, out)", "rank must be in [1, min(in, out)] = [1, 6] (got 7)", [=] { lora({.rank = 7}); });
  bad("LoRA alpha NaN", "alpha must be a finite number > 0 (got nan)", [=] { lora({.rank = 2, .alpha = std::numeric_limits<double>::quiet_NaN()}); });
  bad("LoRA dropout 1", "dropout must be in [0, 1) (got 1)", [=] { lora({.rank = 2, .dropout = 1.0}); });
  bad("LoRA factors with a NaN", "holds a NaN or an infinity", [] {
    Random rng(1);
    LoRA<float> l(Linear<float>(4, 4, rng), {.rank = 2}, rng);
    Matrix<float> A = l.A();
    A(0, 0) = std::numeric_limits<float>::quiet_NaN();
    l.assign_factors(A, l.B());
  });
  bad("DyLoRA maximum rank 0", "max_rank must be in [1, min(in, out)] = [1, 8] (got 0)", [] {
    Random rng(1);
    rankwise::DyLoRA<float> d(Linear<float>(8, 8, rng), {.max_rank = 0}, rng);
  });
  bad("MELoRA n that does not divide the layer", "in and out must be divisible by n = 2", [] {
    Random rng(1);
    rankwise::MELoRA<float> m(Linear<float>(9, 8, rng), {.n = 2, .mini_rank = 1}, rng);
  });
  bad("VeRA over a bank smaller than the layer", "the layer must fit in the shared bank", [] {
    Random rng(1);
    const auto bank = rankwise::VeRAProjections<float>::make(2, 4, 4, rng);
    rankwise::VeRA<float> v(Linear<float>(8, 8, rng), bank);
  });
  bad("VeRA projections with a NaN", "the projections must be finite", [] {
    Matrix<float> A = Matrix<float>::Ones(2, 4), B = Matrix<float>::Ones(4, 2);
    B(1, 1) = std::numeric_limits<float>::quiet_NaN();
    rankwise::VeRAProjections<float> bank(A, B);
  });
  const auto bora = [](rankwise::BoRAOptions o) {
    Random rng(1);
    rankwise::BoRA<float> b(Linear<float>(4, 4, rng), o, rng);
  };
  bad("BoRA with no tasks", "tasks must be >= 1 (got 0)", [=] { bora({.tasks = 0, .rank = 2}); });
  bad("BoRA with a negative tau", "tau must be a finite number >= 0 (got -1)", [=] { bora({.rank = 2, .tau = -1.0}); });
  bad("BoRA offsets with the joined forward", "parametrization Offsets applies to forward Task", [=] {
    bora({.rank = 2, .forward = rankwise::BoRAForward::Joined, .parametrization = rankwise::BoRAParametrization::Offsets});
  });
  bad("a task routing with a task id out of range", "task ids must be in [0, 3) (got 3 for column 1)", [] {
    rankwise::TaskRouting(std::vector<std::int32_t>{0, 3}, 3);
  });
  bad("BoRA injected into a module the model does not have", "the model has no linear module 'v_proj'", [] {
    Random rng(1);
    AnyLinear<float> q(Linear<float>(4, 4, rng));
    rankwise::SlotList<float> host;
    host.add("q_proj", q);
    (void)rankwise::inject_bora<float>(host, {"q_proj", "v_proj"}, {.rank = 2}, rng);
  });
  bad("an unknown adapter name", "adapter name must be one of", [] {
    Random rng(1);
    (void)rankwise::make_linear(Linear<float>(4, 4, rng), rankwise::AdapterSpec{"qlora", std::monostate{}}, rng);
  });
  const auto trainer = [](rankwise::TrainerOptions o) { rankwise::Trainer<float>::check_options(o, "rankwise::Trainer"); };
  bad("Trainer with 0 steps", "steps must be >= 1 (got 0)", [=] { trainer({.steps = 0}); });
  bad("Trainer with a NaN learning rate", "lr must be a finite number > 0 (got nan)", [=] { trainer({.steps = 10, .lr = std::numeric_limits<double>::quiet_NaN()}); });
  bad("Trainer with a negative clipping norm", "clip_norm must be a finite number >= 0 (got -1)", [=] { trainer({.steps = 10, .clip_norm = -1.0}); });
  bad("Trainer with warm-up longer than the run", "warmup_steps must be -1 (steps / 10) or in [0, steps) = [0, 10) (got 11)", [=] { trainer({.steps = 10, .warmup_steps = 11}); });
  bad("AdamW with beta1 = 1", "beta1 must be in [0, 1) (got 1)", [] {
    Parameter<float> p;
    p.value = Matrix<float>::Zero(2, 2);
    p.grad = p.value;
    rankwise::AdamW<float> adamw({&p}, {.beta1 = 1.0});
  });
  bad("a module-path pattern with lookaround", "invalid perl operator: (?=", [] {
    std::string error;
    if (!rankwise::PathPattern::compile("(?=q)q_proj", error)) rankwise::detail::fail("catalogue", error);
  });
  bad("a learning-rate schedule whose warm-up exceeds its length", "total_steps must be > warmup_steps = 20 (got 10)", [] {
    (void)rankwise::LRSchedule::cosine(20, 10);
  });
}

void add_command_line_cases(std::vector<Case>& cases) {
  const auto bad = [&](std::string fragment, std::vector<std::string> args) {
    std::string name;
    for (const std::string& a : args) name += (name.empty() ? "" : " ") + (a.empty() ? std::string("''") : a);
    cases.push_back({"finetune command line", name, "InvalidArgument", std::move(fragment), [args] {
                       std::vector<const char*> argv = {"finetune"};
                       for (const std::string& a : args) argv.push_back(a.c_str());
                       (void)finetune_cli::parse_command_line(int(argv.size()), argv.data());
                     }});
  };
  bad("--lr must be a finite number > 0 (got nan)", {"--lr", "nan"});
  bad("--lr must be a finite number > 0 (got -1)", {"--lr", "-1"});
  bad("--lr must be a finite number > 0 (got 0)", {"--small", "--lr", "0"});
  bad("--threads must be in [1, 64] (got 0)", {"--threads", "0"});
  bad("--threads must be in [1, 64] (got 65)", {"--threads", "65"});
  bad("--steps must be >= 1 (got 0)", {"--steps", "0"});
  bad("--pretrain-steps must be >= 1 (got -5)", {"--pretrain-steps", "-5"});
  bad("--batch must be >= 1 (got 0)", {"--small", "--batch", "0"});
  bad("--eval-sequences must be >= 1 (got 0)", {"--eval-sequences", "0"});
  bad("--d-model must be a multiple of the 4 heads, >= 4 (got 6)", {"--d-model", "6"});
  bad("--layers must be >= 1 (got 0)", {"--layers", "0"});
  bad("--task must be one of relabel, sort, add, teacher", {"--task", "mul"});
  bad("--allocator must be prune-fisher, prune-sens, prune, gain or paper (got \"adaptive\")", {"--allocator", "adaptive"});
  bad("--output must name a directory (got an empty path)", {"--output", ""});
  bad("Could not convert: --rank = abc (see --help)", {"--rank", "abc"});
  bad("--validation", {"--validation", "0"});
  bad("--bogus", {"--bogus"});
  bad("--lr", {"--lr"});
}

std::vector<Case> all_cases(const fs::path& scratch) {
  std::vector<Case> cases;
  add_safetensors_cases(cases);
  add_peft_cases(cases, scratch);
  add_checkpoint_cases(cases, scratch);
  add_rankwise_adapter_cases(cases, scratch);
  add_option_cases(cases);
  add_command_line_cases(cases);
  return cases;
}
/// The row of docs/errors.md that lists a case.
std::string docs_row(const Case& c) { return "| " + c.name + " | `" + c.type + "` | `" + c.fragment + "` |"; }
}  // namespace catalogue
}  // namespace

TEST_CASE("Bad-input catalogue: every malformed file and option set is refused by type and reason, nothing changed",
          "[io][catalogue]") {
  rankwise::test_support::TempDir scratch("catalogue");
  const std::vector<catalogue::Case> cases = catalogue::all_cases(scratch.path);
  const char* print_mode = std::getenv("RANKWISE_CATALOGUE_PRINT");
  const bool print = print_mode != nullptr;
  std::map<std::string, int> per_input;
  for (const catalogue::Case& c : cases) {
    INFO(c.input << ": " << c.name);
    const catalogue::Outcome outcome = catalogue::run_attempt(c.attempt);
    if (print && std::string(print_mode) == "markdown")
      std::printf("%s\t%s\n", c.input.c_str(), catalogue::docs_row(c).c_str());
    else if (print)
      std::printf("%s | %s | %s | %s\n=====\n", c.input.c_str(), c.name.c_str(), outcome.type.c_str(), outcome.message.c_str());
    INFO("raised " << outcome.type << ": " << outcome.message);
    CHECK(outcome.type == c.type);
    CHECK_THAT(outcome.message, Catch::Contains(c.fragment));
    CHECK(outcome.message.rfind("[", 0) == 0);  // "[where] what must hold (got what was seen)"
    if (c.unchanged) CHECK(c.unchanged());
    ++per_input[c.input];
  }
  CHECK(cases.size() >= 60);
  for (const char* input : {"safetensors", "PEFT directory", "checkpoint", "rankwise adapter", "options", "finetune command line"})
    CHECK(per_input[input] >= 5);
}

TEST_CASE("Bad-input catalogue: docs/errors.md lists every case with its type and message", "[io][catalogue][docs]") {
  rankwise::test_support::TempDir scratch("catalogue_docs");
  const std::string page = rankwise::test_support::read_text(rankwise::test_support::source_dir() / "docs" / "errors.md");
  REQUIRE(!page.empty());
  for (const catalogue::Case& c : catalogue::all_cases(scratch.path)) {
    INFO("docs/errors.md must hold the row\n" << catalogue::docs_row(c) << "\nunder the heading of '" << c.input << "'");
    CHECK(page.find(catalogue::docs_row(c)) != std::string::npos);
  }
}
