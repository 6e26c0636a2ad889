// Tests for rankwise/models/teacher.hpp.
#include <rankwise/models/teacher.hpp>

#include <rankwise/adapters/lora.hpp>
#include <rankwise/models/adapter_set.hpp>
#include <rankwise/optim/adamw.hpp>

#include "support/matchers.hpp"

#include <catch2/catch.hpp>

#include <Eigen/LU>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

using rankwise::DistillPositions;
using rankwise::Index;
using rankwise::Matrix;
using rankwise::ModuleRank;
using rankwise::PlantedTeacher;
using rankwise::Random;
using rankwise::TeacherTask;
using rankwise::ToyTransformer;
using rankwise::ToyTransformerConfig;
using rankwise::test_support::is_close_to;

namespace {
// Inputs of at most 10 tokens: letter tasks of 1..3 letters, sums of one-digit numbers.
const rankwise::TaskOptions kTinyTask{.vocab = 40, .seq_len = 10, .letters = 4, .min_length = 1, .max_length = 3,
                                      .max_digits = 1};
const ToyTransformerConfig kTeacherModel{.vocab = 40, .d_model = 16, .heads = 2, .layers = 2, .d_ff = 24, .max_seq_len = 10};
const rankwise::TaskGenerator kMixture(rankwise::TaskKind::Mixture, kTinyTask);

template <typename Scalar>
Matrix<Scalar> weight_of(ToyTransformer<Scalar>& model, const std::string& path) {
  return model.linear(path).template as<rankwise::Linear<Scalar>>().weight();
}

template <typename Scalar>
std::map<std::string, Matrix<Scalar>> values_of(ToyTransformer<Scalar>& model) {
  std::map<std::string, Matrix<Scalar>> out;
  for (rankwise::Parameter<Scalar>* p : model.parameters()) out[p->name] = p->value;
  return out;
}

// A few dozen steps of pre-training on the mixture, so that the base is not a random network.
void pretrain(ToyTransformer<float>& model, long steps) {
  Random rng(77);
  std::vector<rankwise::Parameter<float>*> params = model.parameters();
  rankwise::AdamW<float> optimizer(params, {.lr = 1e-2, .weight_decay = 0.0});
  rankwise::CrossEntropy<float> ce;
  Matrix<float> logits, dlogits;
  for (long step = 0; step < steps; ++step) {
    const rankwise::TokenBatch data = kMixture.sample(16, rng);
    model.zero_grad();
    model.forward(data.tokens, data.seq_len, logits);
    ce.forward(logits, data.targets);
    ce.backward(dlogits);
    model.backward(dlogits);
    optimizer.step();
  }
}

rankwise::InjectionOptions lora_on(const std::vector<ModuleRank>& modules) {
  rankwise::InjectionOptions o;
  o.adapter.name = "lora";
  o.adapter.options = rankwise::LoRAOptions{.rank = 1, .alpha = 2.0};
  for (const ModuleRank& m : modules) {
    o.target_modules.push_back(m.path);
    o.rank_pattern[m.path] = m.rank;
    o.alpha_pattern[m.path] = 2.0 * double(m.rank);  // scale 2 at every rank
  }
  return o;
}
}  // namespace

TEST_CASE("PlantedTeacher: each planted change has exactly the planted rank and spectrum", "[models][teacher]") {
  Random rng(1);
  ToyTransformer<double> base(kTeacherModel, rng);
  const std::vector<ModuleRank> plan = {{"layers.1.attn.v_proj", 1}, {"layers.0.mlp.up_proj", 3}, {"lm_head", 2}};
  Random plant_rng(2);
  PlantedTeacher<double> teacher(base, plan, {.scale = 0.7, .decay = 0.5}, plant_rng);
  REQUIRE(teacher.changes().size() == 3);
  for (std::size_t i = 0; i < plan.size(); ++i) {
    const rankwise::PlantedChange& change = teacher.changes()[i];
    INFO(change.path);
    CHECK(change.path == plan[i].path);
    const Matrix<double> W = weight_of(base, change.path);
    const Matrix<double> delta = weight_of(teacher.model(), change.path) - W;
    CHECK_THAT(delta, is_close_to(change.delta(), 1e-12, 1e-14));
    const Eigen::JacobiSVD<Matrix<double>> svd(delta);
    const Eigen::VectorXd s = svd.singularValues();
    const double rms = W.norm() / std::sqrt(double(std::min(W.rows(), W.cols())));
    const Index k = plan[i].rank;
    for (Index j = 0; j < s.size(); ++j) {
      if (j < k)
        CHECK(s(j) == Approx(0.7 * rms * std::pow(0.5, double(j))).epsilon(1e-10));
      else
        CHECK(s(j) < 1e-12 * s(0));
    }
    CHECK_THAT(Matrix<double>(change.U.transpose() * change.U), is_close_to(Matrix<double>(Matrix<double>::Identity(k, k)), 0, 1e-12));
    CHECK_THAT(Matrix<double>(change.V.transpose() * change.V), is_close_to(Matrix<double>(Matrix<double>::Identity(k, k)), 0, 1e-12));
    CHECK(change.weight_rms == Approx(rms).epsilon(1e-12));
  }
}

