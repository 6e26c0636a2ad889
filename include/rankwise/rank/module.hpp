#pragma once
/// \file rankwise/rank/module.hpp
/// RankModule: a small type-erased handle on one rank-adjustable adapter (held by reference) and its
/// module path, through which importance estimators and the RankAllocator see every module alike.
///
///   wraps   any adapter that models rankwise::RankAdjustable (LoRA today); others do not compile
///   exposes rank(), gates, remove_ranks()/add_ranks() (forwarded, returning the RankChange),
///           in/out features, max_rank() = min(in, out), cost_per_rank() = in + out, and the
///           rank-sliced parameters (A's rows, B's columns) for gradient- and magnitude-based scores
/// The handle never owns the adapter: the adapter must outlive every handle on it and stay at the
/// same address. Copies of a handle refer to the same adapter. Docs: docs/rank/estimators.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>

#include <algorithm>
#include <concepts>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

/// One parameter that rank surgery slices: rank i is row i (Axis::Rows) or column i (Axis::Cols).
template <FloatScalar Scalar>
struct RankSlice {
  Parameter<Scalar>* parameter = nullptr;
  Axis axis = Axis::Rows;
};

template <FloatScalar Scalar_>
class RankModule {
 public:
  using Scalar = Scalar_;

  /// A handle on `adapter`, known as `path` in its model (e.g. "layers.0.attn.q_proj").
  template <typename AdapterType>
    requires RankAdjustable<AdapterType> && std::same_as<typename AdapterType::Scalar, Scalar>
  RankModule(AdapterType& adapter, std::string path)
      : m_self(std::make_shared<Model<AdapterType>>(adapter)), m_path(std::move(path)) {
    if (m_path.empty())
      detail::fail("rankwise::RankModule", "path must name the module in its model (got an empty path)");
  }

  const std::string& path() const { return m_path; }
  Index in_features() const { return m_self->in_features(); }
  Index out_features() const { return m_self->out_features(); }
  Index rank() const { return m_self->rank(); }
  /// The largest rank the adapter accepts: its own max_rank() if it has one, else min(in, out).
  Index max_rank() const { return m_self->max_rank(); }
  /// Trainable parameters one rank costs: in + out (a row of A and a column of B).
  Index cost_per_rank() const { return in_features() + out_features(); }
  /// The adapter's scale s (1 when it has none), so magnitude scores compare modules fairly.
  double scale() const { return m_self->scale(); }

  double gate(Index i) const { return m_self->gate(i); }
  void set_gate(Index i, double value) { m_self->set_gate(i, value); }
  void reset_gates() { m_self->reset_gates(); }

  RankChange remove_ranks(std::span<const Index> indices) { return m_self->remove_ranks(indices); }
  RankChange add_ranks(Index k, Random& rng) { return m_self->add_ranks(k, rng); }

  void set_training(bool training) { m_self->set_training(training); }
  bool is_training() const { return m_self->is_training(); }
  /// True while the adapter is folded into its base (gates and surgery would then be meaningless).
  bool is_merged() const { return m_self->is_merged(); }

  std::vector<Parameter<Scalar>*> parameters() { return m_self->parameters(); }
  /// The parameters that rank surgery slices; empty when the adapter does not expose them
  /// (A_parameter() and B_parameter(), as LoRA does).
  std::vector<RankSlice<Scalar>> rank_slices() { return m_self->rank_slices(); }

  /// True when both handles refer to the same adapter object.
  /// The gradient probe of the frozen weight (LoRA::arm_gradient_probe), for gain estimates; adapters
  /// without one report false and the calls below throw StateError.
  bool supports_gradient_probe() const { return m_self->supports_gradient_probe(); }
  void arm_gradient_probe(Matrix<Scalar> right, Matrix<Scalar> left) {
    m_self->arm_gradient_probe(std::move(right), std::move(left));
  }
  void disarm_gradient_probe() { m_self->disarm_gradient_probe(); }
  const Matrix<Scalar>& probe_right() const { return m_self->probe_right(); }
  const Matrix<Scalar>& probe_left() const { return m_self->probe_left(); }
  long probe_batches() const { return m_self->probe_batches(); }
  /// New ranks whose rows of A are given (k x in), B's columns zero: the function is unchanged.
  RankChange add_ranks_with_rows(const Matrix<Scalar>& rows) { return m_self->add_ranks_with_rows(rows); }

