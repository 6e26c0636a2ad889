#pragma once
// The command line of examples/finetune: its settings, their parsing and every check that needs no
// file or model. Kept apart from the program so that the test suite runs the same checks on the same
// arguments (tests/io/bad_input_catalogue_test.cpp).
#include <rankwise/core/error.hpp>
#include <rankwise/core/types.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace finetune_cli {
using rankwise::Index;

struct Settings {
  std::string adapter = "lora";
  Index rank = 8;
  double alpha = 16.0;
  std::string targets;  // empty: the adapter's default (all-linear; RED: mlp.down_proj)
  std::string task = "relabel";
  long steps = 400;
  double lr = 0.0;  // unset (0): rankwise::recommended_lr(adapter)
  std::uint64_t seed = 1;
  int threads = 1;  // rankwise's threads (core/parallel.hpp); 2 help on an idle machine, never hurt a busy one
  long pretrain_steps = 1500;
  Index d_model = 64;
  Index layers = 4;
  Index batch = 32;
  Index eval_sequences = 512;
  std::string base;  // empty: <output>/base-cache/<configuration and recipe>
  std::string output = "finetune_output";
  bool quiet = false;
  bool small = false;  // a tiny model and short runs, for the test suite
  std::string allocator = "prune-fisher";  // alora: prune-fisher, prune-sens, prune, gain or paper (as published)
  Index validation = 128;           // alora: sequences of the fixed batch the allocator scores on
  Index validation_batches = 4;     // alora: parts it is scored in (the scores' standard errors)
};

inline std::vector<std::string> split(const std::string& list) {
  std::vector<std::string> items;
  std::stringstream in(list);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) items.push_back(item);
  return items;
}

// The options a run cannot start with, each refused before any work (the recipe's own checks follow in
// the program, also before any work). InvalidArgument naming the option, what must hold and what was got.
inline void check_settings(const Settings& s, bool lr_given) {
  const char* where = "finetune";
  if (lr_given && (!(s.lr > 0.0) || !std::isfinite(s.lr)))
    rankwise::detail::fail(where, "--lr must be a finite number > 0 (got ", s.lr, ")");
  if (s.threads < 1 || s.threads > 64) rankwise::detail::fail(where, "--threads must be in [1, 64] (got ", s.threads, ")");
  if (s.steps < 1) rankwise::detail::fail(where, "--steps must be >= 1 (got ", s.steps, ")");
  if (s.pretrain_steps < 1) rankwise::detail::fail(where, "--pretrain-steps must be >= 1 (got ", s.pretrain_steps, ")");
  if (s.batch < 1) rankwise::detail::fail(where, "--batch must be >= 1 (got ", s.batch, ")");
  if (s.eval_sequences < 1) rankwise::detail::fail(where, "--eval-sequences must be >= 1 (got ", s.eval_sequences, ")");
  if (s.d_model < 4 || s.d_model % 4 != 0)
    rankwise::detail::fail(where, "--d-model must be a multiple of the 4 heads, >= 4 (got ", s.d_model, ")");
  if (s.layers < 1) rankwise::detail::fail(where, "--layers must be >= 1 (got ", s.layers, ")");
  const std::vector<std::string> tasks = {"relabel", "sort", "add", "teacher", "copy", "reverse", "grammar", "mixture"};
  if (std::find(tasks.begin(), tasks.end(), s.task) == tasks.end())
    rankwise::detail::fail(where, "--task must be one of relabel, sort, add, teacher (or a pre-training task: copy, "
                                  "reverse, grammar, mixture) (got \"", s.task, "\")");
  if (s.allocator != "prune-fisher" && s.allocator != "prune-sens" && s.allocator != "prune" && s.allocator != "gain" &&
      s.allocator != "paper")
    rankwise::detail::fail(where, "--allocator must be prune-fisher, prune-sens, prune, gain or paper (got \"",
                           s.allocator, "\")");
  if (s.output.empty()) rankwise::detail::fail(where, "--output must name a directory (got an empty path)");
}

struct CommandLine {
  Settings settings;
  bool lr_given = false;
  std::string small_note;  // what --small set (the options not given on the command line)
  std::string help;        // not empty: --help was asked for, and this is the text to print
};

