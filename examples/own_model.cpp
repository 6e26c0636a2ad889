// own_model: rankwise inside a model of your own. The model below is a small MLP classifier written in
// plain Eigen by its "user"; rankwise knows only its three linear slots. The program pre-trains it on
// one labelling of synthetic data, then adapts it to a changed labelling with LoRA whose ranks are
// allocated by pruning (docs/rank/alora.md), saves the adapter as a PEFT directory, and merges it.
// Run: build/examples/own_model [OUTPUT_DIR]   (exits non-zero if the adaptation or the merge fails)
#include <rankwise/rankwise.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace {

using rankwise::Index;
using Mat = rankwise::Matrix<float>;

// --- the user's model: a two-hidden-layer tanh MLP, forward and backward in plain Eigen -----------------
struct Classifier {
  using Scalar = float;
  rankwise::AnyLinear<float> fc1, fc2, head;  // what rankwise may adapt
  Mat h1, h2, logits, d2, d1, dx;              // activations and gradients

  Classifier(Index in, Index hidden, Index classes, rankwise::Random& rng)
      : fc1(rankwise::Linear<float>(in, hidden, rng)),
        fc2(rankwise::Linear<float>(hidden, hidden, rng)),
        head(rankwise::Linear<float>(hidden, classes, rng)) {}

  // [snippet: host]
  // All rankwise needs from a model: its linear slots by path.
  void for_each_slot(const std::function<void(const std::string&, rankwise::AnyLinear<float>&)>& f) {
    f("encoder.fc1", fc1);
    f("encoder.fc2", fc2);
    f("head", head);
  }
  // [snippet: host]

  const Mat& forward(const Mat& x) {
    fc1.forward(x, h1);
    h1 = h1.array().tanh();
    fc2.forward(h1, h2);
    h2 = h2.array().tanh();
    head.forward(h2, logits);
    return logits;
  }
  void backward(const Mat& dlogits) {
    head.backward(dlogits, d2);
    d2.array() *= 1.0f - h2.array().square();
    fc2.backward(d2, d1);
    d1.array() *= 1.0f - h1.array().square();
    fc1.backward(d1, dx);
  }
  void set_training(bool training) {
    for_each_slot([&](const std::string&, rankwise::AnyLinear<float>& slot) { slot.set_training(training); });
  }
};

struct Data {
  Mat x;                    // in x n, one example per column
  std::vector<int> labels;  // argmax of a linear teacher
};

Data make_data(const Mat& teacher, Index n, rankwise::Random& rng) {
  Data d{Mat(teacher.cols(), n), std::vector<int>(std::size_t(n))};
  rankwise::fill_normal(d.x, 0.0, 1.0, rng);
  const Mat scores = teacher * d.x;
  for (Index j = 0; j < n; ++j) scores.col(j).maxCoeff(&d.labels[std::size_t(j)]);
  return d;
}

// Mean softmax cross-entropy; its gradient into `dlogits` when given.
double cross_entropy(const Mat& logits, const std::vector<int>& labels, Mat* dlogits) {
  const Index n = logits.cols();
  Mat p = (logits.rowwise() - logits.colwise().maxCoeff()).array().exp().matrix();
  p.array().rowwise() /= p.colwise().sum().array();
  double loss = 0.0;
  for (Index j = 0; j < n; ++j) loss -= std::log(double(p(labels[std::size_t(j)], j)));
  if (dlogits) {
    *dlogits = p;
    for (Index j = 0; j < n; ++j) (*dlogits)(labels[std::size_t(j)], j) -= 1.0f;
    *dlogits /= float(n);
  }
  return loss / double(n);
}

