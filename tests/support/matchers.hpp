// Test helpers: an element-wise matcher for Eigen matrices and seeded random data.
#pragma once

#include <rankwise/core/init.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <sstream>

namespace rankwise::test_support {

/// Matches when |a - b| <= abs + rel |b| for every entry, and the shapes agree.
template <typename Scalar>
class IsCloseTo : public Catch::MatcherBase<Matrix<Scalar>> {
 public:
  IsCloseTo(Matrix<Scalar> expected, double rel, double abs)
      : m_expected(std::move(expected)), m_rel(rel), m_abs(abs) {}

  bool match(const Matrix<Scalar>& actual) const override {
    if (actual.rows() != m_expected.rows() || actual.cols() != m_expected.cols()) return false;
    for (Index j = 0; j < actual.cols(); ++j)
      for (Index i = 0; i < actual.rows(); ++i) {
        const double a = double(actual(i, j)), b = double(m_expected(i, j));
        if (!(std::abs(a - b) <= m_abs + m_rel * std::abs(b))) return false;
      }
    return true;
  }

  std::string describe() const override {
    std::ostringstream os;
    os << "is close to (rel " << m_rel << ", abs " << m_abs << ") the " << m_expected.rows() << " x "
       << m_expected.cols() << " matrix\n"
       << m_expected;
    return os.str();
  }

 private:
  Matrix<Scalar> m_expected;
  double m_rel;
  double m_abs;
};

template <typename Scalar>
IsCloseTo<Scalar> is_close_to(const Matrix<Scalar>& expected, double rel = 1e-5, double abs = 1e-6) {
  return IsCloseTo<Scalar>(expected, rel, abs);
}

/// Central differences of a scalar function at every entry of x (in double):
/// numeric(i, j) = (f() with x(i, j) + h  -  f() with x(i, j) - h) / 2h. `f` reads x (a loss of a
/// model whose parameter x is, or a loss of the matrix x itself); every entry is restored bit for bit.
template <typename F>
Matrix<double> central_differences(Matrix<double>& x, F&& f, double h = 1e-6) {
  Matrix<double> numeric(x.rows(), x.cols());
  for (Index i = 0; i < x.size(); ++i) {
    const double saved = x.data()[i];
    x.data()[i] = saved + h;
    const double plus = f();
    x.data()[i] = saved - h;
    const double minus = f();
    x.data()[i] = saved;
    numeric.data()[i] = (plus - minus) / (2 * h);
  }
  return numeric;
}

/// Entries drawn from N(0, 1) with the given generator.
template <typename Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, Random& rng) {
  Matrix<Scalar> m(rows, cols);
  fill_normal(m, 0.0, 1.0, rng);
  return m;
}

/// True when the two matrices have the same shape and the same bits (a bit-for-bit restore).
template <typename Scalar>
bool same_bits(const Matrix<Scalar>& a, const Matrix<Scalar>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(Scalar) * std::size_t(a.size())) == 0);
}

}  // namespace rankwise::test_support

namespace Catch {
// Print Eigen matrices in failure messages.
template <typename Scalar>
struct StringMaker<rankwise::Matrix<Scalar>> {
  static std::string convert(const rankwise::Matrix<Scalar>& m) {
    std::ostringstream os;
    os << m.rows() << " x " << m.cols() << " matrix\n" << m;
    return os.str();
  }
};
}  // namespace Catch