TEST_CASE("PlantedTeacher: the teacher differs from the base only in the planted weights", "[models][teacher]") {
  Random rng(3);
  ToyTransformer<double> base(kTeacherModel, rng);
  const auto before = values_of(base);
  const std::vector<ModuleRank> plan = {{"layers.0.attn.k_proj", 2}, {"layers.1.mlp.down_proj", 4}};
  Random plant_rng(4);
  PlantedTeacher<double> teacher(base, plan, {}, plant_rng);
  CHECK(values_of(base) == before);  // the base is read, not changed
  const auto after = values_of(teacher.model());
  REQUIRE(after.size() == before.size());
  for (const auto& [name, value] : before) {
    INFO(name);
    const bool planted = name == "layers.0.attn.k_proj.weight" || name == "layers.1.mlp.down_proj.weight";
    CHECK((after.at(name) == value) == !planted);
  }
  for (rankwise::Parameter<double>* p : teacher.model().parameters()) CHECK_FALSE(p->trainable);
  CHECK_FALSE(teacher.model().is_training());

  REQUIRE(teacher.truth().size() == 13);  // every module, in model order
  CHECK(teacher.truth().front() == ModuleRank{"layers.0.attn.q_proj", 0});
  CHECK(teacher.truth()[1] == ModuleRank{"layers.0.attn.k_proj", 2});
  CHECK(teacher.truth()[11] == ModuleRank{"layers.1.mlp.down_proj", 4});
  CHECK(teacher.truth().back() == ModuleRank{"lm_head", 0});
  CHECK(teacher.planted_rank("layers.1.mlp.down_proj") == 4);
  CHECK(teacher.planted_rank("layers.1.mlp.up_proj") == 0);
}

TEST_CASE("PlantedTeacher: the default plan spreads ranks over depths and module kinds", "[models][teacher]") {
  const std::vector<ModuleRank> reference = rankwise::default_plant_plan(ToyTransformerConfig{});
  CHECK(reference == std::vector<ModuleRank>{{"layers.0.attn.q_proj", 4},
                                              {"layers.0.mlp.up_proj", 16},
                                              {"layers.1.attn.v_proj", 8},
                                              {"layers.3.attn.o_proj", 2}});
  const ToyTransformerConfig one_layer{.vocab = 40, .d_model = 4, .heads = 2, .layers = 1, .d_ff = 2, .max_seq_len = 10};
  CHECK(rankwise::default_plant_plan(one_layer) == std::vector<ModuleRank>{{"layers.0.attn.q_proj", 1},
                                                                           {"layers.0.attn.v_proj", 1},
                                                                           {"layers.0.attn.o_proj", 1},
                                                                           {"layers.0.mlp.up_proj", 1}});
  for (const ToyTransformerConfig& c : {kTeacherModel, one_layer}) {  // valid plans for small models too
    Random rng(5);
    ToyTransformer<float> base(c, rng);
    PlantedTeacher<float> teacher(base, rankwise::default_plant_plan(c), {}, rng);
    Index planted = 0;
    for (const ModuleRank& m : teacher.truth()) planted += m.rank > 0;
    CHECK(planted == 4);
  }
}

