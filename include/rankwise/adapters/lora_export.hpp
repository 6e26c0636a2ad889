#pragma once
/// \file rankwise/adapters/lora_export.hpp
/// LoRAFactors: an adapter's weight update written exactly as a plain LoRA, Delta W = scale * B A,
/// which is what PEFT's LoRA files hold (lora_A, lora_B and lora_alpha = scale * rank).
///
///   shapes  A: r x in, B: out x r; scale: the LoRA scaling the factors are to be used with
/// Every adapter whose update is exactly low-rank exports itself this way: LoRA (here, gates folded
/// into A), DyLoRA at a chosen rank, VeRA (rank r, scale 1) and MELoRA (rank n * r_mini,
/// block-structured factors). RED's update is not low-rank and has none.
/// Docs: docs/adapters/index.md

#include <rankwise/adapters/lora.hpp>
#include <rankwise/core/types.hpp>

namespace rankwise {

template <FloatScalar Scalar>
struct LoRAFactors {
  Matrix<Scalar> A;    ///< r x in ("lora_A")
  Matrix<Scalar> B;    ///< out x r ("lora_B")
  double scale = 1.0;  ///< Delta W = scale * B A

  Index rank() const { return A.rows(); }
  /// PEFT's lora_alpha for these factors with the classic scaling alpha / r.
  double alpha() const { return scale * double(rank()); }
  /// scale * B A (out x in): forms the dense matrix, for checks and merges only.
  Matrix<Scalar> delta_weight() const {
    if (rank() == 0) return Matrix<Scalar>::Zero(B.rows(), A.cols());
    return Scalar(scale) * (B * A);
  }
};

/// LoRA's own factors, with the gates folded into A so that the export is exact.
template <FloatScalar Scalar, typename Base>
LoRAFactors<Scalar> lora_factors(const LoRA<Scalar, Base>& lora) {
  LoRAFactors<Scalar> factors;
  factors.A = lora.gates().asDiagonal() * lora.A();
  factors.B = lora.B();
  factors.scale = lora.scale();
  return factors;
}

/// For adapters that export themselves: calls their lora_factors() member.
template <typename AdapterType>
  requires requires(const AdapterType& a) { a.lora_factors(); }
auto lora_factors(const AdapterType& adapter) {
  return adapter.lora_factors();
}

}  // namespace rankwise
