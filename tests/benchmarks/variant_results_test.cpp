// Tests for benchmarks/variant_results.hpp (results of the adapter-variant comparison).
#include "variant_results.hpp"

#include "support/temp_dir.hpp"
#include "support/paths.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

using rankwise::Index;
using rankwise::InvalidArgument;
using rankwise::bench::not_measured;
using rankwise::bench::Quantity;
using rankwise::bench::RankRecord;
using rankwise::bench::SeedStats;
using rankwise::bench::VariantRun;

namespace {

VariantRun make_run(std::string method, std::uint64_t seed, double accuracy, std::vector<double> losses = {}) {
  VariantRun r;
  r.method = std::move(method);
  r.seed = seed;
  r.steps = 200;
  r.trainable_parameters = 49152;
  r.adapter_bytes = 196608;
  r.ms_per_step = 20.0 + double(seed);
  r.merged_ms = 6.0;
  r.final_loss = 0.5;
  r.accuracy = accuracy;
  r.losses = std::move(losses);
  return r;
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::size_t start = 0;
  for (std::size_t end; (end = text.find('\n', start)) != std::string::npos; start = end + 1)
    out.push_back(text.substr(start, end - start));
  return out;
}

}  // namespace

TEST_CASE("seed_stats: mean, sample standard deviation, min and max", "[benchmarks][variant_results]") {
  const std::vector<double> v = {1.0, 2.0, 3.0, 4.0};
  const SeedStats s = rankwise::bench::seed_stats(v);
  CHECK(s.count == 4);
  CHECK(s.mean == Approx(2.5));
  // Sum of squared deviations 5, divided by n - 1 = 3 (not by n = 4, which would give 1.118).
  CHECK(s.sd == Approx(std::sqrt(5.0 / 3.0)));
  CHECK(s.min == 1.0);
  CHECK(s.max == 4.0);
}

TEST_CASE("seed_stats: a tiny spread next to a large mean is not lost", "[benchmarks][variant_results]") {
  const std::vector<double> v = {1e9 + 1.0, 1e9 + 2.0, 1e9 + 3.0};
  const SeedStats s = rankwise::bench::seed_stats(v);
  CHECK(s.mean == Approx(1e9 + 2.0).epsilon(1e-15));
  CHECK(s.sd == Approx(1.0).epsilon(1e-9));
}

TEST_CASE("seed_stats: non-finite values are skipped and counted out", "[benchmarks][variant_results]") {
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> v = {not_measured, 0.9, inf, 0.7};
  const SeedStats s = rankwise::bench::seed_stats(v);
  CHECK(s.count == 2);
  CHECK(s.mean == Approx(0.8));
  CHECK(s.sd == Approx(std::sqrt(0.02)));
  CHECK(s.min == 0.7);
  CHECK(s.max == 0.9);
}

TEST_CASE("seed_stats: one value has no standard deviation, none has nothing", "[benchmarks][variant_results]") {
  const std::vector<double> one = {0.25};
  const SeedStats s1 = rankwise::bench::seed_stats(one);
  CHECK(s1.count == 1);
  CHECK(s1.mean == 0.25);
  CHECK(std::isnan(s1.sd));
  CHECK(s1.min == 0.25);
  CHECK(s1.max == 0.25);

  const std::vector<double> none = {not_measured, not_measured};
  const SeedStats s0 = rankwise::bench::seed_stats(none);
  CHECK(s0.count == 0);
  CHECK(std::isnan(s0.mean));
  CHECK(std::isnan(s0.sd));
  CHECK(std::isnan(s0.min));
  CHECK(std::isnan(s0.max));
}

