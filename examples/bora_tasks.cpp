// BoRA on a layer of your own: three related regression tasks of very different data sizes share one
// frozen layer; each column of the batch carries its task, one BoRA layer routes it. Trained once with
// τ = 0 (independent per-task LoRAs) and once with a prior that ties the tasks together; prints the
// held-out error of every task and its adapter's distance from the global mean.
//   build/dev/examples/bora_tasks
#include <rankwise/adapters/bora.hpp>
#include <rankwise/core/init.hpp>
#include <rankwise/optim/adamw.hpp>

#include <cstdint>
#include <cstdio>
#include <vector>

namespace {
using rankwise::Index;
using rankwise::Matrix;

constexpr Index kIn = 16, kOut = 16, kTasks = 3;
const Index kTrainColumns[kTasks] = {400, 60, 12};  // task 2 is data-poor

struct TaskData {
  Matrix<double> x, y;  // in x n inputs and their targets
  std::vector<std::int32_t> task;
};

// Targets y = (W0 + shared + own_d) x + noise: the tasks share a low-rank change and add a small one.
TaskData make_data(const Matrix<double>& W0, const Matrix<double>& shared, const std::vector<Matrix<double>>& own,
                   const Index* columns, rankwise::Random& rng) {
  TaskData data;
  Index n = 0;
  for (Index d = 0; d < kTasks; ++d) n += columns[d];
  data.x.resize(kIn, n);
  rankwise::fill_normal(data.x, 0.0, 1.0, rng);
  data.y.resize(kOut, n);
  Index c = 0;
  for (Index d = 0; d < kTasks; ++d) {
    const Matrix<double> W = W0 + shared + own[std::size_t(d)];
    data.y.middleCols(c, columns[d]) = W * data.x.middleCols(c, columns[d]);
    for (Index j = 0; j < columns[d]; ++j) data.task.push_back(std::int32_t(d));
    c += columns[d];
  }
  Matrix<double> noise(kOut, n);
  rankwise::fill_normal(noise, 0.0, 0.3, rng);
  data.y += noise;
  return data;
}

// Trains a BoRA layer with the given τ; returns the held-out mean squared error of each task.
std::vector<double> train(double tau, const Matrix<double>& W0, const TaskData& train_data, const TaskData& test,
                          std::vector<double>& distances) {
  // [snippet: bora]
  rankwise::Random rng(7);
  rankwise::BoRA<double> layer(rankwise::Linear<double>(W0, std::nullopt, /*trainable=*/false),
                               {.tasks = kTasks, .rank = 4, .alpha = 4.0, .tau = tau}, rng);
  rankwise::AdamW<double> optimizer(layer.parameters(), {.lr = 2e-2, .weight_decay = 0.0});
  const rankwise::TaskRouting routing(train_data.task, kTasks);  // the task of every column
  Matrix<double> y, dy, dx;
  for (int step = 0; step < 300; ++step) {
    layer.set_routing(routing);
    layer.zero_grad();
    layer.forward(train_data.x, y);
    dy = y - train_data.y;  // the squared error summed over every task's data
    layer.backward(dy, dx);
    layer.add_prior_gradient();  // + τ (θ_d − Θ) for each task, − τ Σ_d (θ_d − Θ) for Θ
    optimizer.step();
  }
  // [snippet: bora]
  layer.set_training(false);
  layer.set_routing(rankwise::TaskRouting(test.task, kTasks));
  layer.forward(test.x, y);
  std::vector<double> error(kTasks, 0.0);
  std::vector<Index> count(kTasks, 0);
  for (Index j = 0; j < test.x.cols(); ++j) {
    const std::size_t d = std::size_t(test.task[std::size_t(j)]);
    error[d] += (y.col(j) - test.y.col(j)).squaredNorm() / double(kOut);
    ++count[d];
  }
  distances.clear();
  for (Index d = 0; d < kTasks; ++d) {
    error[std::size_t(d)] /= double(count[std::size_t(d)]);
    distances.push_back(layer.distance_from_global(d));
  }
  return error;
}
}  // namespace

int main() {
  rankwise::Random rng(2024);
  Matrix<double> W0(kOut, kIn), U(kOut, 2), V(2, kIn);
  rankwise::fill_normal(W0, 0.0, 0.3, rng);
  rankwise::fill_normal(U, 0.0, 0.5, rng);
  rankwise::fill_normal(V, 0.0, 0.5, rng);
  const Matrix<double> shared = U * V;
  std::vector<Matrix<double>> own;
  for (Index d = 0; d < kTasks; ++d) {
    Matrix<double> u(kOut, 1), v(1, kIn);
    rankwise::fill_normal(u, 0.0, 0.3, rng);
    rankwise::fill_normal(v, 0.0, 0.3, rng);
    own.push_back(u * v);
  }
  const Index test_columns[kTasks] = {200, 200, 200};
  const TaskData train_data = make_data(W0, shared, own, kTrainColumns, rng);
  const TaskData test = make_data(W0, shared, own, test_columns, rng);

  std::printf("task sizes (training columns): %ld, %ld, %ld\n", long(kTrainColumns[0]), long(kTrainColumns[1]),
              long(kTrainColumns[2]));
  std::printf("| tau | held-out MSE task 0 | task 1 | task 2 | ||theta_d - Theta|| task 0 | task 1 | task 2 |\n");
  std::vector<double> distances;
  for (double tau : {0.0, 1.0, 10.0, 100.0, 1000.0}) {
    const std::vector<double> error = train(tau, W0, train_data, test, distances);
    std::printf("| %g | %.4f | %.4f | %.4f | %.3f | %.3f | %.3f |\n", tau, error[0], error[1], error[2], distances[0],
                distances[1], distances[2]);
  }
  return 0;
}
