// Results of the adapter-variant comparison: one record per fine-tuning run (method x seed), their
// mean and spread over seeds, a Markdown table, and the CSV files that benchmarks/plot_variants.py
// draws. The schemas are fixed here and documented in docs/benchmarks.md ("CSV files of the variant
// comparison"); benchmarks/testdata/ holds small files in the same schemas.
//   runs.csv         method,seed,steps,trainable_params,adapter_bytes,ms_per_step,merged_ms,final_loss,accuracy,teacher_kl
//   loss_curves.csv  method,seed,step,loss
//   ranks.csv        method,seed,round,module,rank
//   summary.csv      method,quantity,count,mean,sd,min,max
// A quantity that was not measured (or did not come out finite) is NaN in a VariantRun and an empty
// cell in the CSV; statistics skip it and count only finite values. Spread over seeds: sample standard
// deviation (n - 1), minimum and maximum. Files are written atomically (rankwise/io/atomic_file.hpp).
#pragma once

#include <rankwise/core/config.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/io/atomic_file.hpp>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace rankwise::bench {

inline constexpr double not_measured = std::numeric_limits<double>::quiet_NaN();

/// One fine-tuning run of one method with one seed.
struct VariantRun {
  std::string method;                        ///< "lora", "dylora", "alora", ... (no , " | or line break)
  std::uint64_t seed = 0;
  Index steps = 0;                           ///< optimizer steps of the run (the matched budget)
  Index trainable_parameters = 0;            ///< scalars the optimizer updates
  Index adapter_bytes = 0;                   ///< bytes of the adapters' tensors (shared ones once)
  double ms_per_step = not_measured;         ///< training step, wall clock
  double merged_ms = not_measured;           ///< one inference forward of the merged model, wall clock
  double final_loss = not_measured;          ///< training loss at the end (as the program defines it)
  double accuracy = not_measured;            ///< task accuracy in [0, 1], if the task has one
  double teacher_kl = not_measured;          ///< KL(teacher || student), if the task has a teacher
  std::vector<double> losses;                ///< training loss of step 1, 2, ... (loss_curves.csv)
};

/// Ranks of every module after one allocation round (ALoRA); round 0 is the initial allocation.
struct RankRecord {
  std::string method;
  std::uint64_t seed = 0;
  Index round = 0;
  std::string module;  ///< module path, e.g. "layers.0.attn.q_proj"
  Index rank = 0;
};

/// Mean and spread of one quantity over seeds. `count` finite values were used; with none, every
/// field is NaN; with one, `sd` is NaN (a sample standard deviation needs two).
struct SeedStats {
  Index count = 0;
  double mean = not_measured;
  double sd = not_measured;
  double min = not_measured;
  double max = not_measured;
};

/// Statistics of the finite values in `values` (NaN and infinities are skipped).
inline SeedStats seed_stats(std::span<const double> values) {
  SeedStats s;
  double sum = 0.0;
  for (double v : values) {
    if (!std::isfinite(v)) continue;
    if (s.count == 0 || v < s.min) s.min = v;
    if (s.count == 0 || v > s.max) s.max = v;
    sum += v;
    ++s.count;
  }
  if (s.count == 0) return s;
  s.mean = sum / double(s.count);
  if (s.count < 2) return s;
  double squares = 0.0;  // two passes: no cancellation when the spread is tiny next to the mean
  for (double v : values)
    if (std::isfinite(v)) squares += (v - s.mean) * (v - s.mean);
  s.sd = std::sqrt(squares / double(s.count - 1));
  return s;
}

/// The quantities of a VariantRun that are summarised over seeds, in table order.
enum class Quantity { TrainableParams, AdapterBytes, MsPerStep, MergedMs, FinalLoss, Accuracy, TeacherKL };
inline constexpr Quantity all_quantities[] = {Quantity::TrainableParams, Quantity::AdapterBytes, Quantity::MsPerStep,
                                              Quantity::MergedMs,        Quantity::FinalLoss,    Quantity::Accuracy,
                                              Quantity::TeacherKL};

/// The quantity's column name in runs.csv and summary.csv.
inline const char* column_name(Quantity q) {
  switch (q) {
    case Quantity::TrainableParams: return "trainable_params";
    case Quantity::AdapterBytes: return "adapter_bytes";
    case Quantity::MsPerStep: return "ms_per_step";
    case Quantity::MergedMs: return "merged_ms";
    case Quantity::FinalLoss: return "final_loss";
    case Quantity::Accuracy: return "accuracy";
    case Quantity::TeacherKL: return "teacher_kl";
  }
  return "unknown";
}

inline double value_of(const VariantRun& run, Quantity q) {
  switch (q) {
    case Quantity::TrainableParams: return double(run.trainable_parameters);
    case Quantity::AdapterBytes: return double(run.adapter_bytes);
    case Quantity::MsPerStep: return run.ms_per_step;
    case Quantity::MergedMs: return run.merged_ms;
    case Quantity::FinalLoss: return run.final_loss;
    case Quantity::Accuracy: return run.accuracy;
    case Quantity::TeacherKL: return run.teacher_kl;
  }
  return not_measured;
}