TEST_CASE("PlantedTeacher: calibration gives each change alone the target KL and keeps its rank", "[models][teacher]") {
  Random rng(16);
  ToyTransformer<float> base(kTeacherModel, rng);
  pretrain(base, 30);
  Random plant_rng(17);
  PlantedTeacher<float> teacher(base, rankwise::default_plant_plan(kTeacherModel), {}, plant_rng);
  Random data_rng(18);
  const rankwise::TokenBatch inputs = kMixture.sample(32, data_rng);
  const rankwise::PlantCalibration report = teacher.calibrate(inputs, {.target_kl = 0.01});
  INFO(report.message);
  REQUIRE(report.status == rankwise::Status::Ok);
  REQUIRE(report.kl.size() == 4);
  Matrix<float> base_logits, logits;
  base.set_training(false);
  base.forward(inputs.tokens, inputs.seq_len, base_logits);
  for (std::size_t i = 0; i < 4; ++i) {
    const rankwise::PlantedChange& change = teacher.changes()[i];
    INFO(change.path << " at scale " << report.scale[i]);
    CHECK(report.kl[i] == Approx(0.01).epsilon(0.02));
    CHECK(change.scale == report.scale[i]);
    CHECK(change.singular_values.isConstant(report.scale[i] * change.weight_rms, 1e-12));
    // Independently: the base plus this change alone.
    PlantedTeacher<float> alone(base, {}, {}, plant_rng);
    for (rankwise::Parameter<float>* p : alone.model().parameters())
      if (p->name == change.path + ".weight") p->value += change.delta().cast<float>();
    alone.model().forward(inputs.tokens, inputs.seq_len, logits);
    const auto q = rankwise::make_teacher_batch<float>(inputs, logits, 1.0, DistillPositions::Targets);
    CHECK(rankwise::score_distillation<float>(q, base_logits).mean_kl() == Approx(report.kl[i]).epsilon(1e-3));
    // The teacher holds the change at that scale.
    const Matrix<double> delta = (weight_of(teacher.model(), change.path) - weight_of(base, change.path)).cast<double>();
    CHECK_THAT(delta, is_close_to(change.delta(), 1e-3, 1e-5));
  }
  CHECK(report.total_kl > 0.01);

  // An unreachable target: the closest scale found within max_scale, and a status that says so.
  const rankwise::PlantCalibration missed = teacher.calibrate(inputs, {.target_kl = 50.0, .max_scale = 2.0});
  CHECK(missed.status == rankwise::Status::NotApplied);
  CHECK_THAT(missed.message, Catch::Contains("'layers.0.attn.q_proj' reached KL") && Catch::Contains("(target 50)"));
  for (double scale : missed.scale) CHECK(scale <= 2.0);

  // A failed calibration leaves the teacher as it was.
  const auto before = values_of(teacher.model());
  rankwise::TokenBatch bad = inputs;
  bad.tokens[3] = 99;
  CHECK_THROWS_WITH(teacher.calibrate(bad), Catch::Contains("(got 99)"));
  CHECK(values_of(teacher.model()) == before);
}

TEST_CASE("TeacherTask: planting and batches are deterministic for a seed", "[models][teacher]") {
  Random rng(6);
  ToyTransformer<float> base(kTeacherModel, rng);
  const std::vector<ModuleRank> plan = rankwise::default_plant_plan(kTeacherModel);
  Random a(7), b(7), c(8);
  PlantedTeacher<float> ta(base, plan, {}, a), tb(base, plan, {}, b), tc(base, plan, {}, c);
  CHECK(values_of(ta.model()) == values_of(tb.model()));
  CHECK(values_of(ta.model()) != values_of(tc.model()));

  TeacherTask<float> task_a(ta.model(), kMixture), task_b(tb.model(), kMixture);
  Random da(9), db(9);
  const rankwise::TeacherBatch<float> x = task_a.sample(4, da), y = task_b.sample(4, db);
  CHECK(x.inputs.tokens == y.inputs.tokens);
  CHECK(x.probs == y.probs);
  CHECK(x.mask == y.mask);
  const auto hx = task_a.held_out(7, 3, da), hy = task_b.held_out(7, 3, db);
  REQUIRE(hx.size() == 3);  // 3 + 3 + 1 sequences
  CHECK(hx[2].inputs.batch == 1);
  for (std::size_t i = 0; i < hx.size(); ++i) CHECK(hx[i].probs == hy[i].probs);
  // Scored columns hold distributions, the others nothing.
  for (Index t = 0; t < x.probs.cols(); ++t) {
    if (x.mask[std::size_t(t)])
      CHECK(double(x.probs.col(t).sum()) == Approx(1.0).epsilon(1e-5));
    else
      CHECK(x.probs.col(t).isZero(0.0));
  }
}

