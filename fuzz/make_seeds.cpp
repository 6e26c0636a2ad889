// Writes the seed inputs of the structured fuzz targets (fuzz/targets.hpp) with the library's own
// writers, so that the seeds follow the formats: each is a directory as save_peft_adapter,
// save_peft_vera, save_rankwise_adapter or CheckpointWriter writes it, its two files joined by the
// separator line (fuzz/targets/common.hpp), for the fixed models of fuzz/targets/models.hpp. A few
// broken ones are derived from them (cut short, a wrong version, no weights part).
// Usage: rankwise_fuzz_seeds <corpus directory>   (e.g. fuzz/corpus; writes <dir>/<target>/*.seed)
// Built with the fuzzers (scripts/fuzz.sh); rerun it when a format changes and commit the files.
#include "targets/common.hpp"
#include "targets/models.hpp"

#include <rankwise/io/checkpoint.hpp>
#include <rankwise/io/peft.hpp>
#include <rankwise/io/rankwise_adapter.hpp>
#include <rankwise/io/state.hpp>
#include <rankwise/models/trainer_state.hpp>

#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace rankwise;
using rankwise::fuzz::normal_matrix;

namespace {

std::string read_all(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string join(const std::string& config, const std::string& weights) {
  return config + std::string(fuzz::part_separator) + weights;
}

void emit(const fs::path& corpus, const char* target, const std::string& name, const std::string& bytes) {
  const fs::path path = corpus / target / (name + ".seed");
  fs::create_directories(path.parent_path());
  fuzz::write_file(path, bytes);
  std::cout << path.string() << ": " << bytes.size() << " bytes\n";
}

// Every trainable value random, so that a load that skipped a tensor would show.
template <typename Layer>
void randomize(Layer& layer, Random& rng) {
  for (Parameter<float>* p : layer.parameters())
    if (p->trainable) p->value = normal_matrix(p->value.rows(), p->value.cols(), rng);
}

void adapter_directory_seeds(const fs::path& corpus, const fs::path& work) {
  const char* target = "adapter_directory";
  Random rng(100);
  const auto pair = [](const fs::path& dir, const char* config, const char* weights) {
    return join(read_all(dir / config), read_all(dir / weights));
  };

  fuzz::LoRAModel lora(1);  // the target's own model: the seed loads into it
  for (auto& layer : lora.layers) randomize(*layer, rng);
  save_peft_adapter(work / "lora", lora.modules, {.durable = false});
  const std::string plain = pair(work / "lora", "adapter_config.json", "adapter_model.safetensors");
  emit(corpus, target, "peft_lora", plain);

  // Ranks and scales that differ per module (rank_pattern, alpha_pattern), rsLoRA, BF16.
  fuzz::LoRAModel mixed(1, {.rank = 4, .alpha = 6.0, .use_rslora = true});
  for (auto& layer : mixed.layers) randomize(*layer, rng);
  mixed.layers[1]->remove_ranks(std::vector<Index>{0, 2});
  mixed.layers[2]->set_scale(0.75);
  save_peft_adapter(work / "mixed", mixed.modules, {.dtype = DType::BF16, .durable = false});
  emit(corpus, target, "peft_lora_patterns_bf16", pair(work / "mixed", "adapter_config.json", "adapter_model.safetensors"));

  const auto bank = VeRAProjections<float>::make(4, 16, 16, rng);
  fuzz::VeRAModel vera(2, bank);
  for (auto& layer : vera.layers) randomize(*layer, rng);
  save_peft_vera(work / "vera", vera.modules, {.durable = false});
  emit(corpus, target, "peft_vera", pair(work / "vera", "adapter_config.json", "adapter_model.safetensors"));

  fuzz::SlotModel slots(3, fuzz::fixed_bank());
  for (auto& slot : slots.slots)
    if (slot.kind() != "linear") randomize(slot, rng);
  slots.slots[1].as<DyLoRA<float>>().set_window(1, 3);
  save_rankwise_adapter(work / "slots", slots.modules);
  emit(corpus, target, "rankwise_slots", pair(work / "slots", "rankwise_adapter.json", "rankwise_adapter.safetensors"));

  emit(corpus, target, "broken_cut_short", plain.substr(0, plain.size() * 3 / 4));
  emit(corpus, target, "broken_no_weights", read_all(work / "lora" / "adapter_config.json"));
}

void checkpoint_seeds(const fs::path& corpus, const fs::path& work) {
  const char* target = "checkpoint";
  Random rng(200);
  fuzz::CheckpointModel m(11);  // the target's own model
  randomize(m.lora, rng);
  randomize(m.dylora, rng);
  randomize(m.vera, rng);
  randomize(m.melora, rng);
  randomize(m.red, rng);
  m.dylora.set_window(1, 3);
  // A few steps, so that the optimizers, the estimator, the allocator and the trainer hold state.
  const Matrix<float> x = normal_matrix(12, 4, rng);
  for (int step = 0; step < 4; ++step) {
    Matrix<float> y, dx;
    m.lora.zero_grad();
    m.lora.forward(x, y);
    m.lora.backward(Matrix<float>(y - normal_matrix(y.rows(), y.cols(), rng)), dx);
    m.allocator.step();
    for (Parameter<float>* p : m.params) p->grad = normal_matrix(p->value.rows(), p->value.cols(), rng);
    m.adamw.step();
    m.sgd.step();
    m.trainer.step([&] {
      for (Parameter<float>* p : m.params) p->grad = normal_matrix(p->value.rows(), p->value.cols(), rng);
      return 1.0 / (1.0 + step);
    });
    (void)m.sampler.sample();
    (void)m.generator.normal();
  }
  for (auto& slot : m.slots.slots)
    if (slot.kind() != "linear") randomize(slot, rng);

  const auto write = [&](const fs::path& dir, bool everything) {
    CheckpointWriter ckpt;
    ckpt.set_step(4);
    ckpt.metadata()["seed"] = "fuzz";
    ckpt.add("lora", m.lora);
    ckpt.add("dylora", m.dylora);
    ckpt.add("vera", m.vera);
    ckpt.add("vera_bank", *m.bank);
    ckpt.add("melora", m.melora);
    ckpt.add("red", m.red);
    if (everything) {
      ckpt.add("params", m.params);
      ckpt.add("adamw", m.adamw);
      ckpt.add("sgd", m.sgd);
      ckpt.add("generator", m.generator);
      ckpt.add("fisher", m.fisher);
      ckpt.add("allocator", m.allocator);
      ckpt.add("sampler", m.sampler);
      ckpt.add("trainer", m.trainer);
      ckpt.add("slots", m.slots.modules);
    }
    ckpt.write(dir);
    const CheckpointReader back(dir);  // the name of the tensors file
    const std::string manifest = read_all(dir / "checkpoint.json");
    std::string tensors;
    for (const auto& entry : fs::directory_iterator(dir))
      if (entry.path().filename() != "checkpoint.json") tensors = read_all(entry.path());
    return join(manifest, tensors);
  };
  const std::string everything = write(work / "everything", true);
  emit(corpus, target, "everything", everything);
  emit(corpus, target, "adapters", write(work / "adapters", false));

  emit(corpus, target, "broken_cut_short", everything.substr(0, everything.size() * 9 / 10));
  std::string version = everything;
  const std::size_t at = version.find("\"version\": 1");
  if (at != std::string::npos) version.replace(at, 12, "\"version\": 2");
  emit(corpus, target, "broken_version", version);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: rankwise_fuzz_seeds <corpus directory>\n";
    return 2;
  }
  try {
    const fuzz::ScratchDirectory work;
    adapter_directory_seeds(argv[1], work.path());
    checkpoint_seeds(argv[1], work.path());
  } catch (const std::exception& e) {
    std::cerr << "rankwise_fuzz_seeds: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