/// One method's runs summarised over seeds.
struct VariantSummary {
  std::string method;
  Index runs = 0;
  SeedStats stats[std::size(all_quantities)];
  const SeedStats& operator[](Quantity q) const { return stats[std::size_t(q)]; }
};

/// One summary per method, in the order in which the methods first appear in `runs`.
inline std::vector<VariantSummary> summarize(std::span<const VariantRun> runs) {
  std::vector<VariantSummary> out;
  std::vector<double> values;
  for (const VariantRun& first : runs) {
    bool seen = false;
    for (const VariantSummary& s : out) seen = seen || s.method == first.method;
    if (seen) continue;
    VariantSummary summary;
    summary.method = first.method;
    for (const VariantRun& r : runs) summary.runs += r.method == first.method ? 1 : 0;
    for (Quantity q : all_quantities) {
      values.clear();
      for (const VariantRun& r : runs)
        if (r.method == first.method) values.push_back(value_of(r, q));
      summary.stats[std::size_t(q)] = seed_stats(values);
    }
    out.push_back(std::move(summary));
  }
  return out;
}

namespace detail {

/// Appends every part to `out` (strings and string literals; no temporaries chained with +).
template <typename... Parts>
void append(std::string& out, const Parts&... parts) {
  (out += ... += parts);
}

/// Names go into CSV cells and Markdown tables unquoted, so they may not contain separators.
inline void check_name(const char* where, const char* what, const std::string& name) {
  if (name.empty() || name.find_first_of(",\"|\r\n") != std::string::npos)
    rankwise::detail::fail(where, what, " must be non-empty and contain no , \" | or line break (got '", name, "')");
}

/// The shortest text that reads back as the same double; empty for NaN and infinities.
inline std::string csv_number(double v) {
  if (!std::isfinite(v)) return {};
  char buffer[32];
  const std::to_chars_result r = std::to_chars(buffer, buffer + sizeof(buffer), v);
  return std::string(buffer, r.ptr);
}

inline std::string format(const char* pattern, double v) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), pattern, v);
  return buffer;
}

/// An integer-valued number with thousands separators: 1234567 -> "1,234,567".
inline std::string grouped(double v) {
  const std::string digits = format("%.0f", std::fabs(v));
  std::string out = v < 0 && digits != "0" ? "-" : "";
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out.push_back(',');
    out.push_back(digits[i]);
  }
  return out;
}

inline std::string table_number(Quantity q, double v) {
  switch (q) {
    case Quantity::TrainableParams: return grouped(v);
    case Quantity::AdapterBytes: return format("%.1f", v / 1024.0);
    case Quantity::MsPerStep:
    case Quantity::MergedMs: return format("%.2f", v);
    case Quantity::FinalLoss:
    case Quantity::TeacherKL: return format("%.4f", v);
    case Quantity::Accuracy: return format("%.3f", v);
  }
  return format("%g", v);
}

inline const char* table_header(Quantity q) {
  switch (q) {
    case Quantity::TrainableParams: return "trainable params";
    case Quantity::AdapterBytes: return "adapter KiB";
    case Quantity::MsPerStep: return "ms / step";
    case Quantity::MergedMs: return "merged ms";
    case Quantity::FinalLoss: return "final loss";
    case Quantity::Accuracy: return "accuracy";
    case Quantity::TeacherKL: return "teacher KL";
  }
  return "?";
}

}  // namespace detail

/// "mean ± sd" (sd omitted for one value or none), "[min, max]" appended on request, and
/// "(k of n)" when only k of the method's n runs gave a finite value; "–" when none did.
inline std::string format_stats(Quantity q, const SeedStats& s, Index runs, bool min_max = false) {
  if (s.count == 0) return "–";
  std::string text = detail::table_number(q, s.mean);
  if (s.count > 1) detail::append(text, " ± ", detail::table_number(q, s.sd));
  if (min_max && s.count > 1)
    detail::append(text, " [", detail::table_number(q, s.min), ", ", detail::table_number(q, s.max), "]");
  if (s.count < runs) detail::append(text, " (", std::to_string(s.count), " of ", std::to_string(runs), ")");
  return text;
}

struct TableOptions {
  bool min_max = false;  ///< append [min, max] to every cell with two values or more
};

/// A Markdown table, one row per method: seeds, then every quantity that some method measured
/// (columns in which no method has a finite value are left out).
inline std::string markdown_table(std::span<const VariantSummary> summaries, TableOptions options = {}) {
  std::vector<Quantity> columns;
  for (Quantity q : all_quantities) {
    bool measured = false;
    for (const VariantSummary& s : summaries) measured = measured || s[q].count > 0;
    if (measured) columns.push_back(q);
  }
  std::string out = "| method | seeds |";
  for (Quantity q : columns) detail::append(out, " ", detail::table_header(q), " |");
  out += "\n|---|---|";
  for (std::size_t i = 0; i < columns.size(); ++i) out += "---|";
  out += "\n";
  for (const VariantSummary& s : summaries) {
    detail::check_name("rankwise::bench::markdown_table", "method", s.method);
    detail::append(out, "| ", s.method, " | ", std::to_string(s.runs), " |");
    for (Quantity q : columns) detail::append(out, " ", format_stats(q, s[q], s.runs, options.min_max), " |");
    out += "\n";
  }
  return out;
}