TEST_CASE("score_distillation: KL and agreement are right on a hand-made example", "[models][teacher]") {
  using V = rankwise::Vocabulary;
  rankwise::TokenBatch inputs;
  inputs.batch = 1;
  inputs.seq_len = 3;
  inputs.tokens = {V::task_token(rankwise::TaskKind::Copy), V::first_letter, V::pad};
  inputs.targets = {rankwise::ignore_index, 7, rankwise::ignore_index};  // only column 1 is a scored target
  const double ln2 = std::log(2.0), ln3 = std::log(3.0);
  Matrix<double> teacher(3, 3), student(3, 3);
  teacher.col(0) << 0, 0, ln3;  // q = (.2, .2, .6)
  teacher.col(1) << 0, ln2, 0;  // q = (.25, .5, .25)
  teacher.col(2) << 5, 0, 0;    // padding: never scored
  student.col(0) << 0, 0, ln3;  // the same as the teacher
  student.col(1) << ln2, 0, 0;  // p = (.5, .25, .25)
  student.col(2) << 0, 9, 0;

  const auto targets = rankwise::make_teacher_batch<double>(inputs, teacher, 1.0, DistillPositions::Targets);
  CHECK(targets.mask == std::vector<std::uint8_t>{0, 1, 0});
  CHECK(targets.argmax == std::vector<std::int32_t>{rankwise::ignore_index, 1, rankwise::ignore_index});
  CHECK(targets.entropy[1] == Approx(1.5 * ln2));
  rankwise::DistillationScore s = rankwise::score_distillation<double>(targets, student);
  CHECK(s.scored == 1);
  CHECK(s.mean_kl() == Approx(0.25 * ln2));  // .25 ln(.25/.5) + .5 ln(.5/.25)
  CHECK(s.agreement() == 0.0);
  rankwise::DistillationLoss<double> loss;
  CHECK(loss.forward(student, targets) == Approx(0.25 * ln2));

  const auto dense = rankwise::make_teacher_batch<double>(inputs, teacher, 1.0, DistillPositions::NonPadding);
  CHECK(dense.mask == std::vector<std::uint8_t>{1, 1, 0});
  s = rankwise::score_distillation<double>(dense, student);
  CHECK(s.scored == 2);
  CHECK(s.mean_kl() == Approx(0.125 * ln2));
  CHECK(s.agreement() == 0.5);
  CHECK(loss.forward(student, dense) == Approx(0.125 * ln2));

  // At tau = 2, column 1: q = (1, sqrt2, 1) / (2 + sqrt2), p = (sqrt2, 1, 1) / (2 + sqrt2).
  const auto warm = rankwise::make_teacher_batch<double>(inputs, teacher, 2.0, DistillPositions::Targets);
  const double r2 = std::sqrt(2.0);
  const double expected = (std::log(1.0 / r2) + r2 * std::log(r2)) / (2.0 + r2);
  CHECK(rankwise::score_distillation<double>(warm, student).mean_kl() == Approx(expected));
  CHECK(loss.forward(student, warm) == Approx(expected));
  CHECK(rankwise::score_distillation<double>(warm, teacher).mean_kl() == Approx(0.0).margin(1e-15));
}

TEST_CASE("DistillationLoss: gradient matches finite differences, alone and through a student", "[models][teacher][gradcheck]") {
  Random rng(10);
  // The loss alone, at a temperature, with soft (not one-hot) targets.
  rankwise::TokenBatch inputs;
  inputs.batch = 2;
  inputs.seq_len = 3;
  inputs.tokens = {4, 33, 0, 5, 34, 35};
  inputs.targets = {rankwise::ignore_index, 1, rankwise::ignore_index, 2, 3, 1};
  const Matrix<double> teacher = rankwise::test_support::random_matrix<double>(5, 6, rng);
  const Matrix<double> student = rankwise::test_support::random_matrix<double>(5, 6, rng);
  const auto targets = rankwise::make_teacher_batch<double>(inputs, teacher, 1.7, DistillPositions::NonPadding);
  rankwise::DistillationLoss<double> loss;
  loss.forward(student, targets);
  Matrix<double> grad;
  loss.backward(grad);
  CHECK(grad.col(2).isZero(0.0));
  Matrix<double> probe = student;
  rankwise::DistillationLoss<double> other;
  const Matrix<double> numeric =
      rankwise::test_support::central_differences(probe, [&] { return other.forward(probe, targets); });
  for (Index c = 0; c < 5; ++c)
    for (Index t = 0; t < 6; ++t) CHECK(grad(c, t) == Approx(numeric(c, t)).margin(1e-8));

  // The whole wiring: teacher batch -> student forward -> loss -> backward into LoRA (B non-zero).
  ToyTransformer<double> student_model(kTeacherModel, rng);
  const std::vector<ModuleRank> plan = {{"layers.0.attn.q_proj", 1}, {"layers.1.mlp.up_proj", 2}};
  PlantedTeacher<double> planted(student_model, plan, {}, rng);
  TeacherTask<double> task(planted.model(), kMixture, {.temperature = 1.5});
  const rankwise::TeacherBatch<double> batch = task.sample(2, rng);
  rankwise::inject(student_model, lora_on(plan), rng);
  for (rankwise::Parameter<double>* p : student_model.parameters())
    if (p->trainable && p->value.isZero(0.0)) rankwise::fill_normal(p->value, 0.0, 0.3, rng);
  const auto loss_of = [&] {
    Matrix<double> logits;
    student_model.forward(batch.inputs.tokens, batch.inputs.seq_len, logits);
    rankwise::DistillationLoss<double> l;
    return l.forward(logits, batch);
  };
  Matrix<double> logits, dlogits;
  student_model.zero_grad();
  student_model.forward(batch.inputs.tokens, batch.inputs.seq_len, logits);
  CHECK(loss.forward(logits, batch) > 0.0);
  loss.backward(dlogits);
  student_model.backward(dlogits);
  double worst = 0.0;
  Index checked = 0;
  for (rankwise::Parameter<double>* p : student_model.parameters()) {
    if (!p->trainable) continue;
    const Matrix<double> numeric_grad = rankwise::test_support::central_differences(p->value, loss_of);
    for (Index i = 0; i < p->value.size(); ++i) {
      const double n = numeric_grad.data()[i];
      worst = std::max(worst, std::abs(p->grad.data()[i] - n) / std::max(1.0, std::abs(n)));
      ++checked;
    }
  }
  CHECK(checked == 1 * (16 + 16) + 2 * (16 + 24));
  CHECK(worst < 1e-6);
}

