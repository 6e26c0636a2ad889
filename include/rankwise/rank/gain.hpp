#pragma once
/// \file rankwise/rank/gain.hpp
/// The pieces of the gain-over-cost allocator (RankAllocator with AllocationPolicy::GainOverCost):
///
///   residual gradient   G_res = (I - P_B) G (I - P_A): the part of the frozen weight's gradient
///                       G = dL/dW that the module's current ranks cannot follow (P_A projects on
///                       the row space of A, P_B on the column space of B). Its top singular
///                       triplets are the directions one new rank would reduce first; they come from
///                       a randomized two-pass sketch of G (LoRA::arm_gradient_probe), never from G.
///   predicted gain      a new rank along (u_j, v_j) lowers the loss by about sigma_j^2 / (2 h), with
///                       h the module's curvature along its own ranks, measured as
///                       h = 2 (sum of drop costs) / (sum of ||Delta W_i||^2) and shrunk towards the
///                       value pooled over all modules (a quadratic model around a trained rank:
///                       dropping rank i costs about h ||Delta W_i||^2 / 2)
///   plan_moves          moves one rank at a time from the cheapest drop costs to the largest
///                       predicted gains while gain >= gain_ratio x cost, so the allocation settles
/// Everything here works on small dense matrices (k, r << in, out), in double.
/// Docs: docs/rank/alora.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/types.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

