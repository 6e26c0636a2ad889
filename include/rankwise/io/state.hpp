#pragma once
/// \file rankwise/io/state.hpp
/// Every save_state / load_state of the library in one include: the mechanism (StateWriter,
/// StateReader, Checkpointable, Random, parameter and NamedAdapter lists: io/state_core.hpp) and the
/// components' own (io/adapter_state.hpp, io/optimizer_state.hpp, io/rank_state.hpp). Include a part
/// alone to depend on less. Docs: docs/io/checkpoints.md

#include <rankwise/io/adapter_state.hpp>
#include <rankwise/io/optimizer_state.hpp>
#include <rankwise/io/rank_state.hpp>
#include <rankwise/io/state_core.hpp>
