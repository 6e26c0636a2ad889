// export_peft: save the LoRA adapters of a small model as a PEFT adapter directory, then load them
// into a fresh model; prints adapter_config.json. Ranks differ per module after rank surgery, which
// the directory records in rank_pattern / alpha_pattern (PEFT) or folds into B (llama.cpp).
// Run: build/examples/export_peft [output directory]   (exits non-zero if the reload differs)
#include <rankwise/rankwise.hpp>
#include <rankwise/io/peft.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  using rankwise::Matrix;
  const fs::path out = argc > 1 ? fs::path(argv[1]) : fs::temp_directory_path() / "rankwise_export_peft";
  rankwise::Random rng(7);

  // A "model": two layers of attention projections, each wrapped in a LoRA.
  std::vector<std::unique_ptr<rankwise::LoRA<float>>> layers;
  for (int i = 0; i < 4; ++i)
    layers.push_back(std::make_unique<rankwise::LoRA<float>>(rankwise::Linear<float>(32, 32, rng),
                                                             rankwise::LoRAOptions{.rank = 8, .alpha = 16.0}, rng));
  for (auto& layer : layers) rankwise::fill_normal(layer->B_parameter().value, 0.0, 0.1, rng);  // as if trained
  const std::vector<rankwise::Index> pruned = {0, 5, 6};
  layers[3]->remove_ranks(pruned);  // what a rank allocator does: this module keeps 5 ranks

  // [snippet: save]
  std::vector<rankwise::NamedAdapter<rankwise::LoRA<float>>> modules = {
      {"layers.0.attn.q_proj", layers[0].get()},
      {"layers.0.attn.v_proj", layers[1].get()},
      {"layers.1.attn.q_proj", layers[2].get()},
      {"layers.1.attn.v_proj", layers[3].get()},
  };
  rankwise::save_peft_adapter(out / "peft", modules, {.base_model_name_or_path = "toy-transformer"});
  // For llama.cpp's converter, which reads one lora_alpha: fold per-module scales into B.
  rankwise::save_peft_adapter(out / "llama_cpp", modules, {.alpha = rankwise::PeftAlpha::FoldIntoB});
  // [snippet: save]

  std::ifstream config(out / "peft" / "adapter_config.json");
  std::cout << config.rdbuf();

  // [snippet: load]
  // A model built from the same base weights, with any adapter settings: loading gives each module
  // the file's rank, A, B and scale.
  std::vector<std::unique_ptr<rankwise::LoRA<float>>> fresh;
  std::vector<rankwise::NamedAdapter<rankwise::LoRA<float>>> fresh_modules;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    fresh.push_back(std::make_unique<rankwise::LoRA<float>>(layers[i]->base(), rankwise::LoRAOptions{.rank = 1}, rng));
    fresh_modules.push_back({modules[i].path, fresh.back().get()});
  }
  rankwise::load_peft_adapter(out / "peft", fresh_modules);
  // [snippet: load]

  Matrix<float> x(32, 16), y_saved, y_loaded;
  rankwise::fill_normal(x, 0.0, 1.0, rng);
  bool same = true;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    layers[i]->set_training(false);
    fresh[i]->set_training(false);
    layers[i]->forward(x, y_saved);
    fresh[i]->forward(x, y_loaded);
    same = same && y_saved == y_loaded && fresh[i]->rank() == layers[i]->rank();
  }
  std::printf("reloaded adapters reproduce the saved ones bit for bit: %s\n", same ? "yes" : "NO");
  fs::remove_all(out);
  return same ? 0 : 1;
}