TEST_CASE("TeacherTask: KL is 0 for the teacher, positive for the base, and LoRA on the planted modules reduces it",
          "[models][teacher]") {
  Random rng(11);
  ToyTransformer<float> student(kTeacherModel, rng);
  pretrain(student, 30);
  const std::vector<ModuleRank> plan = rankwise::default_plant_plan(kTeacherModel);
  Random plant_rng(12);
  PlantedTeacher<float> teacher(student, plan, {}, plant_rng);
  Random calibration_rng(19);
  REQUIRE(teacher.calibrate(kMixture.sample(32, calibration_rng), {.target_kl = 0.02}).status == rankwise::Status::Ok);
  TeacherTask<float> task(teacher.model(), kMixture);
  Random held_rng(13);
  const auto held = task.held_out(64, 32, held_rng);

  const rankwise::DistillationScore self = rankwise::evaluate_distillation(teacher.model(), held);
  CHECK(std::abs(self.mean_kl()) < 1e-5);
  CHECK(self.agreement() == 1.0);
  CHECK(self.scored > 64);
  const rankwise::DistillationScore base = rankwise::evaluate_distillation(student, held);
  CHECK(base.mean_kl() > 0.04);  // four changes of 0.02 each on the calibration batch
  CHECK(student.is_training());  // restored

  rankwise::inject(student, lora_on(plan), rng);
  std::vector<rankwise::Parameter<float>*> params = student.parameters();
  rankwise::AdamW<float> optimizer(params, {.lr = 1e-2, .weight_decay = 0.0});
  rankwise::DistillationLoss<float> loss;
  Matrix<float> logits, dlogits;
  Random data_rng(14);
  for (int step = 0; step < 40; ++step) {
    const rankwise::TeacherBatch<float> batch = task.sample(16, data_rng);
    student.zero_grad();
    student.forward(batch.inputs.tokens, batch.inputs.seq_len, logits);
    loss.forward(logits, batch);
    loss.backward(dlogits);
    student.backward(dlogits);
    optimizer.step();
  }
  const rankwise::DistillationScore tuned = rankwise::evaluate_distillation(student, held);
  INFO("KL base " << base.mean_kl() << " -> tuned " << tuned.mean_kl());
  CHECK(tuned.mean_kl() < 0.5 * base.mean_kl());
}

TEST_CASE("PlantedTeacher: basis Inputs plants changes that act on the data with their full rank", "[models][teacher]") {
  Random rng(21);
  ToyTransformer<float> base(kTeacherModel, rng);
  pretrain(base, 30);
  Random data(22);
  const rankwise::TokenBatch batch = kMixture.sample(16, data);
  // Two modules that read the same input (layer 0's attention), which neither change moves, so that
  // the effect on the planting batch is exact.
  const std::vector<ModuleRank> plan = {{"layers.0.attn.q_proj", 3}, {"layers.0.attn.v_proj", 5}};
  Random plant_a(23), plant_b(23);
  PlantedTeacher<float> on_inputs(base, plan, {.basis = rankwise::PlantBasis::Inputs}, plant_a, batch);
  PlantedTeacher<float> on_weights(base, plan, {}, plant_b);
  const std::vector<std::vector<double>> inputs_spectra = on_inputs.effect_spectra(batch);
  const std::vector<std::vector<double>> weights_spectra = on_weights.effect_spectra(batch);
  REQUIRE(inputs_spectra.size() == 2);
  for (std::size_t i = 0; i < plan.size(); ++i) {
    INFO(plan[i].path);
    const std::vector<double>& s = inputs_spectra[i];
    REQUIRE(s.size() == std::size_t(plan[i].rank));
    CHECK(s.back() == Approx(s.front()).epsilon(1e-4));  // equal singular values of dW X (float inputs)
    const std::vector<double>& w = weights_spectra[i];
    CAPTURE(w);
    CHECK(w.back() < 0.9 * w.front());  // drawn in weight space, the directions act unequally
    // U is still orthonormal, and dW has exactly the planted rank.
    const rankwise::PlantedChange& c = on_inputs.changes()[i];
    CHECK_THAT(Matrix<double>(c.U.transpose() * c.U),
               is_close_to(Matrix<double>(Matrix<double>::Identity(c.rank, c.rank)), 0, 1e-12));
    const Matrix<double> delta = (weight_of(on_inputs.model(), c.path) - weight_of(base, c.path)).cast<double>();
    CHECK_THAT(delta, is_close_to(c.delta(), 1e-5, 1e-6));
    CHECK(Eigen::FullPivLU<Matrix<double>>(c.delta()).rank() == c.rank);
  }
  // The teacher's slots are plain linear layers again after their inputs were read.
  on_inputs.model().for_each_slot([](const std::string& path, rankwise::AnyLinear<float>& slot) {
    INFO(path);
    CHECK(slot.kind() == "linear");
  });
  Random r(24);
  CHECK_THROWS_WITH(PlantedTeacher<float>(base, plan, {.basis = rankwise::PlantBasis::Inputs}, r),
                    Catch::Contains("basis Inputs needs a batch of inputs"));
  CHECK_THROWS_WITH(PlantedTeacher<float>(base, plan, {.min_variance = 0.0}, r),
                    Catch::Contains("min_variance must be in (0, 1] (got 0)"));
  rankwise::TokenBatch one = kMixture.sample(1, r);
  one.seq_len = 1;  // one token: the inputs of every module span one direction
  one.tokens.resize(1);
  one.targets.resize(1);
  CHECK_THROWS_WITH(PlantedTeacher<float>(base, plan, {.basis = rankwise::PlantBasis::Inputs}, r, one),
                    Catch::Contains("vary along fewer than 3 directions"));
}