TEST_CASE("summarize: one summary per method in order of first appearance", "[benchmarks][variant_results]") {
  const std::vector<VariantRun> runs = {make_run("vera", 1, 0.78), make_run("lora", 1, 0.91),
                                        make_run("vera", 2, 0.80), make_run("lora", 2, 0.93),
                                        make_run("lora", 3, not_measured)};
  const auto summaries = rankwise::bench::summarize(runs);
  REQUIRE(summaries.size() == 2);
  CHECK(summaries[0].method == "vera");
  CHECK(summaries[0].runs == 2);
  CHECK(summaries[0][Quantity::Accuracy].mean == Approx(0.79));
  CHECK(summaries[1].method == "lora");
  CHECK(summaries[1].runs == 3);
  CHECK(summaries[1][Quantity::Accuracy].count == 2);
  CHECK(summaries[1][Quantity::Accuracy].mean == Approx(0.92));
  CHECK(summaries[1][Quantity::MsPerStep].mean == Approx(22.0));  // 21, 22, 23
  CHECK(summaries[1][Quantity::MsPerStep].sd == Approx(1.0));
  CHECK(summaries[1][Quantity::TrainableParams].sd == 0.0);
  CHECK(summaries[1][Quantity::TeacherKL].count == 0);
}

TEST_CASE("format_stats: mean, spread and the share of runs that gave a value", "[benchmarks][variant_results]") {
  using rankwise::bench::format_stats;
  const SeedStats many{.count = 3, .mean = 0.9133333, .sd = 0.0152753, .min = 0.90, .max = 0.93};
  CHECK(format_stats(Quantity::Accuracy, many, 3) == "0.913 ± 0.015");
  CHECK(format_stats(Quantity::Accuracy, many, 3, true) == "0.913 ± 0.015 [0.900, 0.930]");
  CHECK(format_stats(Quantity::Accuracy, many, 4) == "0.913 ± 0.015 (3 of 4)");
  const SeedStats one{.count = 1, .mean = 1234567.0, .sd = not_measured, .min = 1234567.0, .max = 1234567.0};
  CHECK(format_stats(Quantity::TrainableParams, one, 1, true) == "1,234,567");
  CHECK(format_stats(Quantity::AdapterBytes, one, 2) == "1205.6 (1 of 2)");  // KiB
  CHECK(format_stats(Quantity::TeacherKL, SeedStats{}, 2) == "–");
  const SeedStats params{.count = 2, .mean = 999.0, .sd = 0.0, .min = 999.0, .max = 999.0};
  CHECK(format_stats(Quantity::TrainableParams, params, 2) == "999 ± 0");
}

TEST_CASE("markdown_table: a row per method, only the measured columns", "[benchmarks][variant_results]") {
  std::vector<VariantRun> runs = {make_run("lora", 1, 0.91), make_run("lora", 2, 0.93), make_run("vera", 1, 0.78)};
  runs[2].trainable_parameters = 6656;
  runs[2].adapter_bytes = 589824;
  const std::string table = rankwise::bench::markdown_table(rankwise::bench::summarize(runs));
  const std::vector<std::string> lines = lines_of(table);
  REQUIRE(lines.size() == 4);
  // No run measured the teacher KL: that column is left out.
  CHECK(lines[0] ==
        "| method | seeds | trainable params | adapter KiB | ms / step | merged ms | final loss | accuracy |");
  CHECK(lines[1] == "|---|---|---|---|---|---|---|---|");
  CHECK(lines[2] == "| lora | 2 | 49,152 ± 0 | 192.0 ± 0.0 | 21.50 ± 0.71 | 6.00 ± 0.00 | 0.5000 ± 0.0000 | "
                    "0.920 ± 0.014 |");
  CHECK(lines[3] == "| vera | 1 | 6,656 | 576.0 | 21.00 | 6.00 | 0.5000 | 0.780 |");
}

