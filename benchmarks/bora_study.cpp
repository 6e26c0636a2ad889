// bora_study: does BoRA's prior help related tasks of very different data sizes, on configurations it
// was not tuned to? A family of multi-task regression configurations is generated from seeds, one
// frozen layer per configuration:
//   targets of task d:  y = (W0 + S + O_d) x + noise     S: a low-rank change every task shares
//                                                        O_d: a smaller change of task d's own
//   data:  D in [3, 6] tasks; training columns per task log-uniform in [8, 512] (some tasks data-poor);
//          the sizes of S and O_d, the layer's width and the noise drawn per configuration
// and for each configuration and training seed it trains, with the same optimizer, steps and rank:
//   tau=<t>   BoRA (the paper's squared prior, Task mode) at each τ of the sweep; τ = 0 is D
//             independent LoRAs
//   shared    one LoRA trained on every task's data (the limit of a large τ)
// τ is chosen per configuration by the validation error (its own split), and the held-out test error
// of that τ is reported, never the test error's own best. Errors are excess mean squared errors over
// the noise (what the adapter can still learn), per task and averaged over tasks.
// Output: text on stdout, <out>/runs.csv (one row per configuration, seed, method and task) and
// <out>/summary.md.
// Run: build/benchmarks/bora_study [--configs 8] [--seeds 3] [--steps 400] [--lr 0.02 | --paper-lr
//      [--lr-per-tau 1e-5] [--lr-at-zero 1e-4]] [--taus 0,0.1,...] [--out DIR] (docs/adapters/bora.md)
#include "bench_context.hpp"

#include <rankwise/adapters/bora.hpp>
#include <rankwise/core/init.hpp>
#include <rankwise/detail/rank_correlation.hpp>
#include <rankwise/optim/adamw.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace {
using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;

struct Split {
  Matrix<double> x, y;
  std::vector<std::int32_t> task;
};

struct Config {
  int id = 0;
  Index width = 16, tasks = 3, shared_rank = 2;
  double shared_scale = 0.5, own_scale = 0.3, noise = 0.3;
  std::vector<Index> train_columns;
  Matrix<double> W0;
  Split train, validation, test;
};

Split make_split(const Config& c, const Matrix<double>& S, const std::vector<Matrix<double>>& own,
                 const std::vector<Index>& columns, Random& rng) {
  Split split;
  Index n = 0;
  for (Index k : columns) n += k;
  split.x.resize(c.width, n);
  rankwise::fill_normal(split.x, 0.0, 1.0, rng);
  split.y.resize(c.width, n);
  Index at = 0;
  for (Index d = 0; d < c.tasks; ++d) {
    const Index k = columns[std::size_t(d)];
    split.y.middleCols(at, k) = (c.W0 + S + own[std::size_t(d)]) * split.x.middleCols(at, k);
    split.task.insert(split.task.end(), std::size_t(k), std::int32_t(d));
    at += k;
  }
  Matrix<double> noise(c.width, n);
  rankwise::fill_normal(noise, 0.0, c.noise, rng);
  split.y += noise;
  return split;
}

Config make_config(int id, std::uint64_t seed) {
  Random rng(seed);
  Config c;
  c.id = id;
  c.width = 12 + 4 * Index(rng.uniform() * 4);  // 12, 16, 20 or 24
  c.tasks = 3 + Index(rng.uniform() * 4);       // 3 to 6
  c.shared_scale = rng.uniform(0.3, 0.7);
  c.own_scale = rng.uniform(0.15, 0.4);
  c.noise = rng.uniform(0.2, 0.4);
  for (Index d = 0; d < c.tasks; ++d) c.train_columns.push_back(Index(std::exp(rng.uniform(std::log(8.0), std::log(512.0)))));
  c.W0.resize(c.width, c.width);
  rankwise::fill_normal(c.W0, 0.0, 1.0 / std::sqrt(double(c.width)), rng);
  Matrix<double> U(c.width, c.shared_rank), V(c.shared_rank, c.width);
  rankwise::fill_normal(U, 0.0, std::sqrt(c.shared_scale), rng);
  rankwise::fill_normal(V, 0.0, std::sqrt(c.shared_scale) / std::sqrt(double(c.width)), rng);
  const Matrix<double> S = U * V;
  std::vector<Matrix<double>> own;
  for (Index d = 0; d < c.tasks; ++d) {
    Matrix<double> u(c.width, 1), v(1, c.width);
    rankwise::fill_normal(u, 0.0, std::sqrt(c.own_scale), rng);
    rankwise::fill_normal(v, 0.0, std::sqrt(c.own_scale) / std::sqrt(double(c.width)), rng);
    own.push_back(u * v);
  }
  c.train = make_split(c, S, own, c.train_columns, rng);
  const std::vector<Index> held(std::size_t(c.tasks), 200);
  c.validation = make_split(c, S, own, held, rng);
  c.test = make_split(c, S, own, held, rng);
  return c;
}