TEST_CASE("TeacherLoss: the teacher's distributions of a batch seen before are reused, and stay right",
          "[models][teacher]") {
  Random rng(31);
  ToyTransformer<float> student(kTeacherModel, rng);
  Random plant_rng(32);
  PlantedTeacher<float> teacher(student, {{"layers.1.attn.v_proj", 2}}, {.scale = 2.0}, plant_rng);
  rankwise::TeacherLoss<float> loss(teacher.model());
  Random data(33);
  std::vector<rankwise::TokenBatch> batches;
  for (int i = 0; i < 20; ++i) batches.push_back(kMixture.sample(4, data));  // more than the cache holds
  std::vector<double> first;
  Matrix<float> logits, dlogits;
  const auto value_of = [&](const rankwise::TokenBatch& b) {
    student.set_training(false);
    student.forward(b.tokens, b.seq_len, logits);
    return loss.value(logits, b);
  };
  for (const rankwise::TokenBatch& b : batches) first.push_back(value_of(b));
  // Training steps in between (forward_backward never fills the cache) do not disturb later values.
  student.forward(batches[3].tokens, batches[3].seq_len, logits);
  loss.forward_backward(logits, batches[7], dlogits);
  for (std::size_t i = 0; i < batches.size(); ++i) {
    INFO(i);
    CHECK(value_of(batches[i]) == first[i]);  // bit for bit, cached or not
  }
  // And the value is the distillation KL computed from scratch.
  Matrix<float> teacher_logits;
  teacher.model().forward(batches[5].tokens, batches[5].seq_len, teacher_logits);
  const rankwise::TeacherBatch<float> target =
      rankwise::make_teacher_batch<float>(batches[5], teacher_logits, 1.0, DistillPositions::Targets);
  student.forward(batches[5].tokens, batches[5].seq_len, logits);
  rankwise::DistillationLoss<float> direct;
  CHECK(direct.forward(logits, target) == Approx(first[5]).epsilon(1e-12));
}

TEST_CASE("compare_allocation: per-module table and summary on a hand-made allocation", "[models][teacher]") {
  const std::vector<ModuleRank> truth = {{"a", 4}, {"b", 0}, {"c", 2}, {"d", 0}, {"e", 3}, {"f", 0}};
  // e is planted but not adapted; f is neither.
  const std::map<std::string, Index> allocation = {{"a", 3}, {"b", 1}, {"c", 2}, {"d", 2}};
  const rankwise::AllocationComparison cmp = rankwise::compare_allocation(truth, allocation);
  REQUIRE(cmp.rows.size() == 5);
  CHECK(cmp.rows[4].path == "e");
  CHECK(cmp.rows[4].planted == 3);
  CHECK(cmp.rows[4].allocated == 0);
  CHECK_FALSE(cmp.rows[4].adapted);
  CHECK(cmp.planted_total == 9);
  CHECK(cmp.allocated_total == 8);
  CHECK(cmp.allocated_on_planted == 5);
  CHECK(cmp.covered == 5);  // min(3, 4) + min(2, 2)
  CHECK(cmp.share_on_planted() == Approx(5.0 / 8.0));
  CHECK(cmp.coverage() == Approx(5.0 / 9.0));
  // Average ranks: planted (4 0 2 0 3) -> (5 1.5 3 1.5 4), allocated (3 1 2 2 0) -> (5 2 3.5 3.5 1).
  // Centred: (2 -1.5 0 -1.5 1) and (2 -1 .5 .5 -2): (4 + 1.5 - .75 - 2) / sqrt(9.5 * 9.5).
  REQUIRE(cmp.spearman.has_value());
  CHECK(*cmp.spearman == Approx(2.75 / 9.5));
  const std::string table = cmp.format_table();
  CHECK_THAT(table, Catch::Contains("module") && Catch::Contains("planted") && Catch::Contains("allocated"));
  CHECK_THAT(table, Catch::Contains("share on planted 0.625, coverage 0.556, spearman 0.289"));
  CHECK(table.find("f ") == std::string::npos);

  // A uniform allocation has no rank correlation; a perfect one has 1.
  CHECK_FALSE(rankwise::compare_allocation(truth, {{"a", 2}, {"b", 2}, {"c", 2}, {"e", 2}}).spearman.has_value());
  const auto perfect = rankwise::compare_allocation(truth, {{"a", 4}, {"b", 0}, {"c", 2}, {"e", 3}});
  CHECK(*perfect.spearman == Approx(1.0));
  CHECK(perfect.share_on_planted() == 1.0);
  CHECK(perfect.coverage() == 1.0);
}

