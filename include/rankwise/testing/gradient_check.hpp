#pragma once
/// \file rankwise/testing/gradient_check.hpp
/// A finite-difference gradient checker usable on any Layer (rankwise's own or yours).
///
/// With a fixed random g (out x n), the scalar loss L(x, theta) = <forward(x), g> has dL/dy = g, so one
/// backward(g) yields every analytic gradient. Each is compared with central differences
///   (L(v + h) - L(v - h)) / 2h
/// over every entry of x and of every trainable parameter. The error of one entry is
/// |analytic - numeric| / max(1, |numeric|). Use double: in float the differences are noise.
/// Layers that draw random numbers in forward() (dropout) must replay the same draws on every call:
/// pass `before_forward` to rewind their generator. Slices outside a parameter's update window are
/// detached by definition (DyLoRA's frozen components): their analytic gradient must be exactly zero,
/// and that is what is checked for them. Docs: docs/testing/gradient-check.md

#include <rankwise/core/init.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

namespace rankwise::testing {

struct GradientCheckOptions {
  double step = 1e-6;                   ///< h of the central differences
  bool check_input = true;              ///< also compare dx with the numeric input gradient
  std::function<void()> before_forward; ///< called before every forward(), e.g. to rewind a dropout stream
};

struct GradientCheckResult {
  struct Entry {
    std::string name;  ///< "input" or the parameter's name
    double max_error = 0.0;
  };
  std::vector<Entry> entries;   ///< one per checked tensor
  double max_error = 0.0;       ///< worst over all entries
  std::string worst;            ///< "name(i, j): analytic a, numeric n"
  Index checked_values = 0;     ///< how many scalars were perturbed
};

namespace detail {
template <typename Scalar>
double inner(const Matrix<Scalar>& a, const Matrix<Scalar>& b) {
  double sum = 0.0;
  for (Index i = 0; i < a.size(); ++i) sum += double(a.data()[i]) * double(b.data()[i]);
  return sum;
}
}  // namespace detail

/// Compares every analytic gradient of `layer` at input x with central differences.
template <Layer L>
GradientCheckResult check_gradients(L& layer, const Matrix<typename L::Scalar>& x, Random& rng,
                                    const GradientCheckOptions& options = {}) {
  using Scalar = typename L::Scalar;
  using MatrixType = Matrix<Scalar>;
  const auto forward = [&](const MatrixType& input, MatrixType& out) {
    if (options.before_forward) options.before_forward();
    layer.forward(input, out);
  };

  layer.set_training(true);
  MatrixType y, dx;
  forward(x, y);
  MatrixType g(y.rows(), y.cols());
  fill_with(g, [&] { return rng.normal(); });
  layer.zero_grad();
  layer.backward(g, dx);

  GradientCheckResult result;
  const double h = options.step;
  MatrixType probe = x;
  MatrixType y_plus, y_minus;
  const auto loss_at = [&](Scalar& slot, Scalar value, const MatrixType& input, MatrixType& out) {
    slot = value;
    forward(input, out);
    return detail::inner(out, g);
  };
  const auto record = [&](GradientCheckResult::Entry& entry, const std::string& name, Index i, Index j,
                          double analytic, double numeric) {
    const double err = std::abs(analytic - numeric) / std::max(1.0, std::abs(numeric));
    ++result.checked_values;
    entry.max_error = std::max(entry.max_error, err);
    if (err > result.max_error || result.worst.empty()) {
      result.max_error = std::max(result.max_error, err);
      result.worst = name + "(" + std::to_string(i) + ", " + std::to_string(j) + "): analytic " +
                     std::to_string(analytic) + ", numeric " + std::to_string(numeric);
    }
  };

  if (options.check_input) {
    GradientCheckResult::Entry entry{"input", 0.0};
    for (Index j = 0; j < x.cols(); ++j)
      for (Index i = 0; i < x.rows(); ++i) {
        const Scalar saved = probe(i, j);
        const double lp = loss_at(probe(i, j), Scalar(double(saved) + h), probe, y_plus);
        const double lm = loss_at(probe(i, j), Scalar(double(saved) - h), probe, y_minus);
        probe(i, j) = saved;
        record(entry, "input", i, j, double(dx(i, j)), (lp - lm) / (2.0 * h));
      }
    result.entries.push_back(entry);
  }

  const auto detached = [](const Parameter<Scalar>& p, Index i, Index j) {
    if (!p.update_window) return false;
    const Index k = p.update_window->axis == Axis::Rows ? i : j;
    return k < p.update_window->begin || k >= p.update_window->end;
  };

  for (Parameter<Scalar>* p : layer.parameters()) {
    if (!p->trainable) continue;
    const MatrixType analytic = p->grad;
    GradientCheckResult::Entry entry{p->name, 0.0};
    for (Index j = 0; j < p->value.cols(); ++j)
      for (Index i = 0; i < p->value.rows(); ++i) {
        if (detached(*p, i, j)) {
          record(entry, p->name, i, j, double(analytic(i, j)), 0.0);  // must be exactly zero
          continue;
        }
        const Scalar saved = p->value(i, j);
        const double lp = loss_at(p->value(i, j), Scalar(double(saved) + h), x, y_plus);
        const double lm = loss_at(p->value(i, j), Scalar(double(saved) - h), x, y_minus);
        p->value(i, j) = saved;
        record(entry, p->name, i, j, double(analytic(i, j)), (lp - lm) / (2.0 * h));
      }
    result.entries.push_back(entry);
  }
  return result;
}

}  // namespace rankwise::testing
