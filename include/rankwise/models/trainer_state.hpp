#pragma once
/// \file rankwise/models/trainer_state.hpp
/// save_state / load_state (io/state_core.hpp) for a Trainer, so that a run over any model resumes
/// bit for bit: its progress (steps done, steps skipped, losses), its AdamW state and its rank
/// allocator's state. Not included: the model's parameters and the adapters (their own components,
/// e.g. AdapterSet::named_adapters()), an importance estimator with state, a sampler hook's stream
/// (DyLoRAHook::sampler()) and the data. Docs: docs/models/trainer.md#checkpoints

#include <rankwise/io/optimizer_state.hpp>
#include <rankwise/io/rank_state.hpp>
#include <rankwise/io/state_core.hpp>
#include <rankwise/models/trainer.hpp>

#include <cstddef>
#include <string>
#include <vector>

namespace rankwise {

template <FloatScalar Scalar>
void save_state(StateWriter& out, const Trainer<Scalar>& trainer) {
  nlohmann::json& j = out.json();
  j["kind"] = "trainer";
  j["steps"] = trainer.options().steps;
  j["steps_done"] = trainer.steps_done();
  j["skipped_steps"] = trainer.skipped_steps();
  j["allocator"] = trainer.allocator() != nullptr;
  const std::vector<double>& losses = trainer.losses();
  Matrix<double> column(Index(losses.size()), 1);
  for (std::size_t i = 0; i < losses.size(); ++i) column(Index(i), 0) = losses[i];
  if (!losses.empty()) out.vector("losses", std::move(column));
  StateWriter optimizer = out.child("optimizer");
  save_state(optimizer, trainer.optimizer());
  if (const RankAllocator<Scalar>* allocator = trainer.allocator()) {
    StateWriter a = out.child("rank_allocator");
    save_state(a, *allocator);
  }
}

/// Restores a Trainer set up as the saved one was (same steps, an allocator or not), before it steps.
template <FloatScalar Scalar>
void load_state(const StateReader& in, Trainer<Scalar>& trainer) {
  if (in.string("kind") != "trainer") in.fail("holds a '", in.string("kind"), "', not a trainer");
  if (trainer.steps_done() > 0 || trainer.is_finished())
    in.fail("can only be restored into a trainer that has not stepped (this one has taken ", trainer.steps_done(),
            " steps)");
  const std::int64_t steps = in.integer("steps"), done = in.integer("steps_done"), skipped = in.integer("skipped_steps");
  if (steps != trainer.options().steps)
    in.fail("was saved from a run of ", steps, " steps but this trainer's run is ", trainer.options().steps, " steps");
  if (done < 0 || done > steps || skipped < 0 || skipped > done)
    in.fail("needs 0 <= skipped_steps <= steps_done <= steps (got ", skipped, ", ", done, ", ", steps, ")");
  const bool allocator = in.boolean("allocator");
  if (allocator != (trainer.allocator() != nullptr))
    in.fail(allocator ? "holds a rank allocator but this trainer has none (call allocate_ranks first)"
                      : "holds no rank allocator but this trainer has one");
  std::vector<double> losses;
  if (done > 0) {
    const Matrix<double> column = in.template matrix<double>("losses");
    if (column.cols() != 1 || column.rows() != done)
      in.fail("'losses' must hold one loss per step done (", done, "), got ", column.rows(), " x ", column.cols());
    losses.assign(column.data(), column.data() + column.size());
  }
  load_state(in.child("optimizer"), trainer.optimizer());
  if (RankAllocator<Scalar>* a = trainer.allocator()) load_state(in.child("rank_allocator"), *a);
  trainer.restore_progress(long(done), long(skipped), std::move(losses));
}

}  // namespace rankwise