TEST_CASE("Teacher task: bad input is rejected with clear messages", "[models][teacher][errors]") {
  Random rng(15);
  ToyTransformer<float> base(kTeacherModel, rng);
  const auto plant = [&](std::vector<ModuleRank> plan, rankwise::PlantOptions o = {}) {
    Random r(1);
    PlantedTeacher<float> t(base, std::move(plan), o, r);
  };
  CHECK_THROWS_WITH(plant({{"layers.0.attn.c_attn", 1}}),
                    Catch::Contains("[rankwise::PlantedTeacher] no linear module at path 'layers.0.attn.c_attn'") &&
                        Catch::Contains("layers.0.attn.q_proj") && Catch::Contains("lm_head"));
  CHECK_THROWS_WITH(plant({{"layers.0.attn.q_proj", 0}}),
                    Catch::Contains("rank of 'layers.0.attn.q_proj' must be in [1, min(in, out)] = [1, 16] (got 0)"));
  CHECK_THROWS_WITH(plant({{"layers.0.mlp.up_proj", 17}}), Catch::Contains("[1, 16] (got 17)"));
  CHECK_THROWS_WITH(plant({{"lm_head", 1}, {"layers.0.attn.q_proj", 1}, {"lm_head", 2}}),
                    Catch::Contains("the plan names 'lm_head' more than once"));
  CHECK_THROWS_WITH(plant({}, {.scale = 0.0}), Catch::Contains("scale must be finite and > 0 (got 0)"));
  CHECK_THROWS_WITH(plant({}, {.scale = std::nan("")}), Catch::Contains("scale must be finite and > 0"));
  CHECK_THROWS_WITH(plant({}, {.decay = 1.5}), Catch::Contains("decay must be in (0, 1] (got 1.5)"));
  {
    Random r(2);
    ToyTransformer<float> zero(kTeacherModel, r);
    for (rankwise::Parameter<float>* p : zero.parameters())
      if (p->name == "layers.1.attn.o_proj.weight") p->value.setZero();
    PlantedTeacher<float> fine(zero, {{"layers.1.attn.k_proj", 1}}, {}, r);
    CHECK_THROWS_WITH(PlantedTeacher<float>(zero, {{"layers.1.attn.o_proj", 1}}, {}, r),
                      Catch::Contains("the weight of 'layers.1.attn.o_proj' is zero"));
    CHECK_THROWS_WITH(fine.planted_rank("layers.9.attn.q_proj"), Catch::Contains("no linear module at path"));
  }
  {
    Random r(3);
    ToyTransformer<float> adapted(kTeacherModel, r);
    rankwise::inject(adapted, lora_on({{"layers.1.attn.v_proj", 1}}), r);
    CHECK_THROWS_WITH(PlantedTeacher<float>(adapted, {{"lm_head", 1}}, {}, r),
                      Catch::Contains("must hold plain linear modules (got a \"lora\" at 'layers.1.attn.v_proj')"));
  }

  {
    Random r(4);
    PlantedTeacher<float> t(base, {{"lm_head", 1}}, {}, r);
    const rankwise::TokenBatch inputs = kMixture.sample(2, r);
    CHECK_THROWS_WITH(t.calibrate(inputs, {.target_kl = 0.0}), Catch::Contains("target_kl must be finite and > 0 (got 0)"));
    CHECK_THROWS_WITH(t.calibrate(inputs, {.tolerance = 1.0}), Catch::Contains("tolerance must be in (0, 1) (got 1)"));
    CHECK_THROWS_WITH(t.calibrate(inputs, {.max_scale = -1.0}), Catch::Contains("max_scale must be finite and > 0 (got -1)"));
    CHECK_THROWS_WITH(t.calibrate(inputs, {.max_evaluations = 1}), Catch::Contains("max_evaluations must be >= 2 (got 1)"));
    rankwise::TokenBatch unscored = inputs;
    std::fill(unscored.targets.begin(), unscored.targets.end(), rankwise::ignore_index);
    CHECK_THROWS_WITH(t.calibrate(unscored), Catch::Contains("calibrate: the inputs have no scored position"));
  }

  // The task.
  rankwise::TaskOptions wide = kTinyTask;
  wide.vocab = 48;
  CHECK_THROWS_WITH(TeacherTask<float>(base, rankwise::TaskGenerator(rankwise::TaskKind::Copy, wide)),
                    Catch::Contains("vocab must be the teacher's = 40 (got 48)"));
  rankwise::TaskOptions longer = kTinyTask;
  longer.seq_len = 12;
  CHECK_THROWS_WITH(TeacherTask<float>(base, rankwise::TaskGenerator(rankwise::TaskKind::Copy, longer)),
                    Catch::Contains("seq_len must be <= the teacher's max_seq_len = 10 (got 12)"));
  CHECK_THROWS_WITH(TeacherTask<float>(base, kMixture, {.temperature = -1.0}),
                    Catch::Contains("[rankwise::TeacherTask] temperature must be finite and > 0 (got -1)"));
  TeacherTask<float> task(base, kMixture);
  CHECK_THROWS_WITH(task.held_out(0, 4, rng), Catch::Contains("sequences >= 1 and batch >= 1 (got 0, 4)"));
  CHECK_THROWS_WITH(task.sample(0, rng), Catch::Contains("batch must be >= 1 (got 0)"));
  CHECK_THROWS_WITH(rankwise::evaluate_distillation(base, {}), Catch::Contains("held_out must hold at least one batch"));

  // Targets, loss and score.
  const rankwise::TeacherBatch<float> batch = task.sample(2, rng);
  const Matrix<float> logits = Matrix<float>::Zero(40, 20);
  CHECK_THROWS_WITH(rankwise::make_teacher_batch<float>(batch.inputs, logits, 0.0, DistillPositions::Targets),
                    Catch::Contains("temperature must be finite and > 0 (got 0)"));
  CHECK_THROWS_WITH(rankwise::make_teacher_batch<float>(batch.inputs, logits.leftCols(19), 1.0, DistillPositions::Targets),
                    Catch::Contains("teacher logits must be vocab x 20 (got 40 x 19)"));
  rankwise::TokenBatch short_batch = batch.inputs;
  short_batch.tokens.pop_back();
  CHECK_THROWS_WITH(rankwise::make_teacher_batch<float>(short_batch, logits, 1.0, DistillPositions::Targets),
                    Catch::Contains("must hold batch * seq_len = 20 tokens and targets (got 19 and 20)"));
  rankwise::DistillationLoss<float> loss;
  Matrix<float> grad;
  CHECK_THROWS_AS(loss.backward(grad), rankwise::StateError);
  CHECK_THROWS_WITH(loss.backward(grad), Catch::Contains("backward() needs a forward() first"));
  CHECK_THROWS_WITH(loss.forward(Matrix<float>::Zero(39, 20), batch),
                    Catch::Contains("[rankwise::DistillationLoss] student logits must be 40 x 20 like the teacher's (got 39 x 20)"));
  CHECK_THROWS_WITH(rankwise::score_distillation<float>(batch, Matrix<float>::Zero(40, 21)),
                    Catch::Contains("[rankwise::score_distillation] student logits must be 40 x 20"));
  rankwise::TeacherBatch<float> broken = batch;
  broken.mask.pop_back();
  CHECK_THROWS_WITH(loss.forward(logits, broken),
                    Catch::Contains("needs a mask, an entropy and an argmax per column = 20 (got 19, 20, 20)"));

  // Allocation against the truth.
  const std::vector<ModuleRank> truth = {{"a", 1}, {"b", 0}};
  CHECK_THROWS_WITH(rankwise::compare_allocation(truth, {{"z", 1}}),
                    Catch::Contains("allocation names 'z', which is no module; the paths are: a, b"));
  CHECK_THROWS_WITH(rankwise::compare_allocation(truth, {{"a", -1}}),
                    Catch::Contains("allocated rank of 'a' must be >= 0 (got -1)"));
  CHECK_THROWS_WITH(rankwise::compare_allocation({{"a", -2}}, {}), Catch::Contains("planted rank of 'a' must be >= 0"));
  CHECK_THROWS_WITH(rankwise::compare_allocation({{"a", 1}, {"a", 2}}, {}),
                    Catch::Contains("the truth names 'a' more than once"));
}
