#pragma once
/// \file rankwise/core/memory.hpp
/// MemoryReport: how many scalars (and bytes) a model's parameters hold, split into trainable, frozen
/// and shared. A shared tensor (VeRA's projection bank, held once by every VeRA layer of a model) is
/// counted once however many layers report it: it is recognised by its address.
///   add_layer(layer)  the layer's parameters(), plus its shared_parameters() when it has any
/// Docs: docs/concepts/adapter.md

#include <rankwise/core/parameter.hpp>
#include <rankwise/core/types.hpp>

#include <cstddef>
#include <unordered_set>
#include <vector>

namespace rankwise {

class MemoryReport {
 public:
  /// A tensor owned by one layer.
  template <FloatScalar Scalar>
  void add(const Parameter<Scalar>& p) {
    const Index n = p.value.size();
    (p.trainable ? m_trainable : m_frozen) += n;
    m_bytes += n * Index(sizeof(Scalar));
  }

  /// A tensor that several layers share: counted the first time only.
  template <FloatScalar Scalar>
  void add_shared(const Parameter<Scalar>& p) {
    if (!m_seen.insert(static_cast<const void*>(&p)).second) return;
    m_shared += p.value.size();
    m_bytes += p.value.size() * Index(sizeof(Scalar));
    ++m_shared_tensors;
  }

  /// Every parameter of `layer`, and its shared tensors if it reports any (shared_parameters()).
  template <typename L>
  void add_layer(L& layer) {
    for (const auto* p : layer.parameters()) add(*p);
    if constexpr (requires { layer.shared_parameters(); })
      for (const auto* p : layer.shared_parameters()) add_shared(*p);
  }

  Index trainable() const { return m_trainable; }  ///< trainable scalars
  Index frozen() const { return m_frozen; }        ///< frozen scalars owned by one layer
  Index shared() const { return m_shared; }        ///< scalars of shared tensors, each counted once
  Index shared_tensors() const { return m_shared_tensors; }
  Index total() const { return m_trainable + m_frozen + m_shared; }
  Index bytes() const { return m_bytes; }

 private:
  Index m_trainable = 0;
  Index m_frozen = 0;
  Index m_shared = 0;
  Index m_shared_tensors = 0;
  Index m_bytes = 0;
  std::unordered_set<const void*> m_seen;
};

}  // namespace rankwise
