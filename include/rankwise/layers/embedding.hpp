#pragma once
/// \file rankwise/layers/embedding.hpp
/// Embedding: a lookup table of vectors, as PyTorch's nn.Embedding(count, dim).
///   weight: count x dim (one row per id, PyTorch's shape), init N(0, 1) like PyTorch
///   forward(ids, y): y_:,t = weight_(ids[t]), :^T       y: dim x n
///   backward(dy):    grad_(ids[t]), : += dy_:,t^T  (ids repeated in a batch accumulate)
/// Not a Layer: its input is a list of ids, and it has no input gradient. Used for tokens and for
/// learned positions. Docs: docs/layers/embedding.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/init.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace rankwise {

template <FloatScalar Scalar_>
class Embedding {
 public:
  using Scalar = Scalar_;
  using MatrixType = Matrix<Scalar>;

  Embedding(Index count, Index dim, Random& rng, double stddev = 1.0) {
    if (count < 1 || dim < 1)
      detail::fail("rankwise::Embedding", "count and dim must be >= 1 (got ", count, ", ", dim, ")");
    m_weight.name = "weight";
    m_weight.value.resize(count, dim);
    fill_normal(m_weight.value, 0.0, stddev, rng);
    m_weight.zero_grad();
  }

  Index count() const { return m_weight.value.rows(); }
  Index dim() const { return m_weight.value.cols(); }
  void set_trainable(bool trainable) {
    m_weight.trainable = trainable;
    m_weight.zero_grad();
  }
  void set_path(const std::string& path) { m_weight.name = path.empty() ? std::string("weight") : path + ".weight"; }
  Parameter<Scalar>& weight() { return m_weight; }
  void set_training(bool training) { m_training = training; }
  bool is_training() const { return m_training; }

  /// y (dim x ids.size()) gets the rows of the table for ids; every id must be in [0, count()).
  void forward(std::span<const std::int32_t> ids, MatrixType& y) {
    for (std::size_t t = 0; t < ids.size(); ++t)
      if (ids[t] < 0 || ids[t] >= count())
        detail::fail("rankwise::Embedding", "id at position ", t, " must be in [0, ", count(), ") (got ", ids[t],
                     ")");
    y.resize(dim(), Index(ids.size()));
    for (std::size_t t = 0; t < ids.size(); ++t) y.col(Index(t)) = m_weight.value.row(ids[t]).transpose();
    if (m_training) m_ids.assign(ids.begin(), ids.end());
    m_cached = m_training;
  }

  /// Accumulates the rows of the ids of the last training forward.
  void backward(const ConstRef<Scalar>& dy) {
    if (!m_cached)
      detail::fail<StateError>("rankwise::Embedding", "backward() needs a forward() in training mode first");
    if (dy.rows() != dim() || dy.cols() != Index(m_ids.size()))
      detail::fail("rankwise::Embedding", "backward: dy must be ", dim(), " x ", m_ids.size(), " (got ", dy.rows(),
                   " x ", dy.cols(), ")");
    if (!m_weight.wants_grad()) return;
    for (std::size_t t = 0; t < m_ids.size(); ++t) m_weight.grad.row(m_ids[t]) += dy.col(Index(t)).transpose();
  }

  std::vector<Parameter<Scalar>*> parameters() { return {&m_weight}; }
  void zero_grad() { m_weight.zero_grad(); }

 private:
  Parameter<Scalar> m_weight;
  std::vector<std::int32_t> m_ids;
  bool m_training = true;
  bool m_cached = false;
};

}  // namespace rankwise
