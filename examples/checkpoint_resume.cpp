// checkpoint_resume: stop a LoRA fine-tuning run halfway, save a checkpoint, restart in fresh objects
// and finish; the result equals the run that never stopped, bit for bit.
// Shows what a checkpoint holds: base weights, adapters (current ranks), optimizer, generators, step.
// Run: build/examples/checkpoint_resume [checkpoint directory]   (exits non-zero if the runs differ)
#include <rankwise/rankwise.hpp>
#include <rankwise/io/checkpoint.hpp>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <vector>

namespace {

// The frozen parameters of a layer (its base weights), which a checkpoint keeps by name.
std::vector<rankwise::Parameter<float>*> frozen(rankwise::LoRA<float>& layer) {
  std::vector<rankwise::Parameter<float>*> out;
  for (rankwise::Parameter<float>* p : layer.parameters())
    if (!p->trainable) out.push_back(p);
  return out;
}

// A training run: one adapted layer, its optimizer, its data stream, its step counter.
struct Run {
  std::unique_ptr<rankwise::LoRA<float>> lora;
  std::unique_ptr<rankwise::AdamW<float>> optimizer;
  rankwise::Random data;
  long step = 0;

  explicit Run(std::uint64_t seed) : data(seed + 1) {
    rankwise::Random init(seed);
    lora = std::make_unique<rankwise::LoRA<float>>(rankwise::Linear<float>(24, 24, init),
                                                   rankwise::LoRAOptions{.rank = 8, .alpha = 16.0, .dropout = 0.1}, init);
    lora->set_path("layer");
    optimizer = std::make_unique<rankwise::AdamW<float>>(lora->parameters(), rankwise::AdamWOptions{.lr = 1e-2});
  }

  void train(long steps) {
    rankwise::Matrix<float> x(24, 32), y, dx;
    for (long end = step + steps; step < end; ++step) {
      if (step == 12) optimizer->follow(lora->remove_ranks(std::vector<rankwise::Index>{3, 5}));
      rankwise::fill_normal(x, 0.0, 1.0, data);
      lora->zero_grad();
      lora->forward(x, y);
      lora->backward(y - x, dx);  // learn to output the input
      optimizer->step();
    }
  }

  // [snippet: save]
  void save(const std::filesystem::path& dir) {
    rankwise::CheckpointWriter ckpt;
    ckpt.set_step(step);
    ckpt.add("base", frozen(*lora));             // frozen base weights, by name
    ckpt.add("adapter", *lora);                  // A, B at their current rank, gates, scale, dropout stream
    ckpt.add("optimizer", *optimizer);           // moments and per-slice step counts
    ckpt.add("data", data);                      // the data generator's position
    ckpt.metadata()["task"] = "identity";
    ckpt.write(dir);
  }
  // [snippet: save]

  // [snippet: load]
  void load(const std::filesystem::path& dir) {
    rankwise::CheckpointReader ckpt(dir);
    step = ckpt.step();
    ckpt.restore("base", frozen(*lora));
    ckpt.restore("adapter", *lora);  // before the optimizer: the parameters take their saved shapes
    ckpt.restore("optimizer", *optimizer);
    ckpt.restore("data", data);
  }
  // [snippet: load]
};

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path dir =
      argc > 1 ? std::filesystem::path(argv[1]) : std::filesystem::temp_directory_path() / "rankwise_checkpoint_resume";
  Run uninterrupted(1);
  uninterrupted.train(40);

  Run first(1);
  first.train(20);
  first.save(dir);
  Run resumed(1234);  // a new process would start from other values: all of them come from the checkpoint
  resumed.load(dir);
  resumed.train(20);

  const bool same = resumed.lora->A() == uninterrupted.lora->A() && resumed.lora->B() == uninterrupted.lora->B() &&
                    resumed.lora->rank() == 6;
  std::printf("resumed at step 20 with rank %ld; after 40 steps A and B equal the uninterrupted run: %s\n",
              long(resumed.lora->rank()), same ? "yes" : "NO");
  std::filesystem::remove_all(dir);
  return same ? 0 : 1;
}