// Per-task excess mean squared error (over the noise) of `layer` on `split`.
std::vector<double> task_errors(rankwise::BoRA<double>& layer, const Split& split, Index tasks, double noise,
                                bool shared) {
  std::vector<std::int32_t> route = split.task;
  if (shared) std::fill(route.begin(), route.end(), 0);
  layer.set_training(false);
  layer.set_routing(rankwise::TaskRouting(route, layer.tasks()));
  Matrix<double> y;
  layer.forward(split.x, y);
  std::vector<double> error(std::size_t(tasks), 0.0);
  std::vector<double> count(std::size_t(tasks), 0.0);
  for (Index j = 0; j < split.x.cols(); ++j) {
    const std::size_t d = std::size_t(split.task[std::size_t(j)]);
    error[d] += (y.col(j) - split.y.col(j)).squaredNorm() / double(y.rows());
    count[d] += 1.0;
  }
  for (std::size_t d = 0; d < error.size(); ++d) error[d] = error[d] / count[d] - noise * noise;
  return error;
}

struct Result {
  std::vector<double> validation, test, distance;
};

// Trains BoRA at `tau` (or, shared, one LoRA on all the data) and evaluates it.
// The learning rate of every run: fixed, or the paper's rule (lr = tau * lr_per_tau, lr_at_zero at tau = 0).
struct LearningRate {
  double fixed = 2e-2;
  bool paper = false;
  double per_tau = 1e-5, at_zero = 1e-4;
  double at(double tau) const { return paper ? rankwise::bora_paper_learning_rate(tau, per_tau, at_zero) : fixed; }
};
LearningRate g_lr;

Result train(const Config& c, double tau, bool shared, std::uint64_t seed, int steps) {
  Random rng(seed);
  const Index tasks = shared ? 1 : c.tasks;
  rankwise::BoRA<double> layer(rankwise::Linear<double>(c.W0, std::nullopt, false),
                               {.tasks = tasks, .rank = 4, .alpha = 4.0, .tau = tau}, rng);
  rankwise::AdamW<double> optimizer(layer.parameters(), {.lr = g_lr.at(shared ? 0.0 : tau), .weight_decay = 0.0});
  std::vector<std::int32_t> route = c.train.task;
  if (shared) std::fill(route.begin(), route.end(), 0);
  const rankwise::TaskRouting routing(route, tasks);
  Matrix<double> y, dy, dx;
  for (int step = 0; step < steps; ++step) {
    layer.set_routing(routing);
    layer.zero_grad();
    layer.forward(c.train.x, y);
    dy = y - c.train.y;  // squared error summed over each task's data (the Gaussian NLL)
    layer.backward(dy, dx);
    layer.add_prior_gradient();
    optimizer.step();
  }
  Result r;
  r.validation = task_errors(layer, c.validation, c.tasks, c.noise, shared);
  r.test = task_errors(layer, c.test, c.tasks, c.noise, shared);
  for (Index d = 0; d < tasks; ++d) r.distance.push_back(layer.distance_from_global(d));
  return r;
}

