// rank_allocation: let the RankAllocator (ALoRA: AB-LoRA scores, prune and reallocate) move ranks
// between adapted layers whose targets hide planted per-layer ranks, and compare the fit with
// uniform LoRA at the same budget and step count. Exits non-zero if the allocation does not help.
// Run: build/examples/rank_allocation [--small] [--estimator ablation|sensitivity|magnitude] [--seed N]
#include <rankwise/rankwise.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

using rankwise::Index;
using rankwise::Matrix;

namespace {

struct Config {
  std::vector<Index> true_ranks{8, 4, 2, 0, 1, 6, 3, 0};  // budget = their sum, start uniform
  Index dim = 32;
  Index tokens = 64;
  double noise = 0.3;  // sd of the observation noise on the targets
  long warmup = 300, recovery = 100, rounds = 8, steps = 1400;
  Index ranks_per_round = 2;
  std::string estimator = "ablation";
  std::uint64_t seed = 7;
};

// Independent layers y_m = W_m x + b_m whose targets add a planted rank-k_m change to W_m.
struct Problem {
  const Config& config;
  rankwise::Random rng;
  rankwise::Random data;
  std::deque<rankwise::LoRA<float>> layers;  // stable addresses: the allocator holds references
  std::vector<Matrix<float>> target_weights;
  Matrix<float> x_val;
  std::vector<Matrix<float>> y_val;

  Problem(const Config& c, const std::vector<Index>& start) : config(c), rng(c.seed) {
    const Index d = c.dim;
    for (std::size_t m = 0; m < c.true_ranks.size(); ++m) {
      rankwise::Linear<float> base(d, d, rng);
      Matrix<float> u(d, c.true_ranks[m]), v(c.true_ranks[m], d);
      rankwise::fill_normal(u, 0.0, 0.5, rng);
      rankwise::fill_normal(v, 0.0, 0.5, rng);
      target_weights.push_back(base.weight() + u * v);
      const double r0 = double(start[m]);
      layers.emplace_back(base, rankwise::LoRAOptions{.rank = start[m], .alpha = 2.0 * r0}, rng);
      layers.back().set_path(path(m));
    }
    data = rng.fork();
    // One fixed, seeded validation batch (with its noise) for the whole run.
    x_val.resize(d, c.tokens);
    rankwise::fill_normal(x_val, 0.0, 1.0, data);
    for (std::size_t m = 0; m < layers.size(); ++m) {
      Matrix<float> noise(d, c.tokens);
      rankwise::fill_normal(noise, 0.0, c.noise, data);
      y_val.push_back(target(m, x_val) + noise);
    }
  }

  static std::string path(std::size_t m) {
    std::string p("layers.");
    p += std::to_string(m);
    p += ".proj";
    return p;
  }

  Matrix<float> target(std::size_t m, const Matrix<float>& x) const {
    Matrix<float> t = target_weights[m] * x;
    t.colwise() += layers[m].base().bias().col(0);
    return t;
  }

  // Half the mean squared error, summed over layers, accumulated in double.
  double validation_loss() {
    double loss = 0.0;
    Matrix<float> y;
    for (std::size_t m = 0; m < layers.size(); ++m) {
      layers[m].forward(x_val, y);
      loss += 0.5 * (y - y_val[m]).cast<double>().squaredNorm() / double(x_val.cols());
    }
    return loss;
  }

  // The same loss against the noiseless targets on fresh inputs: how well the planted changes are learnt.
  double fit() {
    rankwise::Random test(12345);
    Matrix<float> x(config.dim, 512), y;
    rankwise::fill_normal(x, 0.0, 1.0, test);
    double loss = 0.0;
    for (std::size_t m = 0; m < layers.size(); ++m) {
      layers[m].set_training(false);
      layers[m].forward(x, y);
      loss += 0.5 * (y - target(m, x)).cast<double>().squaredNorm() / double(x.cols());
    }
    return loss;
  }

  std::vector<rankwise::Parameter<float>*> parameters() {
    std::vector<rankwise::Parameter<float>*> params;
    for (rankwise::LoRA<float>& l : layers) {
      params.push_back(&l.A_parameter());
      params.push_back(&l.B_parameter());
    }
    return params;
  }

