#pragma once
/// \file rankwise/models/teacher.hpp
/// A teacher-student task whose per-module truth is known, for judging rank allocation: the teacher is
/// a copy of a (pre-trained) ToyTransformer whose chosen linear weights get a planted change of known
/// rank, and the student (the base with adapters) learns the teacher's next-token distributions.
///
///   plant    W' = W + dW,  dW = U diag(s_1..s_k) V^T,  U (out x k) orthonormal (QR of Gaussians),
///            s_i = scale * rms(W) * decay^(i-1),  rms(W) = ||W||_F / sqrt(min(in, out)); V (in x k):
///              basis Weights  orthonormal (QR of Gaussians): dW has k equal singular values
///              basis Inputs   orthonormal in the metric of the module's inputs X on a batch,
///                             V^T C V = c I with C = X X^T / N: then dW X has k equal singular values,
///                             so every planted direction moves the module's outputs alike (inputs
///                             fill a few directions; with V drawn in weight space a rank-12 change
///                             can act like a rank-4 one, and the truth is blurred)
///            (decay 1 by default: k equal singular values, so the rank is unambiguous)
///   calibrate  optional, recommended: per module, the scale at which that change alone moves the
///            teacher by a target KL from the base (equal relative scales differ in effect by orders of
///            magnitude between modules)
///   targets  q_t = softmax(z_teacher,t / tau) at the scored positions, teacher in eval mode
///   loss     L = (1/N) sum over scored t of KL(q_t || p_t),  p_t = softmax(z_student,t / tau)
///            dL/dz_student,t = (p_t - q_t) / (tau N)                   (N = scored tokens, nats per token)
///   metric   the same KL at tau = 1 on held-out batches whose teacher distributions are computed once;
///            agreement = share of scored tokens where argmax p_t = argmax q_t
///   truth    the planted rank of every linear module (0 when untouched), and each dW's factors;
///            compare_allocation() sets an allocation (RankAllocator::rank_pattern()) against it
/// Docs: docs/models/toy-transformer.md

#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/core/config.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/init.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/detail/rank_correlation.hpp>
#include <rankwise/layers/cross_entropy.hpp>
#include <rankwise/layers/linear.hpp>
#include <rankwise/models/finetune.hpp>
#include <rankwise/models/tasks.hpp>
#include <rankwise/models/toy_transformer.hpp>

#include <Eigen/Eigenvalues>
#include <Eigen/QR>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iomanip>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

/// A module path and a rank: an entry of a plant plan, or of the truth.
struct ModuleRank {
  std::string path;
  Index rank = 0;

  friend bool operator==(const ModuleRank&, const ModuleRank&) = default;
};

/// Which positions carry a teacher distribution.
enum class DistillPositions {
  Targets,     ///< the positions the input generator scores (answers and EOS; the whole grammar string)
  NonPadding,  ///< every position whose token is not PAD (denser signal, includes the inputs)
};

/// Where the input directions V of a planted change come from (see the header's comment).
enum class PlantBasis {
  Weights,  ///< orthonormal in the weight's input space: dW has equal singular values
  Inputs,   ///< orthonormal in the inputs' metric: dW X has equal singular values (needs a batch)
};

struct PlantOptions {
  double scale = 4.0;  ///< s_1 relative to rms(W), the root-mean-square singular value of W; > 0
  double decay = 1.0;  ///< s_(i+1) / s_i, in (0, 1]; 1 plants equal singular values (the truth is exact)
  PlantBasis basis = PlantBasis::Weights;
  /// Basis Inputs: V lies in the span of the input directions whose variance is at least this share
  /// of the largest (and at least the planted rank of them), so that no direction the inputs barely
  /// visit is amplified beyond 1 / sqrt(min_variance); in (0, 1].
  double min_variance = 0.01;
};

/// PlantedTeacher::calibrate(): each planted change alone moves the teacher by target_kl from the base.
struct PlantCalibrationOptions {
  double target_kl = 0.02;  ///< KL(teacher with only this change || base), nats per scored token; > 0
  double tolerance = 0.02;  ///< stop when |KL - target| <= tolerance * target; in (0, 1)
  double max_scale = 64.0;  ///< the largest s_1 / rms(W) tried; > 0
  int max_evaluations = 40; ///< forward passes per module at most; >= 2
  DistillPositions positions = DistillPositions::Targets;
};

/// What calibrate() reached, per planted change (in plan order).
struct PlantCalibration {
  Status status = Status::Ok;  ///< NotApplied: some module missed the target (message says which)
  std::string message;
  std::vector<double> scale;   ///< s_1 / rms(W) chosen
  std::vector<double> kl;      ///< KL of that change alone, nats per scored token
  double total_kl = 0.0;       ///< KL of the whole teacher
};

/// One planted change dW = U diag(singular_values) V^T, kept in double.
struct PlantedChange {
  std::string path;
  Index rank = 0;
  Matrix<double> U;                ///< out x rank, orthonormal columns
  Vector<double> singular_values;  ///< rank values, non-increasing, > 0
  Matrix<double> V;                ///< in x rank: orthonormal columns (basis Weights), or V^T C V = c I (Inputs)
  double weight_rms = 0.0;         ///< rms(W) of the base weight the scale is relative to
  double scale = 0.0;              ///< s_1 / rms(W)

  /// dW (out x in), for tests and analysis.
  Matrix<double> delta() const { return U * singular_values.asDiagonal() * V.transpose(); }
};