TEST_CASE("runs_csv: the documented header, one row per run, empty cells for NaN", "[benchmarks][variant_results]") {
  std::vector<VariantRun> runs = {make_run("lora", 7, 0.8125)};
  runs[0].teacher_kl = 0.1;
  runs[0].final_loss = not_measured;
  const std::vector<std::string> lines = lines_of(rankwise::bench::runs_csv(runs));
  REQUIRE(lines.size() == 2);
  CHECK(lines[0] ==
        "method,seed,steps,trainable_params,adapter_bytes,ms_per_step,merged_ms,final_loss,accuracy,teacher_kl");
  // Shortest round-trip text: 0.1 stays 0.1.
  CHECK(lines[1] == "lora,7,200,49152,196608,27,6,,0.8125,0.1");
}

TEST_CASE("loss_curves_csv: steps from 1, a stride, the last step always", "[benchmarks][variant_results]") {
  const std::vector<VariantRun> runs = {make_run("lora", 1, 0.9, {4.0, 3.0, not_measured, 1.5, 1.25})};
  CHECK(rankwise::bench::loss_curves_csv(runs) ==
        "method,seed,step,loss\nlora,1,1,4\nlora,1,2,3\nlora,1,3,\nlora,1,4,1.5\nlora,1,5,1.25\n");
  CHECK(rankwise::bench::loss_curves_csv(runs, 2) == "method,seed,step,loss\nlora,1,2,3\nlora,1,4,1.5\nlora,1,5,1.25\n");
}

TEST_CASE("ranks_csv and summary_csv: the documented headers", "[benchmarks][variant_results]") {
  const std::vector<RankRecord> ranks = {{"alora", 1, 0, "layers.0.attn.q_proj", 8},
                                         {"alora", 1, 1, "layers.0.attn.q_proj", 5}};
  CHECK(rankwise::bench::ranks_csv(ranks) ==
        "method,seed,round,module,rank\nalora,1,0,layers.0.attn.q_proj,8\nalora,1,1,layers.0.attn.q_proj,5\n");
  const std::vector<VariantRun> runs = {make_run("lora", 1, 0.9), make_run("lora", 2, 0.7)};
  const std::vector<std::string> lines = lines_of(rankwise::bench::summary_csv(rankwise::bench::summarize(runs)));
  REQUIRE(lines.size() == 8);  // header + 7 quantities
  CHECK(lines[0] == "method,quantity,count,mean,sd,min,max");
  CHECK(lines[1] == "lora,trainable_params,2,49152,0,49152,49152");
  CHECK(lines[6].rfind("lora,accuracy,2,0.8,0.1414213562373", 0) == 0);
  CHECK(lines[6].substr(lines[6].size() - 8) == ",0.7,0.9");
  CHECK(lines[7] == "lora,teacher_kl,0,,,,");
}

TEST_CASE("variant_results: the CSV headers are those of benchmarks/testdata", "[benchmarks][variant_results]") {
  // plot_variants.py is tested on benchmarks/testdata; the writer must produce the same columns.
  const std::filesystem::path data = rankwise::test_support::source_dir() / "benchmarks" / "testdata";
  const std::vector<VariantRun> runs = {make_run("lora", 1, 0.9, {1.0})};
  const std::vector<RankRecord> ranks = {{"alora", 1, 0, "m", 8}};
  CHECK(first_line(rankwise::test_support::read_text(data / "runs.csv")) == first_line(rankwise::bench::runs_csv(runs)));
  CHECK(first_line(rankwise::test_support::read_text(data / "loss_curves.csv")) ==
        first_line(rankwise::bench::loss_curves_csv(runs)));
  CHECK(first_line(rankwise::test_support::read_text(data / "ranks.csv")) ==
        first_line(rankwise::bench::ranks_csv(ranks)));
}

