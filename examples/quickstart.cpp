// quickstart: wrap one Linear layer with LoRA, fit a planted low-rank change, then merge.
// Shows the whole training loop of rankwise in one page: forward, backward, AdamW, schedule, merge.
// Run: build/examples/quickstart   (exits non-zero if the fit or the merge check fails)
#include <rankwise/rankwise.hpp>

#include <cstdio>

int main() {
  using rankwise::Matrix;
  const rankwise::Index in = 64, out = 64, tokens = 256, true_rank = 4;
  rankwise::Random rng(2026);

  // A frozen base layer, and a target that differs from it by a rank-4 change.
  rankwise::Linear<float> base(in, out, rng);
  Matrix<float> U(out, true_rank), V(true_rank, in);
  rankwise::fill_normal(U, 0.0, 0.5, rng);
  rankwise::fill_normal(V, 0.0, 0.5, rng);
  const Matrix<float> target_weight = base.weight() + U * V;

  // [snippet: wrap]
  rankwise::LoRA<float> lora(base, {.rank = 8, .alpha = 16.0}, rng);
  rankwise::AdamW<float> optimizer(lora.parameters(), {.lr = 2e-2, .weight_decay = 0.0});
  const long steps = 300;
  const auto schedule = rankwise::LRSchedule::cosine(/*warmup_steps=*/20, steps);
  // [snippet: wrap]

  Matrix<float> x(in, tokens), y, dy, dx;
  double first_loss = 0.0, loss = 0.0;
  for (long step = 0; step < steps; ++step) {
    rankwise::fill_normal(x, 0.0, 1.0, rng);
    Matrix<float> target = target_weight * x;
    target.colwise() += base.bias().col(0);

    // [snippet: step]
    lora.zero_grad();
    lora.forward(x, y);
    dy = (y - target) / float(tokens);  // gradient of the mean squared error / 2
    lora.backward(dy, dx);
    optimizer.set_lr_factor(schedule.factor(step));
    optimizer.step();
    // [snippet: step]

    loss = 0.5 * double((y - target).squaredNorm()) / double(tokens);
    if (step == 0) first_loss = loss;
    if (step % 50 == 0 || step == steps - 1) std::printf("step %4ld  loss %.6f\n", step, loss);
  }

  // Merge: the base weights absorb s * B A, and the plain layer now computes the adapted output.
  lora.set_training(false);
  rankwise::fill_normal(x, 0.0, 1.0, rng);
  Matrix<float> adapted, merged;
  lora.forward(x, adapted);
  lora.merge();
  rankwise::Linear<float> deployed = lora.base();
  deployed.forward(x, merged);
  const double merge_gap = double((merged - adapted).cwiseAbs().maxCoeff());

  std::printf("trainable parameters: %ld of %ld\n", long(lora.trainable_parameter_count()),
              long(lora.trainable_parameter_count() + base.parameter_count()));
  std::printf("loss: %.6f -> %.6f\n", first_loss, loss);
  std::printf("merged vs adapted output: max |difference| = %.3g\n", merge_gap);
  const bool ok = loss < 1e-3 * first_loss && merge_gap < 1e-4;
  std::printf("%s\n", ok ? "quickstart: OK" : "quickstart: FAILED");
  return ok ? 0 : 1;
}