  bool same_adapter(const RankModule& other) const { return m_self->address() == other.m_self->address(); }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual Index in_features() const = 0;
    virtual Index out_features() const = 0;
    virtual Index rank() const = 0;
    virtual Index max_rank() const = 0;
    virtual double scale() const = 0;
    virtual double gate(Index i) const = 0;
    virtual void set_gate(Index i, double value) = 0;
    virtual void reset_gates() = 0;
    virtual RankChange remove_ranks(std::span<const Index> indices) = 0;
    virtual RankChange add_ranks(Index k, Random& rng) = 0;
    virtual void set_training(bool training) = 0;
    virtual bool is_training() const = 0;
    virtual bool is_merged() const = 0;
    virtual std::vector<Parameter<Scalar>*> parameters() = 0;
    virtual std::vector<RankSlice<Scalar>> rank_slices() = 0;
    virtual const void* address() const = 0;
    virtual bool supports_gradient_probe() const = 0;
    virtual void arm_gradient_probe(Matrix<Scalar> right, Matrix<Scalar> left) = 0;
    virtual void disarm_gradient_probe() = 0;
    virtual const Matrix<Scalar>& probe_right() const = 0;
    virtual const Matrix<Scalar>& probe_left() const = 0;
    virtual long probe_batches() const = 0;
    virtual RankChange add_ranks_with_rows(const Matrix<Scalar>& rows) = 0;
  };

  template <typename AdapterType>
  struct Model final : Concept {
    explicit Model(AdapterType& a) : adapter(&a) {}
    Index in_features() const override { return adapter->in_features(); }
    Index out_features() const override { return adapter->out_features(); }
    Index rank() const override { return adapter->rank(); }
    Index max_rank() const override {
      if constexpr (requires { { adapter->max_rank() } -> std::convertible_to<Index>; })
        return adapter->max_rank();
      else
        return std::min(adapter->in_features(), adapter->out_features());
    }
    double scale() const override {
      if constexpr (requires { { adapter->scale() } -> std::convertible_to<double>; })
        return double(adapter->scale());
      else
        return 1.0;
    }
    double gate(Index i) const override { return double(adapter->gate(i)); }
    void set_gate(Index i, double value) override { adapter->set_gate(i, value); }
    void reset_gates() override { adapter->reset_gates(); }
    RankChange remove_ranks(std::span<const Index> indices) override { return adapter->remove_ranks(indices); }
    RankChange add_ranks(Index k, Random& rng) override { return adapter->add_ranks(k, rng); }
    void set_training(bool training) override { adapter->set_training(training); }
    bool is_training() const override { return adapter->is_training(); }
    bool is_merged() const override {
      if constexpr (Mergeable<AdapterType>)
        return adapter->is_merged();
      else
        return false;
    }
    std::vector<Parameter<Scalar>*> parameters() override { return adapter->parameters(); }
    std::vector<RankSlice<Scalar>> rank_slices() override {
      if constexpr (requires {
                      { adapter->A_parameter() } -> std::same_as<Parameter<Scalar>&>;
                      { adapter->B_parameter() } -> std::same_as<Parameter<Scalar>&>;
                    })
        return {RankSlice<Scalar>{&adapter->A_parameter(), Axis::Rows},
                RankSlice<Scalar>{&adapter->B_parameter(), Axis::Cols}};
      else
        return {};
    }
    const void* address() const override { return adapter; }

    static constexpr bool has_probe = requires(AdapterType& a, Matrix<Scalar> m) {
      a.arm_gradient_probe(m, m);
      a.disarm_gradient_probe();
      { a.probe_right() } -> std::convertible_to<const Matrix<Scalar>&>;
      { a.probe_left() } -> std::convertible_to<const Matrix<Scalar>&>;
      { a.probe_batches() } -> std::convertible_to<long>;
      { a.add_ranks_with_rows(m) } -> std::same_as<RankChange>;
    };
    [[noreturn]] static void no_probe() {
      detail::fail<StateError>("rankwise::RankModule", "this adapter has no gradient probe (LoRA has one)");
    }
    bool supports_gradient_probe() const override { return has_probe; }
    void arm_gradient_probe(Matrix<Scalar> right, Matrix<Scalar> left) override {
      if constexpr (has_probe) adapter->arm_gradient_probe(std::move(right), std::move(left));
      else no_probe();
    }
    void disarm_gradient_probe() override {
      if constexpr (has_probe) adapter->disarm_gradient_probe();
    }
    const Matrix<Scalar>& probe_right() const override {
      if constexpr (has_probe) return adapter->probe_right();
      else no_probe();
    }
    const Matrix<Scalar>& probe_left() const override {
      if constexpr (has_probe) return adapter->probe_left();
      else no_probe();
    }
    long probe_batches() const override {
      if constexpr (has_probe) return adapter->probe_batches();
      else return 0;
    }
    RankChange add_ranks_with_rows(const Matrix<Scalar>& rows) override {
      if constexpr (has_probe) return adapter->add_ranks_with_rows(rows);
      else no_probe();
    }

    AdapterType* adapter;
  };

  std::shared_ptr<Concept> m_self;
  std::string m_path;
};

}  // namespace rankwise
