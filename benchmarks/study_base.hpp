// The pre-trained toy transformer that the planted-teacher studies adapt (allocation_study,
// bora_lm_study): one model and task mixture, pre-trained once and cached under <out>/base-cache
// (or read from a directory given with --base), and the paths of its linear modules but the LM head.
#pragma once
#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/models/base_checkpoint.hpp>
#include <rankwise/models/tasks.hpp>
#include <rankwise/models/toy_transformer.hpp>

#include <filesystem>
#include <string>
#include <vector>

namespace rankwise::bench {

/// Sequences of 32 tokens over a vocabulary of 128 (16 letters, answers of 2 to 8 symbols).
inline TaskOptions study_task_options() {
  return {.vocab = 128, .seq_len = 32, .letters = 16, .min_length = 2, .max_length = 8, .max_digits = 4};
}

/// d_model 32, 4 heads, 2 layers, d_ff 128.
inline ToyTransformerConfig study_model_config() {
  return {.vocab = 128, .d_model = 32, .heads = 4, .layers = 2, .d_ff = 128, .max_seq_len = study_task_options().seq_len};
}

struct StudyBase {
  PretrainedBase<float> base;
  std::vector<std::string> paths;  ///< every linear module but the LM head, in model order
};

/// The base pre-trained with `pretraining`: read from `base_dir` when given, else from (or pre-trained
/// into) out/base-cache/<the recipe's name>.
inline StudyBase load_study_base(const PretrainRecipe& pretraining, const std::filesystem::path& out,
                                 const std::string& base_dir) {
  const ToyTransformerConfig config = study_model_config();
  const std::filesystem::path dir =
      base_dir.empty() ? out / "base-cache" / base_checkpoint_name(config, pretraining) : std::filesystem::path(base_dir);
  StudyBase study{load_or_pretrain<float>(config, pretraining, dir), {}};
  study.base.model.for_each_slot([&](const std::string& path, AnyLinear<float>&) {
    if (path != "lm_head") study.paths.push_back(path);
  });
  return study;
}

}  // namespace rankwise::bench