namespace rankwise {

/// An orthonormal basis (columns) of the column space of `m`; columns whose pivot is below
/// `rel_tol` times the largest are dropped, so a rank-deficient input gives fewer columns.
/// (A template, like residual_spectrum(), so that only the programs that call it compile Eigen's
/// QR and SVD, not every file that includes this header.)
template <typename Derived>
Matrix<typename Derived::Scalar> orthonormal_basis(const Eigen::MatrixBase<Derived>& m, double rel_tol = 1e-10) {
  using S = typename Derived::Scalar;
  if (m.cols() == 0 || m.rows() == 0) return Matrix<S>(m.rows(), 0);
  const Eigen::ColPivHouseholderQR<Matrix<S>> qr(m);
  const Matrix<S> r = qr.matrixR().template triangularView<Eigen::Upper>();
  const double top = std::abs(double(r(0, 0)));
  Index keep = 0;
  if (top > 0.0)
    while (keep < std::min(m.rows(), m.cols()) && std::abs(double(r(keep, keep))) > rel_tol * top) ++keep;
  if (keep == 0) return Matrix<S>(m.rows(), 0);  // a zero matrix (B of fresh ranks) spans nothing
  const Matrix<S> q = qr.householderQ() * Matrix<S>::Identity(m.rows(), keep);
  return q;
}

/// Removes from the columns of `m` their components in the span of the orthonormal columns of `q`.
inline void project_off(Matrix<double>& m, const Matrix<double>& q) {
  if (q.cols() > 0 && m.size() > 0) m -= q * (q.transpose() * m);
}

/// The top singular values and right singular vectors of the residual sketch Z (k x in).
struct ResidualSpectrum {
  std::vector<double> sigma;  ///< descending
  Matrix<double> directions;  ///< in x k: unit right singular vectors (rows of A for new ranks)
};

template <typename Derived>
ResidualSpectrum residual_spectrum(const Eigen::MatrixBase<Derived>& z) {
  using S = typename Derived::Scalar;
  ResidualSpectrum s;
  if (z.size() == 0) {
    s.directions.resize(z.cols(), 0);
    return s;
  }
  const Eigen::JacobiSVD<Matrix<S>> svd(z, Eigen::ComputeThinV);
  const auto& values = svd.singularValues();
  for (Index i = 0; i < values.size(); ++i) s.sigma.push_back(double(values(i)));
  s.directions = svd.matrixV().template cast<double>();
  return s;
}

/// One module as plan_moves() sees it.
struct GainCostModule {
  Index rank = 0;
  Index max_rank = 0;
  Index unit_cost = 1;              ///< budget units per rank
  std::vector<double> drop_costs;   ///< per current rank: the loss if it goes (nats)
  std::vector<char> protected_rank; ///< per current rank: 1 = too young to be pruned
  std::vector<double> gains;        ///< predicted gain of the 1st, 2nd, ... new rank (descending)
};

/// One accepted move (or, with from < 0, a rank added from free budget).
struct RankMove {
  Index to = 0;
  double gain = 0.0;
  Index from = -1;               ///< donor module; -1 = free budget
  std::vector<Index> donor_ranks;  ///< donor rank indices (at planning time)
  double cost = 0.0;             ///< sum of the donors' drop costs
};

struct MovePlan {
  std::vector<std::vector<Index>> remove;  ///< per module, ascending
  std::vector<Index> add;                  ///< per module
  std::vector<RankMove> moves;
};

/// Greedy moves: the module with the largest predicted gain per budget unit receives a rank, paid by
/// free budget or by the cheapest unprotected ranks (per unit) of other modules, while
/// gain >= gain_ratio * (their drop costs). A module either gives or receives in one plan, never
/// both. Stops at max_moves accepted moves (0 = no limit) or when the best gain no longer pays.
inline MovePlan plan_moves(std::span<const GainCostModule> modules, Index free_units, double gain_ratio,
                           Index max_moves = 0) {
  constexpr const char* where = "rankwise::plan_moves";
  if (!(gain_ratio > 0.0) || !std::isfinite(gain_ratio))
    detail::fail(where, "gain_ratio must be finite and > 0 (got ", gain_ratio, ")");
  if (free_units < 0) detail::fail(where, "free_units must be >= 0 (got ", free_units, ")");
  if (max_moves < 0) detail::fail(where, "max_moves must be >= 0 (got ", max_moves, ")");
  const std::size_t n = modules.size();
  for (std::size_t m = 0; m < n; ++m) {
    const GainCostModule& g = modules[m];
    if (g.unit_cost < 1 || g.rank < 0 || g.rank > g.max_rank || Index(g.drop_costs.size()) != g.rank ||
        Index(g.protected_rank.size()) != g.rank)
      detail::fail(where, "module ", m, ": needs unit_cost >= 1, 0 <= rank <= max_rank and one drop cost and one "
                   "protection flag per rank (got rank ", g.rank, ", max_rank ", g.max_rank, ", ", g.drop_costs.size(),
                   " costs, ", g.protected_rank.size(), " flags)");
    for (double c : g.drop_costs)
      if (!std::isfinite(c)) detail::fail(where, "module ", m, ": drop costs must be finite");
    for (double v : g.gains)
      if (!std::isfinite(v)) detail::fail(where, "module ", m, ": gains must be finite");
  }
  MovePlan plan;
  plan.remove.resize(n);
  plan.add.assign(n, 0);
  std::vector<char> giving(n, 0), receiving(n, 0);
  struct Donor {
    Index module, rank;
    double cost;
  };
  std::vector<Donor> donors;
  for (std::size_t m = 0; m < n; ++m)
    for (Index i = 0; i < modules[m].rank; ++i)
      if (!modules[m].protected_rank[static_cast<std::size_t>(i)])
        donors.push_back({Index(m), i, modules[m].drop_costs[static_cast<std::size_t>(i)]});
  std::stable_sort(donors.begin(), donors.end(), [&](const Donor& a, const Donor& b) {
    return a.cost / double(modules[static_cast<std::size_t>(a.module)].unit_cost) <
           b.cost / double(modules[static_cast<std::size_t>(b.module)].unit_cost);
  });
  std::vector<char> used(donors.size(), 0);
  Index free = free_units;
  while (max_moves == 0 || Index(plan.moves.size()) < max_moves) {
    // The best receiver: largest next gain per unit among modules that give nothing and have room.
    Index best = -1;
    double best_density = 0.0;
    for (std::size_t m = 0; m < n; ++m) {
      const GainCostModule& g = modules[m];
      const Index next = plan.add[m];
      if (giving[m] || g.rank + next >= g.max_rank || next >= Index(g.gains.size())) continue;
      const double density = g.gains[static_cast<std::size_t>(next)] / double(g.unit_cost);
      if (density > best_density) {
        best_density = density;
        best = Index(m);
      }
    }
    if (best < 0) break;
    const std::size_t b = static_cast<std::size_t>(best);
    const GainCostModule& r = modules[b];
    RankMove move;
    move.to = best;
    move.gain = r.gains[static_cast<std::size_t>(plan.add[b])];
    Index have = free;
    std::vector<std::size_t> taken;
    double cost = 0.0;
    for (std::size_t d = 0; d < donors.size() && have < r.unit_cost; ++d) {
      const std::size_t dm = static_cast<std::size_t>(donors[d].module);
      if (used[d] || receiving[dm] || dm == b) continue;
      taken.push_back(d);
      have += modules[dm].unit_cost;
      cost += donors[d].cost;
    }
    if (have < r.unit_cost) break;  // nothing left to pay with
    if (!taken.empty() && !(move.gain >= gain_ratio * cost)) break;  // the best gain no longer pays
    for (std::size_t d : taken) {
      used[d] = 1;
      const std::size_t dm = static_cast<std::size_t>(donors[d].module);
      giving[dm] = 1;
      plan.remove[dm].push_back(donors[d].rank);
      move.donor_ranks.push_back(donors[d].rank);
      move.from = donors[d].module;
    }
    move.cost = cost;
    free = have - r.unit_cost;
    receiving[b] = 1;
    plan.add[b] += 1;
    plan.moves.push_back(std::move(move));
  }
  for (std::vector<Index>& v : plan.remove) std::sort(v.begin(), v.end());
  return plan;
}

/// The curvature of each module along its own ranks, h_m = 2 (sum_i c_i + 2 c_pool) /
/// (sum_i d_i + 2 d_pool), with c_i the drop costs (negative ones count as 0), d_i = ||Delta W_i||^2
/// and c_pool, d_pool their means per rank over every module: a module with few or no ranks leans on
/// the pooled value. Returns 0 for every module when no rank anywhere carries any cost.
inline std::vector<double> module_curvatures(const std::vector<std::vector<double>>& drop_costs,
                                             const std::vector<std::vector<double>>& delta_norms2) {
  if (drop_costs.size() != delta_norms2.size())
    detail::fail("rankwise::module_curvatures", "needs one cost list and one norm list per module (got ",
                 drop_costs.size(), " and ", delta_norms2.size(), ")");
  double c_all = 0.0, d_all = 0.0;
  long count = 0;
  for (std::size_t m = 0; m < drop_costs.size(); ++m) {
    if (drop_costs[m].size() != delta_norms2[m].size())
      detail::fail("rankwise::module_curvatures", "module ", m, ": ", drop_costs[m].size(), " costs but ",
                   delta_norms2[m].size(), " norms");
    for (std::size_t i = 0; i < drop_costs[m].size(); ++i) {
      c_all += std::max(0.0, drop_costs[m][i]);
      d_all += delta_norms2[m][i];
      ++count;
    }
  }
  std::vector<double> h(drop_costs.size(), 0.0);
  if (count == 0 || !(c_all > 0.0) || !(d_all > 0.0)) return h;
  const double c_pool = c_all / double(count), d_pool = d_all / double(count);
  for (std::size_t m = 0; m < drop_costs.size(); ++m) {
    double c = 2.0 * c_pool, d = 2.0 * d_pool;
    for (std::size_t i = 0; i < drop_costs[m].size(); ++i) {
      c += std::max(0.0, drop_costs[m][i]);
      d += delta_norms2[m][i];
    }
    h[m] = 2.0 * c / d;
  }
  return h;
}

}  // namespace rankwise
