// Tests for rankwise/adapters/vera.hpp.
#include <rankwise/adapters/vera.hpp>
#include <rankwise/core/memory.hpp>
#include <rankwise/optim/adamw.hpp>
#include <rankwise/testing/gradient_check.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <memory>
#include <vector>

using rankwise::Index;
using rankwise::Linear;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::VeRA;
using rankwise::VeRAProjections;
using rankwise::test_support::is_close_to;
using rankwise::test_support::random_matrix;

namespace {
template <typename Scalar>
void randomize_vectors(VeRA<Scalar>& vera, Random& rng) {
  vera.lambda_d_parameter().value = random_matrix<Scalar>(vera.rank(), 1, rng);
  vera.lambda_b_parameter().value = random_matrix<Scalar>(vera.out_features(), 1, rng);
}

// W x + b + diag(lambda_b) B[:out, :] diag(lambda_d) A[:, :in] x, the obvious way.
template <typename Scalar>
Matrix<Scalar> reference_forward(const VeRA<Scalar>& vera, const Matrix<Scalar>& x) {
  const Index in = vera.in_features(), out = vera.out_features();
  Matrix<Scalar> y = vera.base().weight() * x;
  y.colwise() += vera.base().bias().col(0);
  const Matrix<Scalar> A = vera.projections().A().leftCols(in);
  const Matrix<Scalar> B = vera.projections().B().topRows(out);
  Matrix<Scalar> delta(out, in);
  for (Index i = 0; i < out; ++i)
    for (Index j = 0; j < in; ++j) {
      Scalar sum = 0;
      for (Index k = 0; k < vera.rank(); ++k) sum += B(i, k) * vera.lambda_d()(k, 0) * A(k, j);
      delta(i, j) = vera.lambda_b()(i, 0) * sum;
    }
  return y + delta * x;
}
}  // namespace

TEMPLATE_TEST_CASE("VeRA: a fresh adapter reproduces its base, with d at d_initial and b at 0", "[adapters][vera]",
                   float, double) {
  Random rng(1);
  auto bank = VeRAProjections<TestType>::make(16, 12, 10, rng);
  Linear<TestType> base(12, 10, rng);
  const Matrix<TestType> x = random_matrix<TestType>(12, 4, rng);
  Matrix<TestType> y_base, y;
  base.forward(x, y_base);
  VeRA<TestType> vera(base, bank);
  vera.forward(x, y);
  CHECK(y == y_base);
  CHECK(vera.lambda_b().isZero(0));
  CHECK(vera.lambda_d().rows() == 16);
  CHECK((vera.lambda_d().array() == TestType(0.1)).all());
  VeRA<TestType> other(base, bank, {.d_initial = 0.05});
  CHECK((other.lambda_d().array() == TestType(0.05)).all());
}

TEST_CASE("VeRA: projections are Kaiming-uniform with PEFT's fan-ins, drawn A then B from the seed",
          "[adapters][vera]") {
  Random rng(7);
  const VeRAProjections<double> bank(64, 300, 200, rng);
  const double bound_A = std::sqrt(6.0 / 300.0), bound_B = std::sqrt(6.0 / 64.0);
  CHECK(bank.A().rows() == 64);
  CHECK(bank.A().cols() == 300);
  CHECK(bank.B().rows() == 200);
  CHECK(bank.B().cols() == 64);
  CHECK(bank.A().cwiseAbs().maxCoeff() <= bound_A);
  CHECK(bank.A().cwiseAbs().maxCoeff() > 0.99 * bound_A);
  CHECK(bank.B().cwiseAbs().maxCoeff() <= bound_B);
  CHECK(bank.B().cwiseAbs().maxCoeff() > 0.99 * bound_B);
  // Row by row, A first: the first entries replay from a generator with the same seed.
  Random replay(7);
  CHECK(bank.A()(0, 0) == replay.uniform(-bound_A, bound_A));
  CHECK(bank.A()(0, 1) == replay.uniform(-bound_A, bound_A));
  for (Index i = 2; i < 64 * 300; ++i) replay.uniform();
  CHECK(bank.B()(0, 0) == replay.uniform(-bound_B, bound_B));
  const auto tensors = bank.parameters();
  REQUIRE(tensors.size() == 2);
  CHECK(tensors[0]->name == "vera_A");
  CHECK(tensors[1]->name == "vera_B");
  CHECK_FALSE(tensors[0]->trainable);
  CHECK(bank.size() == 64 * (300 + 200));
}