double accuracy(Classifier& model, const Data& d) {
  model.set_training(false);
  const Mat& logits = model.forward(d.x);
  Index right = 0;
  for (Index j = 0; j < logits.cols(); ++j) {
    Index best = 0;
    logits.col(j).maxCoeff(&best);
    right += best == d.labels[std::size_t(j)];
  }
  model.set_training(true);
  return double(right) / double(logits.cols());
}

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path out = argc > 1 ? argv[1] : "own_model_output";
  const Index in = 32, hidden = 64, classes = 10, batch = 128, rank = 2;
  rankwise::Random rng(11);

  // Two labellings: task A, and task B = A's teacher plus a rank-2 change.
  Mat teacher_a(classes, in), u(classes, 2), v(2, in);
  rankwise::fill_normal(teacher_a, 0.0, 1.0, rng);
  rankwise::fill_normal(u, 0.0, 1.0, rng);
  rankwise::fill_normal(v, 0.0, 0.5, rng);
  const Mat teacher_b = teacher_a + u * v;
  const Data test_b = make_data(teacher_b, 2048, rng);

  // Pre-training on A: the user's own loop, every weight trained.
  Classifier model(in, hidden, classes, rng);
  std::vector<rankwise::Parameter<float>*> weights;
  model.for_each_slot([&](const std::string& path, rankwise::AnyLinear<float>& slot) {
    slot.set_path(path);
    for (rankwise::Parameter<float>* p : slot.parameters()) weights.push_back(p);
  });
  rankwise::AdamW<float> pretrain(weights, {.lr = 3e-3, .weight_decay = 0.0});
  Mat dlogits;
  for (long step = 0; step < 1500; ++step) {
    const Data d = make_data(teacher_a, batch, rng);
    for (rankwise::Parameter<float>* p : weights) p->zero_grad();
    cross_entropy(model.forward(d.x), d.labels, &dlogits);
    model.backward(dlogits);
    pretrain.step();
  }
  const double before = accuracy(model, test_b);

  // Adaptation to B: LoRA on every slot at 3 x the rank, pruned by drop costs to rank x modules.
  const long steps = 600;
  // [snippet: adapt]
  rankwise::InjectionOptions lora{.adapter = {"lora", rankwise::LoRAOptions{.rank = 3 * rank, .alpha = 3.0 * 2 * rank}},
                                  .all_linear = true};
  rankwise::AdapterSet<float> adapters = rankwise::inject(model, lora, rng);
  rankwise::Trainer<float> trainer(adapters.parameters(), {.steps = steps, .lr = 5e-3});  // AdamW, warm-up, decay
  rankwise::FisherImportance<float> drop_costs;  // predicted from the training gradients: no extra passes
  trainer.allocate_ranks(adapters.rank_modules(), drop_costs, rankwise::pruning_schedule(steps, rank * adapters.size()), rng);
  // [snippet: adapt]
  std::printf("%s\n", adapters.summary(model).to_string().c_str());

  for (long step = 0; step < steps; ++step) {
    const Data d = make_data(teacher_b, batch, rng);
    // [snippet: step]
    trainer.step([&] {  // your forward, loss and backward; the trainer zeroes, clips, updates, prunes
      const double loss = cross_entropy(model.forward(d.x), d.labels, &dlogits);
      model.backward(dlogits);
      return loss;
    });
    // [snippet: step]
  }
  if (trainer.finish() != rankwise::Status::Ok) std::printf("warning: %s\n", trainer.message().c_str());
  const double adapted = accuracy(model, test_b);

  // [snippet: save]
  rankwise::save_peft_adapter(out / "adapter", adapters.named_adapters(), {.base_model_name_or_path = "own-classifier"});
  adapters.merge();  // the weights absorb s B A: zero inference overhead
  // [snippet: save]
  const double merged = accuracy(model, test_b);

  std::printf("accuracy on task B: %.3f before, %.3f adapted, %.3f merged\n", before, adapted, merged);
  std::printf("%s", trainer.allocator()->format_table().c_str());
  std::printf("PEFT adapter in %s\n", (out / "adapter").string().c_str());
  const bool ok = adapted > before + 0.05 && std::abs(merged - adapted) < 1e-3;
  std::printf("own_model: %s\n", ok ? "OK" : "FAILED: the adapter did not improve task B or the merge changed it");
  return ok ? 0 : 1;
}
