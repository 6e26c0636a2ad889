#pragma once
/// \file rankwise/core/layer.hpp
/// The Layer and Adapter contracts as C++20 concepts: the compile-time shadow of
/// docs/concepts/layer.md and docs/concepts/adapter.md.
///
/// Layer:       Scalar; in_features(), out_features(); forward(x, y) (x: in x n, y: out x n, caches
///              what backward needs while training); backward(dy, dx) (accumulates parameter
///              gradients with +=, assigns dx); parameters(); set_training(bool), is_training();
///              zero_grad().
/// Adapter:     a Layer that owns a frozen base layer (base()) and counts its own trainable
///              parameters (trainable_parameter_count()).
/// Mergeable:   delta_weight(), merge(), unmerge(), is_merged().
/// RankAdjustable: rank(), gates, remove_ranks(), add_ranks() (see adapters/lora.hpp).

#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>

#include <concepts>
#include <span>
#include <vector>

namespace rankwise {

template <typename L>
concept Layer = requires(L& layer, const L& clayer, const ConstRef<typename L::Scalar>& in,
                         Matrix<typename L::Scalar>& out) {
  requires FloatScalar<typename L::Scalar>;
  { clayer.in_features() } -> std::convertible_to<Index>;
  { clayer.out_features() } -> std::convertible_to<Index>;
  layer.forward(in, out);
  layer.backward(in, out);
  { layer.parameters() } -> std::same_as<std::vector<Parameter<typename L::Scalar>*>>;
  layer.set_training(true);
  { clayer.is_training() } -> std::convertible_to<bool>;
  layer.zero_grad();
};

template <typename A>
concept Adapter = Layer<A> && requires(A& adapter, const A& cadapter) {
  cadapter.base();
  { cadapter.trainable_parameter_count() } -> std::convertible_to<Index>;
};

template <typename A>
concept Mergeable = requires(A& adapter, const A& cadapter) {
  { cadapter.delta_weight() } -> std::convertible_to<Matrix<typename A::Scalar>>;
  adapter.merge();
  adapter.unmerge();
  { cadapter.is_merged() } -> std::convertible_to<bool>;
};

template <typename A>
concept RankAdjustable = Adapter<A> && requires(A& adapter, const A& cadapter, Index i, Random& rng,
                                                std::span<const Index> indices) {
  { cadapter.rank() } -> std::convertible_to<Index>;
  { cadapter.gate(i) } -> std::convertible_to<double>;
  adapter.set_gate(i, 0.0);
  adapter.reset_gates();
  { adapter.remove_ranks(indices) } -> std::same_as<RankChange>;
  { adapter.add_ranks(i, rng) } -> std::same_as<RankChange>;
};

/// Sets every gradient of `params` to zero.
template <FloatScalar Scalar>
void zero_grad(const std::vector<Parameter<Scalar>*>& params) {
  for (Parameter<Scalar>* p : params) p->zero_grad();
}

/// Number of scalars in the trainable parameters of `params`.
template <FloatScalar Scalar>
Index count_trainable(const std::vector<Parameter<Scalar>*>& params) {
  Index n = 0;
  for (const Parameter<Scalar>* p : params)
    if (p->trainable) n += p->size();
  return n;
}

}  // namespace rankwise