TEST_CASE("VeRA: equal seeds give identical projections, different seeds different ones", "[adapters][vera]") {
  Random a(3), b(3), c(4);
  const VeRAProjections<float> pa(32, 20, 24, a), pb(32, 20, 24, b), pc(32, 20, 24, c);
  CHECK(pa.A() == pb.A());
  CHECK(pa.B() == pb.B());
  CHECK(pa.A() != pc.A());
  CHECK(pa.B() != pc.B());
  // Stored projections give the same bank back.
  const VeRAProjections<float> stored(pa.A(), pa.B());
  CHECK(stored.A() == pa.A());
  CHECK(stored.B() == pa.B());
  CHECK(stored.rank() == 32);
  CHECK(stored.max_in() == 20);
  CHECK(stored.max_out() == 24);
}

TEST_CASE("VeRA: adapters of one model really share one bank, sliced top-left", "[adapters][vera]") {
  Random rng(5);
  auto bank = VeRAProjections<double>::make(8, 20, 16, rng);
  VeRA<double> q(Linear<double>(20, 16, rng), bank), small(Linear<double>(12, 6, rng), bank);
  CHECK(&q.projections() == &small.projections());
  CHECK(q.shared_projections().get() == bank.get());
  CHECK(bank.use_count() == 3);  // one bank, three holders, no copies
  // The small layer computes with A[:, :12] and B[:6, :].
  randomize_vectors(small, rng);
  const Matrix<double> x = random_matrix<double>(12, 3, rng);
  Matrix<double> y;
  small.forward(x, y);
  CHECK_THAT(y, is_close_to(reference_forward(small, x), 1e-12, 1e-12));
  // A model's memory report counts the bank once, however many layers use it.
  rankwise::MemoryReport report;
  report.add_layer(q);
  report.add_layer(small);
  CHECK(report.shared() == 8 * (20 + 16));
  CHECK(report.shared_tensors() == 2);
  CHECK(report.trainable() == (16 + 8) + (6 + 8));
  CHECK(report.frozen() == (20 * 16 + 16) + (12 * 6 + 6));
  CHECK(report.bytes() == 8 * report.total());
}

TEMPLATE_TEST_CASE("VeRA: forward equals W x + b + Lambda_b B Lambda_d A x", "[adapters][vera]", float, double) {
  Random rng(6);
  auto bank = VeRAProjections<TestType>::make(10, 14, 9, rng);
  VeRA<TestType> vera(Linear<TestType>(14, 9, rng), bank);
  randomize_vectors(vera, rng);
  const Matrix<TestType> x = random_matrix<TestType>(14, 5, rng);
  Matrix<TestType> y, y_eval;
  vera.forward(x, y);
  CHECK_THAT(y, is_close_to(reference_forward(vera, x), 1e-4, 1e-4));
  vera.set_training(false);
  vera.forward(x, y_eval);
  CHECK_THAT(y_eval, is_close_to(y, 1e-6, 1e-6));
}

TEST_CASE("VeRA: backward matches finite differences for both vectors", "[adapters][vera][gradcheck]") {
  Random rng(8);
  auto bank = VeRAProjections<double>::make(12, 9, 8, rng);
  VeRA<double> vera(Linear<double>(7, 6, rng), bank);  // smaller than the bank: slices
  randomize_vectors(vera, rng);
  const Matrix<double> x = random_matrix<double>(7, 4, rng);
  const auto result = rankwise::testing::check_gradients(vera, x, rng);
  INFO(result.worst);
  CHECK(result.max_error < 1e-7);
  REQUIRE(result.entries.size() == 3);  // input, lambda_d, lambda_b: base and bank are frozen
  CHECK(result.entries[1].name == "vera_lambda_d");
  CHECK(result.entries[2].name == "vera_lambda_b");
  CHECK(vera.lambda_d_parameter().grad.cwiseAbs().minCoeff() > 0.0);
  CHECK(vera.lambda_b_parameter().grad.cwiseAbs().minCoeff() > 0.0);
}

TEST_CASE("VeRA: merge gives the adapted output and unmerge restores the base bit for bit", "[adapters][vera]") {
  Random rng(9);
  auto bank = VeRAProjections<float>::make(64, 48, 40, rng);
  VeRA<float> vera(Linear<float>(48, 40, rng), bank);
  randomize_vectors(vera, rng);
  vera.set_training(false);
  const Matrix<float> original = vera.base().weight();
  const Matrix<float> x = random_matrix<float>(48, 6, rng);
  Matrix<float> y_adapted, y_merged, y_after;
  vera.forward(x, y_adapted);
  vera.merge();
  Linear<float> merged_base = vera.base();
  merged_base.forward(x, y_merged);
  CHECK_THAT(y_merged, is_close_to(y_adapted, 1e-4, 1e-4));
  vera.unmerge();
  CHECK(vera.base().weight() == original);
  vera.forward(x, y_after);
  CHECK(y_after == y_adapted);
}