/// runs.csv: one row per run.
inline std::string runs_csv(std::span<const VariantRun> runs) {
  std::string out = "method,seed,steps";
  for (Quantity q : all_quantities) out += std::string(",") + column_name(q);
  out += "\n";
  for (const VariantRun& r : runs) {
    detail::check_name("rankwise::bench::runs_csv", "method", r.method);
    detail::append(out, r.method, ",", std::to_string(r.seed), ",", std::to_string(r.steps));
    for (Quantity q : all_quantities) detail::append(out, ",", detail::csv_number(value_of(r, q)));
    out += "\n";
  }
  return out;
}

/// loss_curves.csv: the loss of every `stride`-th step of every run (steps count from 1; the last
/// step is always written). A non-finite loss is an empty cell.
inline std::string loss_curves_csv(std::span<const VariantRun> runs, Index stride = 1) {
  if (stride < 1) rankwise::detail::fail("rankwise::bench::loss_curves_csv", "stride must be >= 1 (got ", stride, ")");
  std::string out = "method,seed,step,loss\n";
  for (const VariantRun& r : runs) {
    detail::check_name("rankwise::bench::loss_curves_csv", "method", r.method);
    const Index n = Index(r.losses.size());
    for (Index step = 1; step <= n; ++step) {
      if (step % stride != 0 && step != n) continue;
      detail::append(out, r.method, ",", std::to_string(r.seed), ",", std::to_string(step), ",",
                     detail::csv_number(r.losses[std::size_t(step - 1)]), "\n");
    }
  }
  return out;
}

/// ranks.csv: one row per (run, round, module).
inline std::string ranks_csv(std::span<const RankRecord> ranks) {
  std::string out = "method,seed,round,module,rank\n";
  for (const RankRecord& r : ranks) {
    detail::check_name("rankwise::bench::ranks_csv", "method", r.method);
    detail::check_name("rankwise::bench::ranks_csv", "module", r.module);
    if (r.round < 0 || r.rank < 0)
      rankwise::detail::fail("rankwise::bench::ranks_csv", "round and rank must be >= 0 (got round ", r.round,
                             ", rank ", r.rank, " for '", r.module, "')");
    detail::append(out, r.method, ",", std::to_string(r.seed), ",", std::to_string(r.round), ",", r.module, ",",
                   std::to_string(r.rank), "\n");
  }
  return out;
}

/// summary.csv: one row per (method, quantity); empty cells where a statistic is undefined.
inline std::string summary_csv(std::span<const VariantSummary> summaries) {
  std::string out = "method,quantity,count,mean,sd,min,max\n";
  for (const VariantSummary& s : summaries) {
    detail::check_name("rankwise::bench::summary_csv", "method", s.method);
    for (Quantity q : all_quantities) {
      const SeedStats& st = s[q];
      detail::append(out, s.method, ",", column_name(q), ",", std::to_string(st.count), ",",
                     detail::csv_number(st.mean), ",", detail::csv_number(st.sd), ",", detail::csv_number(st.min), ",",
                     detail::csv_number(st.max), "\n");
    }
  }
  return out;
}

struct WriteOptions {
  Index loss_stride = 1;  ///< write every loss_stride-th step of the loss curves
  bool durable = false;   ///< fsync every file (results can be recomputed: off by default)
};

/// Writes runs.csv, loss_curves.csv, summary.csv and summary.md into `dir` (created if needed), and
/// ranks.csv when `ranks` is not empty. Every text is formed (and every name checked) before the
/// first file is written; each file appears whole or not at all.
inline void write_variant_results(const std::filesystem::path& dir, std::span<const VariantRun> runs,
                                  std::span<const RankRecord> ranks = {}, WriteOptions options = {}) {
  const std::vector<VariantSummary> summaries = summarize(runs);
  const std::string files[][2] = {{"runs.csv", runs_csv(runs)},
                                  {"loss_curves.csv", loss_curves_csv(runs, options.loss_stride)},
                                  {"summary.csv", summary_csv(summaries)},
                                  {"summary.md", markdown_table(summaries)},
                                  {"ranks.csv", ranks.empty() ? std::string() : ranks_csv(ranks)}};
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    rankwise::detail::fail<IoError>("rankwise::bench::write_variant_results", "cannot create the directory '",
                                    dir.string(), "': ", ec.message());
  for (const auto& [name, text] : files)
    if (!text.empty()) write_file_atomically(dir / name, text, options.durable);
}

}  // namespace rankwise::bench