using rankwise::bench::mean;
using rankwise::bench::sd;
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bora_study: BoRA's tau sweep against independent and shared LoRAs on a seeded family"};
  int configs = 8, seeds = 3, steps = 400;
  std::string out = "bora_study";
  std::vector<double> taus = {0.0, 0.1, 1.0, 10.0, 100.0, 1000.0};
  app.add_option("--configs", configs, "configurations of the family")->check(CLI::Range(1, 1000));
  app.add_option("--seeds", seeds, "training seeds per configuration")->check(CLI::Range(1, 100));
  app.add_option("--steps", steps, "AdamW steps per run")->check(CLI::Range(1, 100000));
  app.add_option("--taus", taus, "the tau sweep")->check(CLI::NonNegativeNumber);
  app.add_option("--out", out, "output directory");
  app.add_option("--lr", g_lr.fixed, "AdamW's learning rate for every run")->check(CLI::PositiveNumber);
  app.add_flag("--paper-lr", g_lr.paper, "the paper's rule instead: lr = tau * --lr-per-tau, --lr-at-zero at tau = 0 (and for the shared LoRA)");
  app.add_option("--lr-per-tau", g_lr.per_tau, "with --paper-lr")->check(CLI::PositiveNumber);
  app.add_option("--lr-at-zero", g_lr.at_zero, "with --paper-lr")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  const auto start = std::chrono::steady_clock::now();
  std::filesystem::create_directories(out);
  std::ofstream csv(std::filesystem::path(out) / "runs.csv");
  csv << "config,seed,method,tau,task,train_columns,validation_excess,test_excess,distance\n";
  if (g_lr.paper)
    std::printf("# bora_study: %d configurations x %d seeds, %d AdamW steps (the paper's rule: lr = tau x %g, %g at tau = 0), rank 4, taus:",
                configs, seeds, steps, g_lr.per_tau, g_lr.at_zero);
  else
    std::printf("# bora_study: %d configurations x %d seeds, %d AdamW steps (lr %g), rank 4, taus:", configs, seeds, steps,
                g_lr.fixed);
  for (double t : taus) std::printf(" %g", t);
  std::printf("\n# errors: test mean squared error above the noise, averaged over a configuration's tasks\n\n");
  std::printf("| config | tasks (training columns) | tau=0 | best tau (by validation) | BoRA at it | shared | poorest task: tau=0 / BoRA / shared | Spearman(distance, size) |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  // Family summaries: per configuration, the seed means.
  std::vector<double> gain_vs_independent, gain_vs_shared, poor_gain_vs_independent, poor_gain_vs_shared, rho;
  int beats_both = 0;
  std::vector<std::vector<double>> by_tau(taus.size());  // per tau: each configuration's test error (seed mean)
  std::vector<std::vector<double>> poor_by_tau(taus.size());
  std::vector<double> shared_all, shared_poor_all;
  for (int k = 0; k < configs; ++k) {
    const Config c = make_config(k, 1000 + std::uint64_t(k));
    const std::size_t poorest = std::size_t(std::min_element(c.train_columns.begin(), c.train_columns.end()) - c.train_columns.begin());
    std::vector<std::vector<double>> validation(taus.size()), test(taus.size());  // per tau: per seed, task mean
    std::vector<std::vector<double>> poor_test(taus.size());
    std::vector<double> shared_test, shared_poor;
    std::vector<std::vector<double>> distance_by_tau(taus.size(), std::vector<double>(std::size_t(c.tasks), 0.0));
    for (int s = 0; s < seeds; ++s) {
      const std::uint64_t seed = 7 + std::uint64_t(s);
      for (std::size_t t = 0; t < taus.size(); ++t) {
        const Result r = train(c, taus[t], false, seed, steps);
        validation[t].push_back(mean(r.validation));
        test[t].push_back(mean(r.test));
        poor_test[t].push_back(r.test[poorest]);
        for (Index d = 0; d < c.tasks; ++d) {
          distance_by_tau[t][std::size_t(d)] += r.distance[std::size_t(d)] / double(seeds);
          csv << k << ',' << s << ",bora," << taus[t] << ',' << d << ',' << c.train_columns[std::size_t(d)] << ','
              << r.validation[std::size_t(d)] << ',' << r.test[std::size_t(d)] << ',' << r.distance[std::size_t(d)] << '\n';
        }
      }
      const Result r = train(c, 0.0, true, seed, steps);
      shared_test.push_back(mean(r.test));
      shared_poor.push_back(r.test[poorest]);
      for (Index d = 0; d < c.tasks; ++d)
        csv << k << ',' << s << ",shared,," << d << ',' << c.train_columns[std::size_t(d)] << ','
            << r.validation[std::size_t(d)] << ',' << r.test[std::size_t(d)] << ",\n";
    }
    std::size_t best = 0;
    for (std::size_t t = 1; t < taus.size(); ++t)
      if (mean(validation[t]) < mean(validation[best])) best = t;
    std::vector<double> sizes;
    for (Index n : c.train_columns) sizes.push_back(double(n));
    const double r_best = rankwise::detail::spearman(distance_by_tau[best], sizes).value_or(0.0);
    rho.push_back(r_best);
    gain_vs_independent.push_back(mean(test[0]) - mean(test[best]));
    gain_vs_shared.push_back(mean(shared_test) - mean(test[best]));
    poor_gain_vs_independent.push_back(mean(poor_test[0]) - mean(poor_test[best]));
    poor_gain_vs_shared.push_back(mean(shared_poor) - mean(poor_test[best]));
    if (mean(test[best]) < mean(test[0]) && mean(test[best]) < mean(shared_test)) ++beats_both;
    for (std::size_t t = 0; t < taus.size(); ++t) {
      by_tau[t].push_back(mean(test[t]));
      poor_by_tau[t].push_back(mean(poor_test[t]));
    }
    shared_all.push_back(mean(shared_test));
    shared_poor_all.push_back(mean(shared_poor));
    std::string sizes_text;
    for (Index n : c.train_columns) sizes_text += (sizes_text.empty() ? "" : ", ") + std::to_string(n);
    std::printf("| %d | %ld (%s) | %.4f ± %.4f | %g | %.4f ± %.4f | %.4f ± %.4f | %.4f / %.4f / %.4f | %.2f |\n", k,
                long(c.tasks), sizes_text.c_str(), mean(test[0]), sd(test[0]), taus[best], mean(test[best]),
                sd(test[best]), mean(shared_test), sd(shared_test), mean(poor_test[0]), mean(poor_test[best]),
                mean(shared_poor), r_best);
    std::fflush(stdout);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::string summary;
  char line[512];
  std::snprintf(line, sizeof line, "## The family (%d configurations x %d seeds)\n\n", configs, seeds);
  summary += line;
  std::snprintf(line, sizeof line, "- BoRA at its validation-chosen tau beats both tau = 0 and the shared LoRA on the task mean in %d of %d configurations\n", beats_both, configs);
  summary += line;
  std::snprintf(line, sizeof line, "- test excess error, independent minus BoRA: %.4f ± %.4f (all tasks), %.4f ± %.4f (the poorest task)\n", mean(gain_vs_independent), sd(gain_vs_independent), mean(poor_gain_vs_independent), sd(poor_gain_vs_independent));
  summary += line;
  std::snprintf(line, sizeof line, "- test excess error, shared minus BoRA: %.4f ± %.4f (all tasks), %.4f ± %.4f (the poorest task)\n", mean(gain_vs_shared), sd(gain_vs_shared), mean(poor_gain_vs_shared), sd(poor_gain_vs_shared));
  summary += line;
  std::snprintf(line, sizeof line, "- Spearman correlation of ||theta_d - Theta|| with the task's data size, at the chosen tau: %.2f ± %.2f\n", mean(rho), sd(rho));
  summary += line;
  summary += "\n| method | test excess error, task mean (family mean ± sd) | the poorest task |\n|---|---|---|\n";
  for (std::size_t t = 0; t < taus.size(); ++t) {
    std::snprintf(line, sizeof line, "| tau = %g | %.4f ± %.4f | %.4f ± %.4f |\n", taus[t], mean(by_tau[t]), sd(by_tau[t]),
                  mean(poor_by_tau[t]), sd(poor_by_tau[t]));
    summary += line;
  }
  std::snprintf(line, sizeof line, "| shared LoRA | %.4f ± %.4f | %.4f ± %.4f |\n", mean(shared_all), sd(shared_all),
                mean(shared_poor_all), sd(shared_poor_all));
  summary += line;
  std::printf("\n%s\nresults in %s (runs.csv, summary.md); %.1f s total\n", summary.c_str(), out.c_str(), seconds);
  std::ofstream(std::filesystem::path(out) / "summary.md") << summary;
  return 0;
}