TEST_CASE("VeRA: the plain-LoRA export equals the adapter's delta", "[adapters][vera]") {
  Random rng(10);
  auto bank = VeRAProjections<float>::make(32, 40, 30, rng);
  VeRA<float> vera(Linear<float>(24, 30, rng), bank);
  randomize_vectors(vera, rng);
  const rankwise::LoRAFactors<float> f = rankwise::lora_factors(vera);
  CHECK(f.rank() == 32);
  CHECK(f.A.cols() == 24);
  CHECK(f.B.rows() == 30);
  CHECK(f.scale == 1.0);
  // Compared with the delta computed in double from the definition.
  Matrix<double> expected = Matrix<double>::Zero(30, 24);
  for (Index k = 0; k < 32; ++k)
    expected += double(vera.lambda_d()(k, 0)) * (vera.lambda_b().col(0).cast<double>().asDiagonal() *
                                                 bank->B().col(k).head(30).cast<double>()) *
                bank->A().row(k).head(24).cast<double>();
  CHECK((f.delta_weight().cast<double>() - expected).norm() <= 1e-6 * expected.norm());
  CHECK((vera.delta_weight().cast<double>() - expected).norm() <= 1e-6 * expected.norm());
}

TEST_CASE("VeRA: trainable parameters are out + r (RoBERTa-base q, v at r = 1024 gives 43,008)", "[adapters][vera]") {
  Random rng(11);
  auto bank = VeRAProjections<float>::make(1024, 768, 768, rng);
  VeRA<float> q(Linear<float>(768, 768, rng), bank);
  CHECK(q.trainable_parameter_count() == 768 + 1024);
  CHECK(rankwise::count_trainable(q.parameters()) == q.trainable_parameter_count());
  CHECK(12 * 2 * q.trainable_parameter_count() == 43008);
}

TEST_CASE("VeRA: set_path names the vectors like PEFT, the bank keeps its model-level names", "[adapters][vera]") {
  Random rng(12);
  auto bank = VeRAProjections<float>::make(4, 4, 4, rng);
  VeRA<float> vera(Linear<float>(4, 4, rng), bank);
  vera.set_path("layers.2.attn.q_proj");
  CHECK(vera.lambda_d_parameter().name == "layers.2.attn.q_proj.vera_lambda_d");
  CHECK(vera.lambda_b_parameter().name == "layers.2.attn.q_proj.vera_lambda_b");
  CHECK(vera.parameters().front()->name == "layers.2.attn.q_proj.base_layer.weight");
  CHECK(vera.shared_parameters()[0]->name == "vera_A");
}

TEST_CASE("VeRA: invalid options and layers larger than the bank are rejected", "[adapters][vera][errors]") {
  Random rng(0);
  auto bank = VeRAProjections<float>::make(8, 10, 6, rng);
  SECTION("a layer wider or taller than the bank") {
    CHECK_THROWS_WITH(VeRA<float>(Linear<float>(11, 6, rng), bank),
                      Catch::Contains("[rankwise::VeRA]") && Catch::Contains("in <= max_in = 10") &&
                          Catch::Contains("got in 11, out 6"));
    CHECK_THROWS_WITH(VeRA<float>(Linear<float>(10, 7, rng), bank), Catch::Contains("out <= max_out = 6"));
  }
  SECTION("no bank, or a bad bank") {
    CHECK_THROWS_WITH(VeRA<float>(Linear<float>(4, 4, rng), nullptr), Catch::Contains("needs a projection bank"));
    CHECK_THROWS_WITH(VeRAProjections<float>(0, 4, 4, rng), Catch::Contains("[rankwise::VeRAProjections]"));
    CHECK_THROWS_WITH(VeRAProjections<float>(Matrix<float>::Ones(3, 4), Matrix<float>::Ones(5, 2)),
                      Catch::Contains("got A 3 x 4, B 5 x 2"));
  }
  SECTION("d_initial not finite") {
    CHECK_THROWS_WITH(VeRA<float>(Linear<float>(4, 4, rng), bank, {.d_initial = NAN}),
                      Catch::Contains("d_initial must be finite"));
  }
  SECTION("state errors") {
    VeRA<float> vera(Linear<float>(4, 4, rng), bank);
    Matrix<float> y, dx;
    CHECK_THROWS_AS(vera.backward(Matrix<float>::Zero(4, 2), dx), rankwise::StateError);
    CHECK_THROWS_WITH(vera.forward(Matrix<float>::Zero(5, 2), y), Catch::Contains("in_features = 4"));
    CHECK_THROWS_AS(vera.unmerge(), rankwise::StateError);
    vera.merge();
    CHECK_THROWS_AS(vera.merge(), rankwise::StateError);
  }
}

static_assert(rankwise::Layer<VeRA<double>>);
static_assert(rankwise::Adapter<VeRA<float>>);
static_assert(rankwise::Mergeable<VeRA<double>>);
