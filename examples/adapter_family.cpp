// adapter_family: one layer fine-tuned with each adapter of rankwise, chosen by name at run time
// (LoRA, DyLoRA with its rank sampler, ERAT-DLoRA windows, VeRA with a shared bank, RED, MELoRA),
// then evaluated at every DyLoRA rank, merged, and exported as plain LoRA.
// Run: build/examples/adapter_family   (exits non-zero if a fit, a merge or an export check fails)
#include <rankwise/rankwise.hpp>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

namespace {
using rankwise::Index;
using rankwise::Matrix;

constexpr Index kIn = 64, kOut = 64, kTokens = 128, kSteps = 300;

double mse(const Matrix<float>& y, const Matrix<float>& target) {
  return 0.5 * double((y - target).squaredNorm()) / double(y.cols());
}
}  // namespace

int main() {
  rankwise::Random rng(2026);
  bool ok = true;

  // A frozen base layer, and a target that differs from it by a rank-4 change.
  const rankwise::Linear<float> base(kIn, kOut, rng);
  Matrix<float> U(kOut, 4), V(4, kIn);
  rankwise::fill_normal(U, 0.0, 0.4, rng);
  rankwise::fill_normal(V, 0.0, 0.4, rng);
  const Matrix<float> target_weight = base.weight() + U * V;
  Matrix<float> x_eval(kIn, 512);
  rankwise::fill_normal(x_eval, 0.0, 1.0, rng);
  Matrix<float> target_eval = target_weight * x_eval;
  target_eval.colwise() += base.bias().col(0);

  // [snippet: choose]
  // VeRA's frozen projections are drawn once per model, sized to its largest adapted layer.
  auto bank = rankwise::VeRAProjections<float>::make(/*rank=*/256, /*max_in=*/kIn, /*max_out=*/kOut, rng);
  const rankwise::AdapterContext<float> context{bank};
  const std::vector<rankwise::AdapterSpec> specs = {
      {"lora", rankwise::LoRAOptions{.rank = 8, .alpha = 16.0}},
      {"dylora", rankwise::DyLoRAOptions{.max_rank = 8, .alpha = 16.0}},
      {"erat", rankwise::DyLoRAOptions{.max_rank = 8, .alpha = 16.0}},
      {"vera", rankwise::VeRAOptions{.d_initial = 0.1}},
      {"red", rankwise::REDOptions{}},
      {"melora", rankwise::MELoRAOptions{.n = 4, .mini_rank = 2, .alpha = 16.0}},
  };
  // [snippet: choose]

  for (const rankwise::AdapterSpec& spec : specs) {
    rankwise::AnyLinear<float> slot = rankwise::make_linear(base, spec, rng, context);
    slot.set_path("layers.0.mlp.down_proj");
    // Vector-based methods train few scalars and take larger learning rates; frozen-mode DyLoRA trains
    // one component per step.
    const double lr = (spec.name == "vera" || spec.name == "red") ? 5e-2
                      : (spec.name == "lora")                     ? 5e-3
                                                                  : 2e-2;
    rankwise::AdamW<float> optimizer(slot.parameters(), {.lr = lr, .weight_decay = 0.0});
    rankwise::DyLoRASampler dylora_sampler({.min_rank = 1, .max_rank = 8}, rng);
    rankwise::ERATSampler erat_sampler({.max_rank = 8, .total_steps = kSteps, .num_layers = 1}, rng);

    slot.set_training(false);
    Matrix<float> y;
    slot.forward(x_eval, y);
    const double start = mse(y, target_eval);
    slot.set_training(true);

    Matrix<float> x(kIn, kTokens), dy, dx;
    for (Index step = 0; step < kSteps; ++step) {
      rankwise::fill_normal(x, 0.0, 1.0, rng);
      Matrix<float> target = target_weight * x;
      target.colwise() += base.bias().col(0);
      if (spec.name == "dylora") {
        // [snippet: dylora-step]
        // One rank for the whole model this step; the adapters act on it.
        const Index b = dylora_sampler.sample();
        slot.as<rankwise::DyLoRA<float>>().set_active_rank(b);
        // [snippet: dylora-step]
      } else if (spec.name == "erat") {
        // [snippet: erat-step]
        // A window [lo, b) per module, aware of the step and of the module's depth.
        const rankwise::RankWindow w = erat_sampler.sample(step, /*depth=*/0);
        slot.as<rankwise::DyLoRA<float>>().set_window(w.lo, w.b);
        // [snippet: erat-step]
      }
      slot.zero_grad();
      slot.forward(x, y);
      dy = (y - target) / float(kTokens);
      slot.backward(dy, dx);
      optimizer.step();
    }

    slot.set_training(false);
    if (auto* dylora = slot.get_if<rankwise::DyLoRA<float>>()) {
      std::printf("%-7s loss by rank b:", spec.name.c_str());
      for (Index b = 1; b <= dylora->max_rank(); ++b) {
        dylora->set_active_rank(b);
        slot.forward(x_eval, y);
        std::printf(" %.4f", mse(y, target_eval));
      }
      std::printf("\n");
      dylora->set_active_rank(dylora->max_rank());
    }
    slot.forward(x_eval, y);
    const double end = mse(y, target_eval);
    std::printf("%-7s trainable %6ld  loss %.4f -> %.4f\n", spec.name.c_str(), long(slot.trainable_parameter_count()),
                start, end);
    // A dense rank-4 change is within LoRA's reach; DyLoRA trains one component per step (slower);
    // MELoRA sees only the diagonal blocks, VeRA has r + out scalars, RED only rescales and shifts.
    const double expected = spec.name == "lora" ? 0.01 : (spec.name == "dylora" || spec.name == "erat") ? 0.25
                            : spec.name == "red" ? 0.99 : 0.9;
    if (!(end < expected * start)) {
      std::printf("  FAILED: %s did not fit\n", spec.name.c_str());
      ok = false;
    }

    // [snippet: export]
    // The exact plain-LoRA form of the update (absent for RED, whose edit is not low-rank).
    const std::optional<rankwise::LoRAFactors<float>> factors = slot.lora_factors();
    const Matrix<float> before = slot.parameters().front()->value;  // the base weight
    slot.merge();  // zero inference overhead: the base now computes the adapted layer
    // [snippet: export]
    Matrix<float> y_merged;
    slot.forward(x_eval, y_merged);
    const double merge_error = double((y_merged - y).norm()) / double(y.norm());
    const Matrix<float> delta = slot.parameters().front()->value - before;
    const double export_error =
        factors ? double((factors->delta_weight() - delta).norm()) / double(delta.norm()) : 0.0;
    std::printf("        merge error %.2e, export error %.2e (rank %ld)\n", merge_error, export_error,
                factors ? long(factors->rank()) : 0L);
    if (!(merge_error < 1e-5) || !(export_error < 1e-5) || (factors.has_value() == (spec.name == "red"))) {
      std::printf("  FAILED: %s merge or export\n", spec.name.c_str());
      ok = false;
    }
  }

  // The VeRA bank is held once however many layers use it.
  rankwise::MemoryReport report;
  std::vector<rankwise::AnyLinear<float>> layers;
  for (int i = 0; i < 4; ++i) {
    layers.push_back(rankwise::make_linear(base, {"vera", {}}, rng, context));
    report.add_layer(layers.back());
  }
  std::printf("4 VeRA layers: trainable %ld, shared %ld scalars (bank %ld)\n", long(report.trainable()),
              long(report.shared()), long(bank->size()));
  if (report.shared() != bank->size()) ok = false;

  std::printf(ok ? "all checks passed\n" : "some checks FAILED\n");
  return ok ? 0 : 1;
}
