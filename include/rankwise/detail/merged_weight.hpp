#pragma once
/// \file rankwise/detail/merged_weight.hpp
/// MergedWeight: the merge every adapter with a dense update shares (LoRA, DyLoRA, VeRA, MELoRA):
///   merge():   W <- W + delta, keeping the original W
///   unmerge(): W <- the kept original, so the base is restored bit for bit (subtracting delta again
///              would not be exact in floating point)
/// Strong guarantee: the new weight is built before anything changes. Internal: users never include it.

#include <rankwise/core/error.hpp>
#include <rankwise/core/types.hpp>

namespace rankwise::detail {

template <FloatScalar Scalar>
class MergedWeight {
 public:
  bool is_merged() const { return m_merged; }

  /// base.weight() += delta(), keeping the original; `where` names the adapter in errors.
  template <typename Base, typename Delta>
  void merge(Base& base, Delta&& delta, const char* where) {
    if (m_merged) fail<StateError>(where, "merge(): the adapter is already merged");
    Matrix<Scalar> merged = base.weight() + delta();
    Matrix<Scalar> original = base.weight();
    base.assign_weight(merged);
    m_original.swap(original);
    m_merged = true;
  }

  /// Puts the original weight back.
  template <typename Base>
  void unmerge(Base& base, const char* where) {
    if (!m_merged) fail<StateError>(where, "unmerge(): the adapter is not merged");
    base.assign_weight(m_original);
    m_original.resize(0, 0);
    m_merged = false;
  }

 private:
  Matrix<Scalar> m_original;  // base weight before merge()
  bool m_merged = false;
};

}  // namespace rankwise::detail
