#pragma once
/// \file rankwise/core/types.hpp
/// The Eigen types rankwise speaks in, and the scalar types it accepts.
///
/// Layout: one column per token. Activations are `features x tokens`, column-major, which are the
/// same bytes as PyTorch's row-major `tokens x features`. Weights keep PyTorch/PEFT shapes
/// (W: out x in, A: r x in, B: out x r), so y = W x. Docs: docs/conventions.md

#include <rankwise/core/config.hpp>

#include <Eigen/Core>

#include <concepts>

namespace rankwise {

/// The scalars rankwise computes in: float for work, double for gradient checks.
template <typename T>
concept FloatScalar = std::same_as<T, float> || std::same_as<T, double>;

template <FloatScalar Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

template <FloatScalar Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// Read-only view accepted by every input: a Matrix, a block of one, or a Map, without a copy.
template <FloatScalar Scalar>
using ConstRef = Eigen::Ref<const Matrix<Scalar>>;

}  // namespace rankwise