// Parses and checks the arguments. InvalidArgument for anything refused: an unknown option, a value of
// the wrong type or out of range (CLI11's message, "see --help"), or a setting check_settings refuses.
inline CommandLine parse_command_line(int argc, const char* const* argv) {
  CommandLine line;
  Settings& s = line.settings;
  CLI::App app{"Pre-train the toy transformer (or reuse its cached base), then fine-tune it with an adapter on an "
               "unseen task and save the adapter."};
  app.add_option("--adapter", s.adapter, "lora, dylora, erat, vera, red, melora or alora")->capture_default_str();
  app.add_option("--rank", s.rank, "adapter rank (DyLoRA/ERAT: r_max; VeRA: the shared bank's rank is 16x this)")
      ->capture_default_str();
  app.add_option("--alpha", s.alpha, "adapter alpha (scale alpha / rank)")->capture_default_str();
  app.add_option("--targets", s.targets,
                 "module names separated by commas (q_proj,v_proj) or all-linear; default: all-linear, RED: "
                 "mlp.down_proj");
  app.add_option("--task", s.task, "downstream task: relabel, sort or add; or teacher (distil a teacher with planted ranks)")->capture_default_str();
  app.add_option("--steps", s.steps, "fine-tuning steps")->capture_default_str();
  app.add_option("--lr", s.lr, "peak learning rate of the linear schedule; default: 2e-3, VeRA, RED and ERAT 1e-2");
  app.add_option("--seed", s.seed, "seed of everything random")->capture_default_str();
  app.add_option("--threads", s.threads, "threads the products are split over (docs/core/threads.md)")
      ->capture_default_str();
  app.add_option("--base", s.base,
                 "base checkpoint directory: loaded if it holds one (same configuration), else pre-trained and "
                 "saved there; default: <output>/base-cache/<configuration and recipe>");
  app.add_option("--output", s.output, "directory for the adapter, the loss curve and the base cache")
      ->capture_default_str();
  app.add_option("--d-model", s.d_model, "model width (4 heads, d_ff = 4 d_model)")->capture_default_str();
  app.add_option("--layers", s.layers, "transformer blocks")->capture_default_str();
  app.add_option("--pretrain-steps", s.pretrain_steps, "pre-training steps of the base")->capture_default_str();
  app.add_option("--batch", s.batch, "sequences per step")->capture_default_str();
  app.add_option("--eval-sequences", s.eval_sequences, "held-out sequences for the accuracy")->capture_default_str();
  app.add_flag("--quiet", s.quiet, "no progress display");
  app.add_flag("--small", s.small, "a tiny model and short runs (for the tests)");
  app.add_option("--allocator", s.allocator,
                 "alora's policy: prune-fisher (from 3 x rank, pruned by drop costs predicted from the training "
                 "gradients; docs/rank/alora.md), prune-sens (the same by sensitivity), prune (by drop costs measured "
                 "on the validation batch), gain (gain over cost) or paper (ALoRA as published)")
      ->capture_default_str();
  app.add_option("--validation", s.validation, "alora: sequences in the fixed batch the allocator scores on")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  app.add_option("--validation-batches", s.validation_batches,
                 "alora: parts the validation batch is scored in (gives the scores' standard errors)")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    line.help = app.help();
    return line;
  } catch (const CLI::ParseError& e) {
    rankwise::detail::fail("finetune", e.what(), " (see --help)");
  }
  if (s.small) {  // smaller defaults; an option given on the command line keeps its value
    const auto small = [&](const char* option, auto& value, auto small_value) {
      if (app.count(option) > 0) return;
      value = small_value;
      line.small_note += std::string(line.small_note.empty() ? "" : ", ") + option + " " + std::to_string(small_value);
    };
    small("--d-model", s.d_model, Index(32));
    small("--layers", s.layers, Index(2));
    small("--pretrain-steps", s.pretrain_steps, 60L);
    small("--steps", s.steps, 40L);
    small("--batch", s.batch, Index(16));
    small("--eval-sequences", s.eval_sequences, Index(64));
    small("--rank", s.rank, Index(4));
    small("--validation", s.validation, Index(32));
    small("--validation-batches", s.validation_batches, Index(2));
  }
  line.lr_given = app.count("--lr") > 0;
  check_settings(s, line.lr_given);
  return line;
}
}  // namespace finetune_cli