/// A plan that is interesting for allocation: four of the 6·L + 1 modules, at three depths and of four
/// kinds, with ranks d/8, d/16, d/32, d/64 (d = d_model; at least 1, at most min(in, out)):
///   layers.0.attn.q_proj d/32,  layers.0.mlp.up_proj d/8,  layers.{(L-1)/2}.attn.v_proj d/16,
///   layers.{L-1}.attn.o_proj d/64                          (the reference model: 4, 16, 8, 2 = 30 ranks)
/// Every other module is untouched. The modules were chosen where a planted change can reach a useful
/// effect (late q_proj/k_proj changes barely move the output, whatever their size). Model order.
inline std::vector<ModuleRank> default_plant_plan(const ToyTransformerConfig& c) {
  const auto rank = [&](Index divisor, Index limit) { return std::clamp<Index>(c.d_model / divisor, 1, limit); };
  const Index d = c.d_model;
  const std::string mid = "layers." + std::to_string((c.layers - 1) / 2) + ".",
                    last = "layers." + std::to_string(c.layers - 1) + ".";
  const std::map<std::string, Index> chosen = {{"layers.0.attn.q_proj", rank(32, d)},
                                               {"layers.0.mlp.up_proj", rank(8, std::min(d, c.d_ff))},
                                               {mid + "attn.v_proj", rank(16, d)},
                                               {last + "attn.o_proj", rank(64, d)}};
  std::vector<ModuleRank> plan;
  for (Index i = 0; i < c.layers; ++i)  // ToyTransformer::linear_paths() order
    for (const char* leaf : {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj"}) {
      const std::string path = "layers." + std::to_string(i) + "." + leaf;
      if (const auto it = chosen.find(path); it != chosen.end()) plan.push_back({path, it->second});
    }
  return plan;
}

// --- targets and scores --------------------------------------------------------------------------

struct TeacherTaskOptions {
  double temperature = 1.0;  ///< tau of the training targets and the student's softmax; > 0
  DistillPositions positions = DistillPositions::Targets;
};

/// A batch of inputs with the teacher's next-token distributions.
template <FloatScalar Scalar>
struct TeacherBatch {
  TokenBatch inputs;                ///< tokens (and the generator's own hard targets)
  Matrix<Scalar> probs;             ///< vocab x (batch * seq_len): q_t at scored columns, 0 elsewhere
  std::vector<std::uint8_t> mask;   ///< 1 at scored columns
  std::vector<double> entropy;      ///< H(q_t) in nats (0 at unscored columns)
  std::vector<std::int32_t> argmax; ///< the teacher's argmax (ignore_index at unscored columns)
  double temperature = 1.0;
  Index scored = 0;
};

/// The targets for `inputs` from the teacher's logits (vocab x (batch * seq_len)). Pure: usable on
/// hand-made logits. Softmax in double; the entropy is that of the stored (Scalar) probabilities.
template <FloatScalar Scalar>
TeacherBatch<Scalar> make_teacher_batch(TokenBatch inputs, const ConstRef<Scalar>& teacher_logits, double temperature,
                                        DistillPositions positions) {
  if (!(temperature > 0.0) || !std::isfinite(temperature))
    detail::fail("rankwise::make_teacher_batch", "temperature must be finite and > 0 (got ", temperature, ")");
  const Index n = inputs.batch * inputs.seq_len;
  if (Index(inputs.tokens.size()) != n || Index(inputs.targets.size()) != n)
    detail::fail("rankwise::make_teacher_batch", "the batch must hold batch * seq_len = ", n,
                 " tokens and targets (got ", inputs.tokens.size(), " and ", inputs.targets.size(), ")");
  if (teacher_logits.cols() != n || teacher_logits.rows() < 1)
    detail::fail("rankwise::make_teacher_batch", "teacher logits must be vocab x ", n, " (got ", teacher_logits.rows(),
                 " x ", teacher_logits.cols(), ")");
  TeacherBatch<Scalar> out;
  out.temperature = temperature;
  out.probs.setZero(teacher_logits.rows(), n);
  out.mask.assign(std::size_t(n), 0);
  out.entropy.assign(std::size_t(n), 0.0);
  out.argmax.assign(std::size_t(n), ignore_index);
  Eigen::VectorXd column(teacher_logits.rows());
  for (Index t = 0; t < n; ++t) {
    const bool scored = positions == DistillPositions::Targets ? inputs.targets[std::size_t(t)] != ignore_index
                                                               : inputs.tokens[std::size_t(t)] != Vocabulary::pad;
    if (!scored) continue;
    column = teacher_logits.col(t).template cast<double>() / temperature;
    Index best = 0;
    const double top = column.maxCoeff(&best);
    column = (column.array() - top).exp();
    column /= column.sum();
    out.probs.col(t) = column.template cast<Scalar>();
    double h = 0.0;
    for (Index c = 0; c < column.size(); ++c) {
      const double q = double(out.probs(c, t));
      if (q > 0.0) h -= q * std::log(q);
    }
    out.mask[std::size_t(t)] = 1;
    out.entropy[std::size_t(t)] = h;
    out.argmax[std::size_t(t)] = std::int32_t(best);
    ++out.scored;
  }
  out.inputs = std::move(inputs);
  return out;
}

/// KL(teacher || student) summed over scored tokens, and argmax agreement, at the batch's temperature.
struct DistillationScore {
  double kl_sum = 0.0;  ///< nats
  Index agreements = 0;
  Index scored = 0;

  double mean_kl() const { return scored ? kl_sum / double(scored) : 0.0; }  ///< nats per scored token
  double agreement() const { return scored ? double(agreements) / double(scored) : 0.0; }
  DistillationScore& operator+=(const DistillationScore& o) {
    kl_sum += o.kl_sum;
    agreements += o.agreements;
    scored += o.scored;
    return *this;
  }
};

namespace detail {
template <FloatScalar Scalar>
void check_teacher_batch(const char* where, const TeacherBatch<Scalar>& target, const ConstRef<Scalar>& student_logits) {
  if (student_logits.rows() != target.probs.rows() || student_logits.cols() != target.probs.cols())
    fail(where, "student logits must be ", target.probs.rows(), " x ", target.probs.cols(), " like the teacher's (got ",
         student_logits.rows(), " x ", student_logits.cols(), ")");
  const std::size_t n = std::size_t(target.probs.cols());
  if (target.mask.size() != n || target.entropy.size() != n || target.argmax.size() != n)
    fail(where, "the teacher batch needs a mask, an entropy and an argmax per column = ", n, " (got ",
         target.mask.size(), ", ", target.entropy.size(), ", ", target.argmax.size(), ")");
  if (!(target.temperature > 0.0) || !std::isfinite(target.temperature))
    fail(where, "temperature must be finite and > 0 (got ", target.temperature, ")");
}
}  // namespace detail

/// Scores a student's logits against a teacher batch; sums in double.
template <FloatScalar Scalar>
DistillationScore score_distillation(const TeacherBatch<Scalar>& target, const ConstRef<Scalar>& student_logits) {
  detail::check_teacher_batch("rankwise::score_distillation", target, student_logits);
  DistillationScore s;
  Eigen::VectorXd column(student_logits.rows());
  for (Index t = 0; t < student_logits.cols(); ++t) {
    if (!target.mask[std::size_t(t)]) continue;
    column = student_logits.col(t).template cast<double>() / target.temperature;
    Index best = 0;
    const double top = column.maxCoeff(&best);
    const double log_norm = top + std::log((column.array() - top).exp().sum());
    double cross = 0.0;  // -sum q log p
    for (Index c = 0; c < column.size(); ++c) {
      const double q = double(target.probs(c, t));
      if (q > 0.0) cross -= q * (column(c) - log_norm);
    }
    s.kl_sum += cross - target.entropy[std::size_t(t)];
    s.agreements += std::int32_t(best) == target.argmax[std::size_t(t)];
    ++s.scored;
  }
  return s;
}

// --- the teacher ---------------------------------------------------------------------------------

/// The teacher: a copy of `base` with the plan's changes planted. The base is read, never modified
/// (ToyTransformer offers no const access to its parameters); it must hold plain Linear modules, so
/// build the teacher before injecting adapters into the base. The teacher is frozen and in eval mode.
template <FloatScalar Scalar_>
class PlantedTeacher {
 public:
  using Scalar = Scalar_;

  /// `inputs`: the batch whose module inputs define the metric of PlantBasis::Inputs (required
  /// there, unused with PlantBasis::Weights).
  PlantedTeacher(ToyTransformer<Scalar>& base, std::vector<ModuleRank> plan, const PlantOptions& options, Random& rng,
                 const TokenBatch& inputs = {})
      : m_options(checked(options)), m_model(same_shape(base.config())) {
    validate(base, plan);
    if (options.basis == PlantBasis::Inputs && inputs.batch < 1)
      detail::fail("rankwise::PlantedTeacher", "basis Inputs needs a batch of inputs (got an empty batch)");
    m_model.copy_parameters_from(base);
    m_model.set_base_trainable(false);
    m_model.set_training(false);
    std::vector<std::string> paths;
    for (const ModuleRank& entry : plan) paths.push_back(entry.path);
    const std::map<std::string, Matrix<double>> moments =
        options.basis == PlantBasis::Inputs ? input_moments(paths, inputs) : std::map<std::string, Matrix<double>>{};
    for (const ModuleRank& entry : plan)
      plant(entry, rng, options.basis == PlantBasis::Inputs ? &moments.at(entry.path) : nullptr);
    for (const std::string& path : m_model.linear_paths()) m_truth.push_back({path, planted_rank_or_zero(path)});
  }

  /// Per planted change (plan order), the singular values of dW X / sqrt(N) with X the module's inputs
  /// in the teacher on `inputs`, largest first: the rank of the change as the data sees it.
  std::vector<std::vector<double>> effect_spectra(const TokenBatch& inputs) {
    if (inputs.batch < 1) detail::fail("rankwise::PlantedTeacher", "effect_spectra needs a non-empty batch");
    std::vector<std::string> paths;
    for (const PlantedChange& c : m_changes) paths.push_back(c.path);
    const std::map<std::string, Matrix<double>> moments = input_moments(paths, inputs);
    std::vector<std::vector<double>> out;
    for (const PlantedChange& c : m_changes) {
      // dW C dW^T = U S (V^T C V) S U^T: its eigenvalues are the squared singular values of dW X / sqrt(N).
      const Matrix<double> sv = c.singular_values.asDiagonal() * c.V.transpose();
      const Matrix<double> inner = sv * moments.at(c.path) * sv.transpose();
      const Eigen::SelfAdjointEigenSolver<Matrix<double>> eig(inner);
      std::vector<double> values;
      for (Index i = inner.rows() - 1; i >= 0; --i) values.push_back(std::sqrt(std::max(0.0, eig.eigenvalues()(i))));
      out.push_back(std::move(values));
    }
    return out;
  }

  /// The teacher model (frozen, eval mode). Do not inject adapters into it.
  ToyTransformer<Scalar>& model() { return m_model; }
  const PlantOptions& options() const { return m_options; }

  /// The planted changes, in plan order.
  const std::vector<PlantedChange>& changes() const { return m_changes; }

  /// Every linear module in model order with its planted rank (0 when untouched).
  const std::vector<ModuleRank>& truth() const { return m_truth; }

  /// Rescales each planted change so that, alone, it moves the teacher by options.target_kl from the
  /// base on `inputs` (KL(teacher || base) at tau = 1 over the scored positions, nats per token). Per
  /// module, a search on s_1 / rms(W) from the current scale: double or halve until the target is
  /// bracketed, then geometric bisection. Ranks, directions and the spectrum's shape do not change.
  /// Without calibration the effect of equal relative scales differs by orders of magnitude between
  /// modules (an early MLP change dominates), so the truth would be invisible in most of them.
  PlantCalibration calibrate(const TokenBatch& inputs, const PlantCalibrationOptions& options = {}) {
    const PlantCalibrationOptions& o = options;
    if (!(o.target_kl > 0.0) || !std::isfinite(o.target_kl))
      detail::fail("rankwise::PlantedTeacher", "calibrate: target_kl must be finite and > 0 (got ", o.target_kl, ")");
    if (!(o.tolerance > 0.0 && o.tolerance < 1.0))
      detail::fail("rankwise::PlantedTeacher", "calibrate: tolerance must be in (0, 1) (got ", o.tolerance, ")");
    if (!(o.max_scale > 0.0) || !std::isfinite(o.max_scale))
      detail::fail("rankwise::PlantedTeacher", "calibrate: max_scale must be finite and > 0 (got ", o.max_scale, ")");
    if (o.max_evaluations < 2)
      detail::fail("rankwise::PlantedTeacher", "calibrate: max_evaluations must be >= 2 (got ", o.max_evaluations, ")");
    std::vector<double> scales;
    for (const PlantedChange& c : m_changes) scales.push_back(c.scale);
    const std::vector<double> previous = scales;
    PlantCalibration report;
    try {
      for (std::size_t i = 0; i < m_changes.size(); ++i) apply_scale(i, 0.0);  // the base
      m_model.forward(inputs.tokens, inputs.seq_len, m_base_logits);
      const auto kl_now = [&] {
        m_model.forward(inputs.tokens, inputs.seq_len, m_logits);
        const TeacherBatch<Scalar> q = make_teacher_batch<Scalar>(inputs, m_logits, 1.0, o.positions);
        if (q.scored == 0)
          detail::fail("rankwise::PlantedTeacher", "calibrate: the inputs have no scored position");
        return score_distillation<Scalar>(q, m_base_logits).mean_kl();
      };
      for (std::size_t i = 0; i < m_changes.size(); ++i) {
        const auto miss = [&](double kl) { return std::abs(kl - o.target_kl) / o.target_kl; };
        double c = std::min(scales[i], o.max_scale), lo = 0.0, hi = 0.0;  // hi = 0: no upper bracket yet
        apply_scale(i, c);
        double kl = kl_now();
        double best = c, best_kl = kl;
        for (int evaluations = 1; miss(kl) > o.tolerance && evaluations < o.max_evaluations; ++evaluations) {
          if (!std::isfinite(kl)) break;
          if (kl < o.target_kl) {
            if (c >= o.max_scale) break;  // the target is out of reach
            lo = c;
            c = hi > 0.0 ? std::sqrt(lo * hi) : std::min(2.0 * c, o.max_scale);
          } else {
            hi = c;
            c = lo > 0.0 ? std::sqrt(lo * hi) : 0.5 * c;
          }
          apply_scale(i, c);
          kl = kl_now();
          if (std::isfinite(kl) && miss(kl) < miss(best_kl)) {
            best = c;
            best_kl = kl;
          }
        }
        if (!std::isfinite(kl) || !std::isfinite(best_kl)) {
          restore(previous);
          report.status = Status::NonFinite;
          report.message = "a non-finite KL while calibrating '" + m_changes[i].path + "'; the scales are unchanged";
          return report;
        }
        apply_scale(i, 0.0);  // alone: the next module is calibrated against the base
        scales[i] = best;
        report.scale.push_back(best);
        report.kl.push_back(best_kl);
        if (miss(best_kl) > o.tolerance) {
          std::ostringstream os;
          os << (report.message.empty() ? "" : "; ") << "'" << m_changes[i].path << "' reached KL " << best_kl
             << " at scale " << best << " (target " << o.target_kl << ")";
          report.message += os.str();
          report.status = Status::NotApplied;
        }
      }
      restore(scales);
      report.total_kl = kl_now();
    } catch (...) {
      restore(previous);
      throw;
    }
    return report;
  }

  /// The planted rank of one module (0 when untouched); InvalidArgument for a path that is no module.
  Index planted_rank(const std::string& path) const {
    for (const ModuleRank& m : m_truth)
      if (m.path == path) return m.rank;
    detail::fail("rankwise::PlantedTeacher", "no linear module at path '", path, "'; the paths are: ", joined_paths());
  }

 private:
  static const PlantOptions& checked(const PlantOptions& o) {
    if (!(o.scale > 0.0) || !std::isfinite(o.scale))
      detail::fail("rankwise::PlantedTeacher", "scale must be finite and > 0 (got ", o.scale, ")");
    if (!(o.decay > 0.0 && o.decay <= 1.0))
      detail::fail("rankwise::PlantedTeacher", "decay must be in (0, 1] (got ", o.decay, ")");
    if (o.basis != PlantBasis::Weights && o.basis != PlantBasis::Inputs)
      detail::fail("rankwise::PlantedTeacher", "basis must be Weights or Inputs (got enum value ",
                   static_cast<int>(o.basis), ")");
    if (!(o.min_variance > 0.0 && o.min_variance <= 1.0))
      detail::fail("rankwise::PlantedTeacher", "min_variance must be in (0, 1] (got ", o.min_variance, ")");
    return o;
  }

  static ToyTransformer<Scalar> same_shape(const ToyTransformerConfig& config) {
    Random scratch(0);  // every value is overwritten by the base's
    return ToyTransformer<Scalar>(config, scratch);
  }

  std::string joined_paths() const {
    std::string known;
    for (const std::string& p : m_model.linear_paths()) known += (known.empty() ? "" : ", ") + p;
    return known;
  }

  // Everything is checked before the first random draw.
  void validate(ToyTransformer<Scalar>& base, const std::vector<ModuleRank>& plan) {
    base.for_each_slot([](const std::string& path, AnyLinear<Scalar>& slot) {
      if (slot.template get_if<Linear<Scalar>>() == nullptr)
        detail::fail("rankwise::PlantedTeacher", "the base must hold plain linear modules (got a \"", slot.kind(),
                     "\" at '", path, "'); build the teacher before injecting adapters");
    });
    const std::vector<std::string> paths = m_model.linear_paths();
    std::set<std::string> seen;
    for (const ModuleRank& entry : plan) {
      if (std::find(paths.begin(), paths.end(), entry.path) == paths.end())
        detail::fail("rankwise::PlantedTeacher", "no linear module at path '", entry.path, "'; the paths are: ",
                     joined_paths());
      if (!seen.insert(entry.path).second)
        detail::fail("rankwise::PlantedTeacher", "the plan names '", entry.path, "' more than once");
      const AnyLinear<Scalar>& slot = base.linear(entry.path);
      const Index limit = std::min(slot.in_features(), slot.out_features());
      if (entry.rank < 1 || entry.rank > limit)
        detail::fail("rankwise::PlantedTeacher", "rank of '", entry.path, "' must be in [1, min(in, out)] = [1, ",
                     limit, "] (got ", entry.rank, ")");
      const Linear<Scalar>& linear = *base.linear(entry.path).template get_if<Linear<Scalar>>();
      if (linear.weight().template cast<double>().norm() == 0.0)
        detail::fail("rankwise::PlantedTeacher", "the weight of '", entry.path,
                     "' is zero, and the planted scale is relative to its size");
    }
  }

  static Matrix<double> orthonormal_columns(Index rows, Index cols, Random& rng) {
    Matrix<double> gaussian(rows, cols);
    fill_normal(gaussian, 0.0, 1.0, rng);
    const Eigen::HouseholderQR<Matrix<double>> qr(gaussian);
    return qr.householderQ() * Matrix<double>::Identity(rows, cols);
  }

  Matrix<Scalar>& weight_of(const std::string& path) {
    return m_model.linear(path).template get_if<Linear<Scalar>>()->weight_parameter().value;
  }

  /// A linear layer that keeps its last input (a copy): how the teacher reads a module's inputs.
  struct InputRecorder {
    using Scalar = Scalar_;
    Linear<Scalar> linear;
    Matrix<Scalar>* last_input;
    Index in_features() const { return linear.in_features(); }
    Index out_features() const { return linear.out_features(); }
    void forward(const ConstRef<Scalar>& x, Matrix<Scalar>& y) {
      *last_input = x;
      linear.forward(x, y);
    }
    void backward(const ConstRef<Scalar>& dy, Matrix<Scalar>& dx) { linear.backward(dy, dx); }
    std::vector<Parameter<Scalar>*> parameters() { return linear.parameters(); }
    void set_training(bool training) { linear.set_training(training); }
    bool is_training() const { return linear.is_training(); }
    void zero_grad() { linear.zero_grad(); }
  };

  /// C = X X^T / N of each module's inputs X (in x N: every token of `inputs`), in the current model.
  std::map<std::string, Matrix<double>> input_moments(const std::vector<std::string>& paths, const TokenBatch& inputs) {
    detail::check_batch("rankwise::PlantedTeacher", m_model, inputs);
    std::map<std::string, Matrix<Scalar>> recorded;
    std::map<std::string, Linear<Scalar>> saved;
    for (const std::string& path : paths) saved.emplace(path, *m_model.linear(path).template get_if<Linear<Scalar>>());
    const auto restore_all = [&] {
      for (auto& [path, linear] : saved)
        if (m_model.linear(path).template get_if<Linear<Scalar>>() == nullptr)
          m_model.replace_linear(path, AnyLinear<Scalar>(Linear<Scalar>(linear)));
    };
    try {
      for (const std::string& path : paths)
        m_model.replace_linear(path, AnyLinear<Scalar>("input_recorder", InputRecorder{saved.at(path), &recorded[path]}));
      m_model.forward(inputs.tokens, inputs.seq_len, m_logits);
    } catch (...) {
      restore_all();
      throw;
    }
    restore_all();
    std::map<std::string, Matrix<double>> out;
    for (const auto& [path, x] : recorded) {
      const Matrix<double> xd = x.template cast<double>();
      out.emplace(path, (xd * xd.transpose()) / double(std::max<Index>(1, xd.cols())));
    }
    return out;
  }

  /// Basis Inputs: k directions that are orthonormal in the metric C, within the inputs' main span.
  Matrix<double> input_directions(const ModuleRank& entry, const Matrix<double>& c, Random& rng) const {
    const Eigen::SelfAdjointEigenSolver<Matrix<double>> eig(c);  // eigenvalues ascending
    const Index n = c.rows();
    const double top = eig.eigenvalues()(n - 1);
    Index p = 0;
    while (p < n && eig.eigenvalues()(n - 1 - p) >= m_options.min_variance * top) ++p;
    p = std::max(p, entry.rank);
    if (!(top > 0.0) || !(eig.eigenvalues()(n - p) > 1e-12 * top))
      detail::fail("rankwise::PlantedTeacher", "the inputs of '", entry.path, "' vary along fewer than ", entry.rank,
                   " directions on the given batch, so a change of rank ", entry.rank,
                   " cannot act on them with that rank; use a larger batch or PlantBasis::Weights");
    const Matrix<double> e = eig.eigenvectors().rightCols(p);
    const Vector<double> lambda = eig.eigenvalues().tail(p);
    const Matrix<double> q = orthonormal_columns(p, entry.rank, rng);
    // V = E L^(-1/2) Q, scaled by sqrt(mean L) so that its size is that of an orthonormal V.
    Matrix<double> v = e * lambda.cwiseSqrt().cwiseInverse().asDiagonal() * q;
    v *= std::sqrt(lambda.mean());
    return v;
  }

  void plant(const ModuleRank& entry, Random& rng, const Matrix<double>* input_moment) {
    const Matrix<Scalar>& W = weight_of(entry.path);
    PlantedChange change;
    change.path = entry.path;
    change.rank = entry.rank;
    change.weight_rms = W.template cast<double>().norm() / std::sqrt(double(std::min(W.rows(), W.cols())));
    change.U = orthonormal_columns(W.rows(), entry.rank, rng);
    change.V = input_moment ? input_directions(entry, *input_moment, rng) : orthonormal_columns(W.cols(), entry.rank, rng);
    m_base_weights.push_back(W);
    m_changes.push_back(std::move(change));
    apply_scale(m_changes.size() - 1, m_options.scale);
  }

  // W = W_base + dW(scale): set from the kept base weight, so that no rounding accumulates.
  void apply_scale(std::size_t i, double scale) {
    PlantedChange& change = m_changes[i];
    change.scale = scale;
    change.singular_values.resize(change.rank);
    for (Index j = 0; j < change.rank; ++j)
      change.singular_values(j) = scale * change.weight_rms * std::pow(m_options.decay, double(j));
    Matrix<Scalar>& W = weight_of(change.path);
    W = m_base_weights[i];
    if (scale > 0.0) W += change.delta().template cast<Scalar>();
  }

  void restore(const std::vector<double>& scales) {
    for (std::size_t i = 0; i < m_changes.size(); ++i) apply_scale(i, scales[i]);
  }

  Index planted_rank_or_zero(const std::string& path) const {
    for (const PlantedChange& c : m_changes)
      if (c.path == path) return c.rank;
    return 0;
  }

  PlantOptions m_options;
  ToyTransformer<Scalar> m_model;
  std::vector<PlantedChange> m_changes;
  std::vector<Matrix<Scalar>> m_base_weights;  // of the planted modules, in plan order
  std::vector<ModuleRank> m_truth;
  Matrix<Scalar> m_logits, m_base_logits;
};

// --- the task ------------------------------------------------------------------------------------

/// The student's loss: mean KL(q || p) in nats per scored token at the batch's temperature, and its
/// gradient (p - q) / (tau N). Reuses its buffers across steps.
template <FloatScalar Scalar_>
class DistillationLoss {
 public:
  using Scalar = Scalar_;
  using MatrixType = Matrix<Scalar>;

  double forward(const ConstRef<Scalar>& student_logits, const TeacherBatch<Scalar>& target) {
    detail::check_teacher_batch("rankwise::DistillationLoss", target, student_logits);
    m_inv_temperature = 1.0 / target.temperature;
    double cross = 0.0;
    if (target.temperature == 1.0) {
      cross = m_ce.forward_soft(student_logits, target.probs, target.mask);
    } else {
      m_scaled = student_logits * Scalar(m_inv_temperature);
      cross = m_ce.forward_soft(m_scaled, target.probs, target.mask);
    }
    double entropy = 0.0;
    for (double h : target.entropy) entropy += h;
    return m_ce.scored() ? cross - entropy / double(m_ce.scored()) : 0.0;
  }

  /// dL/dlogits of the last forward (assigned).
  void backward(MatrixType& dlogits) const {
    if (m_ce.probabilities().size() == 0)
      detail::fail<StateError>("rankwise::DistillationLoss", "backward() needs a forward() first");
    m_ce.backward(dlogits);
    if (m_inv_temperature != 1.0) dlogits *= Scalar(m_inv_temperature);
  }

  Index scored() const { return m_ce.scored(); }

 private:
  CrossEntropy<Scalar> m_ce;
  MatrixType m_scaled;
  double m_inv_temperature = 1.0;
};

/// Inputs from a TaskGenerator (by default the pre-training mixture, so they are in distribution) with
/// the teacher's distributions. Holds a reference to the teacher, which must outlive the task.
template <FloatScalar Scalar_>
class TeacherTask {
 public:
  using Scalar = Scalar_;

  TeacherTask(ToyTransformer<Scalar>& teacher, TaskGenerator inputs, const TeacherTaskOptions& options = {})
      : m_teacher(teacher), m_inputs(std::move(inputs)), m_options(options) {
    if (!(options.temperature > 0.0) || !std::isfinite(options.temperature))
      detail::fail("rankwise::TeacherTask", "temperature must be finite and > 0 (got ", options.temperature, ")");
    const TaskOptions& o = m_inputs.options();
    if (o.vocab != teacher.config().vocab)
      detail::fail("rankwise::TeacherTask", "the input generator's vocab must be the teacher's = ",
                   teacher.config().vocab, " (got ", o.vocab, ")");
    if (o.seq_len > teacher.config().max_seq_len)
      detail::fail("rankwise::TeacherTask", "the input generator's seq_len must be <= the teacher's max_seq_len = ",
                   teacher.config().max_seq_len, " (got ", o.seq_len, ")");
  }

  const TaskGenerator& inputs() const { return m_inputs; }
  const TeacherTaskOptions& options() const { return m_options; }

  /// `batch` fresh sequences from rng with the teacher's distributions at the task's temperature.
  TeacherBatch<Scalar> sample(Index batch, Random& rng) { return label(m_inputs.sample(batch, rng), m_options.temperature); }

  /// A held-out set of `sequences` sequences in batches of at most `batch`, labelled once at tau = 1.
  std::vector<TeacherBatch<Scalar>> held_out(Index sequences, Index batch, Random& rng) {
    if (sequences < 1 || batch < 1)
      detail::fail("rankwise::TeacherTask", "held_out needs sequences >= 1 and batch >= 1 (got ", sequences, ", ",
                   batch, ")");
    std::vector<TeacherBatch<Scalar>> out;
    for (Index done = 0; done < sequences; done += batch)
      out.push_back(label(m_inputs.sample(std::min(batch, sequences - done), rng), 1.0));
    return out;
  }

 private:
  TeacherBatch<Scalar> label(TokenBatch inputs, double temperature) {
    if (m_teacher.is_training()) m_teacher.set_training(false);
    m_teacher.forward(inputs.tokens, inputs.seq_len, m_logits);
    return make_teacher_batch<Scalar>(std::move(inputs), m_logits, temperature, m_options.positions);
  }

  ToyTransformer<Scalar>& m_teacher;
  TaskGenerator m_inputs;
  TeacherTaskOptions m_options;
  Matrix<Scalar> m_logits;
};

/// The student's score on held-out teacher batches, in eval mode (its training mode is restored).
template <FloatScalar Scalar>
DistillationScore evaluate_distillation(ToyTransformer<Scalar>& student, const std::vector<TeacherBatch<Scalar>>& held_out) {
  if (held_out.empty()) detail::fail("rankwise::evaluate_distillation", "held_out must hold at least one batch");
  const bool training = student.is_training();
  student.set_training(false);
  DistillationScore total;
  Matrix<Scalar> logits;
  try {
    for (const TeacherBatch<Scalar>& b : held_out) {
      student.forward(b.inputs.tokens, b.inputs.seq_len, logits);
      total += score_distillation<Scalar>(b, logits);
    }
  } catch (...) {
    student.set_training(training);
    throw;
  }
  student.set_training(training);
  return total;
}

// --- allocation against the truth ----------------------------------------------------------------

/// An allocation set against the truth, module by module.
struct AllocationComparison {
  struct Row {
    std::string path;
    Index planted = 0;
    Index allocated = 0;
    bool adapted = false;  ///< the allocation names the module
  };
  std::vector<Row> rows;          ///< modules planted or adapted, in model order
  Index planted_total = 0;        ///< sum of planted ranks
  Index allocated_total = 0;      ///< sum of allocated ranks
  Index allocated_on_planted = 0; ///< allocated ranks in planted modules
  Index covered = 0;              ///< sum over modules of min(allocated, planted)
  std::optional<double> spearman; ///< over the rows; unset with < 2 rows or a constant column

  /// Share of the allocated ranks that sit in planted modules (0 when nothing is allocated).
  double share_on_planted() const {
    return allocated_total ? double(allocated_on_planted) / double(allocated_total) : 0.0;
  }
  /// Share of the planted rank the allocation can represent (1 when nothing is planted).
  double coverage() const { return planted_total ? double(covered) / double(planted_total) : 1.0; }

  /// A compact table for reports (the library prints nothing).
  std::string format_table() const {
    std::size_t width = 6;
    for (const Row& r : rows) width = std::max(width, r.path.size());
    std::ostringstream os;
    os << std::left << std::setw(int(width)) << "module" << std::right << std::setw(9) << "planted" << std::setw(11)
       << "allocated" << '\n';
    for (const Row& r : rows) {
      os << std::left << std::setw(int(width)) << r.path << std::right << std::setw(9) << r.planted << std::setw(11);
      if (r.adapted)
        os << r.allocated;
      else
        os << "-";
      os << '\n';
    }
    os << std::left << std::setw(int(width)) << "total" << std::right << std::setw(9) << planted_total << std::setw(11)
       << allocated_total << '\n';
    os << std::fixed << std::setprecision(3) << "share on planted " << share_on_planted() << ", coverage "
       << coverage() << ", spearman ";
    if (spearman)
      os << *spearman;
    else
      os << "n/a";
    return os.str();
  }
};


/// Sets `allocation` (module path -> rank, e.g. RankAllocator::rank_pattern(), or every adapted
/// module's rank for a uniform run) against `truth` (every module in model order with its planted rank,
/// as PlantedTeacher::truth()). The rows are the modules that are planted or adapted; a planted module
/// that is not adapted counts as allocated 0.
inline AllocationComparison compare_allocation(const std::vector<ModuleRank>& truth,
                                               const std::map<std::string, Index>& allocation) {
  std::set<std::string> known;
  for (const ModuleRank& m : truth) {
    if (m.rank < 0)
      detail::fail("rankwise::compare_allocation", "planted rank of '", m.path, "' must be >= 0 (got ", m.rank, ")");
    if (!known.insert(m.path).second)
      detail::fail("rankwise::compare_allocation", "the truth names '", m.path, "' more than once");
  }
  for (const auto& [path, rank] : allocation) {
    if (!known.count(path)) {
      std::string list;
      for (const ModuleRank& m : truth) list += (list.empty() ? "" : ", ") + m.path;
      detail::fail("rankwise::compare_allocation", "allocation names '", path, "', which is no module; the paths are: ",
                   list);
    }
    if (rank < 0)
      detail::fail("rankwise::compare_allocation", "allocated rank of '", path, "' must be >= 0 (got ", rank, ")");
  }
  AllocationComparison out;
  std::vector<double> planted, allocated;
  for (const ModuleRank& m : truth) {
    const auto it = allocation.find(m.path);
    const bool adapted = it != allocation.end();
    out.planted_total += m.rank;
    if (!adapted && m.rank == 0) continue;
    AllocationComparison::Row row{m.path, m.rank, adapted ? it->second : 0, adapted};
    out.allocated_total += row.allocated;
    if (row.planted > 0) out.allocated_on_planted += row.allocated;
    out.covered += std::min(row.allocated, row.planted);
    planted.push_back(double(row.planted));
    allocated.push_back(double(row.allocated));
    out.rows.push_back(std::move(row));
  }
  out.spearman = detail::spearman(planted, allocated);
  return out;
}

// --- the teacher as a Finetuner loss ------------------------------------------------------------

/// The distillation loss as a Finetuner's TrainingLoss: each call runs the teacher (eval mode) on the
/// batch's tokens and returns KL(q || p) in nats per scored token with its gradient, so that
/// `Finetuner(student, recipe, validation, std::make_shared<TeacherLoss<float>>(teacher.model()))`
/// fine-tunes toward the teacher; the allocator's validation loss is then the same KL. A step costs
/// one teacher forward more than with token cross-entropy. The batch's own hard targets are unused
/// (DistillPositions picks the scored columns). The teacher must not change while the loss is used
/// (value() keeps the distributions of the batches it has seen).
template <FloatScalar Scalar>
class TeacherLoss final : public TrainingLoss<Scalar> {
 public:
  explicit TeacherLoss(ToyTransformer<Scalar>& teacher, const TeacherTaskOptions& options = {})
      : m_teacher(teacher), m_options(options) {
    if (!(options.temperature > 0.0) || !std::isfinite(options.temperature))
      detail::fail("rankwise::TeacherLoss", "temperature must be finite and > 0 (got ", options.temperature, ")");
  }
  const char* name() const override { return "distillation"; }

  double forward_backward(const Matrix<Scalar>& logits, const TokenBatch& batch, Matrix<Scalar>& dlogits) override {
    teach(batch, m_target);
    const double loss = m_loss.forward(logits, m_target);
    m_loss.backward(dlogits);
    return loss;
  }

  /// The loss alone. The teacher's distributions of the batches seen here are kept (up to
  /// max_cached_batches, by their tokens), since value() is called on the same fixed validation
  /// batches again and again: an allocator's scoring round then runs the teacher once, not per call.
  double value(const Matrix<Scalar>& logits, const TokenBatch& batch) override {
    for (const Cached& c : m_cache)
      if (c.target.inputs.seq_len == batch.seq_len && c.target.inputs.tokens == batch.tokens)
        return m_loss.forward(logits, c.target);
    Cached& c = m_cache.size() < max_cached_batches ? m_cache.emplace_back() : m_cache[m_next_slot++ % max_cached_batches];
    teach(batch, c.target);
    return m_loss.forward(logits, c.target);
  }

  static constexpr std::size_t max_cached_batches = 16;

 private:
  struct Cached {
    TeacherBatch<Scalar> target;
  };

  void teach(const TokenBatch& batch, TeacherBatch<Scalar>& target) {
    if (m_teacher.is_training()) m_teacher.set_training(false);
    m_teacher.forward(batch.tokens, batch.seq_len, m_teacher_logits);
    target = make_teacher_batch<Scalar>(batch, m_teacher_logits, m_options.temperature, m_options.positions);
  }

  ToyTransformer<Scalar>& m_teacher;
  TeacherTaskOptions m_options;
  Matrix<Scalar> m_teacher_logits;
  TeacherBatch<Scalar> m_target;
  std::vector<Cached> m_cache;
  std::size_t m_next_slot = 0;
  DistillationLoss<Scalar> m_loss;
};

}  // namespace rankwise