TEST_CASE("write_variant_results: every file, ranks.csv only with ranks", "[benchmarks][variant_results]") {
  rankwise::test_support::TempDir tmp("variant_results");
  const std::vector<VariantRun> runs = {make_run("lora", 1, 0.9, {2.0, 1.0})};
  const std::filesystem::path dir = tmp.path / "a" / "b";
  rankwise::bench::write_variant_results(dir, runs);
  CHECK(rankwise::test_support::read_text(dir / "runs.csv") == rankwise::bench::runs_csv(runs));
  CHECK(rankwise::test_support::read_text(dir / "loss_curves.csv") == rankwise::bench::loss_curves_csv(runs));
  CHECK(rankwise::test_support::read_text(dir / "summary.md") ==
        rankwise::bench::markdown_table(rankwise::bench::summarize(runs)));
  CHECK(std::filesystem::exists(dir / "summary.csv"));
  CHECK_FALSE(std::filesystem::exists(dir / "ranks.csv"));
  CHECK(rankwise::test_support::count_entries(dir) == 4);

  const std::vector<RankRecord> ranks = {{"alora", 1, 0, "layers.0.mlp.up_proj", 4}};
  rankwise::bench::write_variant_results(dir, runs, ranks, {.loss_stride = 2});
  CHECK(rankwise::test_support::read_text(dir / "ranks.csv") == rankwise::bench::ranks_csv(ranks));
  CHECK(rankwise::test_support::read_text(dir / "loss_curves.csv") == "method,seed,step,loss\nlora,1,2,1\n");
  CHECK(rankwise::test_support::count_entries(dir) == 5);
}

TEST_CASE("variant_results: bad names and arguments throw, and nothing is written",
          "[benchmarks][variant_results][errors]") {
  using Catch::Contains;
  rankwise::test_support::TempDir tmp("variant_results_errors");
  std::vector<VariantRun> runs = {make_run("lora,r=8", 1, 0.9)};
  CHECK_THROWS_MATCHES(rankwise::bench::runs_csv(runs), InvalidArgument,
                       Catch::Message("[rankwise::bench::runs_csv] method must be non-empty and contain no , \" | or "
                                      "line break (got 'lora,r=8')"));
  CHECK_THROWS_AS(rankwise::bench::write_variant_results(tmp.path / "out", runs), InvalidArgument);
  CHECK_FALSE(std::filesystem::exists(tmp.path / "out"));

  runs[0].method = "";
  CHECK_THROWS_AS(rankwise::bench::markdown_table(rankwise::bench::summarize(runs)), InvalidArgument);
  CHECK_THROWS_WITH(rankwise::bench::markdown_table(rankwise::bench::summarize(runs)),
                    Contains("[rankwise::bench::markdown_table] method must be non-empty"));
  runs[0].method = "lora";
  CHECK_THROWS_MATCHES(rankwise::bench::loss_curves_csv(runs, 0), InvalidArgument,
                       Catch::Message("[rankwise::bench::loss_curves_csv] stride must be >= 1 (got 0)"));
  const std::vector<RankRecord> pipe = {{"alora", 1, 0, "layers|0", 4}};
  CHECK_THROWS_AS(rankwise::bench::ranks_csv(pipe), InvalidArgument);
  CHECK_THROWS_WITH(rankwise::bench::ranks_csv(pipe),
                    Contains("module must be non-empty and contain no , \" | or line break (got 'layers|0')"));
  const std::vector<RankRecord> negative = {{"alora", 1, -1, "layers.0", 4}};
  CHECK_THROWS_AS(rankwise::bench::ranks_csv(negative), InvalidArgument);
  CHECK_THROWS_WITH(rankwise::bench::ranks_csv(negative),
                    Contains("round and rank must be >= 0 (got round -1, rank 4 for 'layers.0')"));

  const std::filesystem::path file = tmp.path / "a_file";
  rankwise::test_support::write_text(file, "x");
  CHECK_THROWS_AS(rankwise::bench::write_variant_results(file / "sub", runs), rankwise::IoError);
  CHECK_THROWS_WITH(rankwise::bench::write_variant_results(file / "sub", runs),
                    Contains("[rankwise::bench::write_variant_results] cannot create the directory"));
}