  // One training step on a fresh noisy batch: forward, backward, optimizer.
  void train_step(rankwise::AdamW<float>& optimizer, Matrix<float>& x, Matrix<float>& noise, Matrix<float>& y,
                  Matrix<float>& dy, Matrix<float>& dx) {
    rankwise::fill_normal(x, 0.0, 1.0, data);
    for (std::size_t m = 0; m < layers.size(); ++m) {
      rankwise::fill_normal(noise, 0.0, config.noise, data);
      layers[m].zero_grad();
      layers[m].set_training(true);
      layers[m].forward(x, y);
      dy = (y - target(m, x) - noise) / float(x.cols());
      layers[m].backward(dy, dx);
    }
    optimizer.step();
  }
};

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--small") {  // the configuration of the unit tests: seconds, not minutes
      c.true_ranks = {6, 3, 1, 0, 2, 4};
      c.dim = 16;
      c.warmup = 150;
      c.recovery = 50;
      c.steps = 700;
    } else if (arg == "--estimator" && i + 1 < argc) {
      c.estimator = argv[++i];
    } else if (arg == "--seed" && i + 1 < argc) {
      c.seed = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: %s [--small] [--estimator ablation|sensitivity|magnitude] [--seed N]\n", argv[0]);
      std::exit(2);
    }
  }
  if (c.estimator != "ablation" && c.estimator != "sensitivity" && c.estimator != "magnitude") {
    std::fprintf(stderr, "unknown estimator '%s'\n", c.estimator.c_str());
    std::exit(2);
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  const Config config = parse(argc, argv);
  Index budget = 0;
  for (Index r : config.true_ranks) budget += r;
  const std::vector<Index> start = rankwise::uniform_ranks(budget, Index(config.true_ranks.size()));
  std::printf("%zu layers %ld x %ld, planted ranks", config.true_ranks.size(), long(config.dim), long(config.dim));
  for (Index r : config.true_ranks) std::printf(" %ld", long(r));
  std::printf("; budget %ld ranks, uniform start; estimator %s; %ld steps\n\n", long(budget), config.estimator.c_str(),
              config.steps);

  // Uniform LoRA: the same problem, the same budget, the same steps, no allocator.
  double uniform_fit = 0.0;
  {
    Problem uniform(config, start);
    rankwise::AdamW<float> optimizer(uniform.parameters(), {.lr = 1e-2, .weight_decay = 0.0});
    Matrix<float> x(config.dim, config.tokens), noise(config.dim, config.tokens), y, dy, dx;
    for (long step = 0; step < config.steps; ++step) uniform.train_step(optimizer, x, noise, y, dy, dx);
    uniform_fit = uniform.fit();
  }

  Problem problem(config, start);
  rankwise::AdamW<float> optimizer(problem.parameters(), {.lr = 1e-2, .weight_decay = 0.0});
  // [snippet: allocator]
  std::vector<rankwise::RankModule<float>> modules;
  for (std::size_t m = 0; m < problem.layers.size(); ++m) modules.emplace_back(problem.layers[m], Problem::path(m));
  rankwise::AblationImportance<float> ablation([&] { return problem.validation_loss(); });
  rankwise::SensitivityImportance<float> sensitivity;
  rankwise::MagnitudeImportance<float> magnitude;
  rankwise::ImportanceEstimator<float>& estimator =
      config.estimator == "sensitivity" ? static_cast<rankwise::ImportanceEstimator<float>&>(sensitivity)
      : config.estimator == "magnitude" ? static_cast<rankwise::ImportanceEstimator<float>&>(magnitude)
                                        : ablation;
  rankwise::RankAllocatorOptions options;
  options.warmup_steps = config.warmup;              // K1
  options.recovery_steps = config.recovery;          // K2
  options.rounds = config.rounds;                    // N_A
  options.ranks_per_round = config.ranks_per_round;  // n_A
  options.total_steps = config.steps;
  rankwise::Random allocator_rng(config.seed + 1);
  rankwise::RankAllocator<float> allocator(modules, estimator, options, allocator_rng);
  allocator.add_optimizer(optimizer);  // the optimizer's state follows every rank change
  // [snippet: allocator]

  Matrix<float> x(config.dim, config.tokens), noise(config.dim, config.tokens), y, dy, dx;
  for (long step = 0; step < config.steps; ++step) {
    // [snippet: step]
    problem.train_step(optimizer, x, noise, y, dy, dx);  // zero_grad, forward, backward, optimizer.step()
    const rankwise::Status status = allocator.step();   // after the optimizer, before the next zero_grad
    if (status != rankwise::Status::Ok) std::printf("step %ld: %s\n", step + 1, allocator.message().c_str());
    // [snippet: step]
  }
  // [snippet: finish]
  if (allocator.finish() != rankwise::Status::Ok) std::printf("warning: %s\n", allocator.message().c_str());
  // [snippet: finish]

  std::printf("%s\n%s\n", allocator.format_table().c_str(), allocator.format_events().c_str());
  std::printf("rank_pattern:");
  for (const auto& [path, rank] : allocator.rank_pattern()) std::printf(" %s=%ld", path.c_str(), long(rank));
  const double fit = problem.fit();
  std::printf("\nfit to the planted changes (0.5 MSE, summed over layers): allocated %.4f, uniform LoRA %.4f\n", fit,
              uniform_fit);
  const bool ok = allocator.status() == rankwise::Status::Ok && fit < uniform_fit;
  std::printf("%s\n", ok ? "rank_allocation: OK" : "rank_allocation: FAILED");
  return ok ? 0 : 1;
}
