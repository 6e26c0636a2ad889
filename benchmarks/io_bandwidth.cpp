// io_bandwidth: how fast rankwise reads safetensors files and saves adapters.
//   1. loads a 100 MB safetensors file (25 tensors of 1024 x 1024 F32) from the page cache into
//      Eigen matrices, and compares with `cat file > /dev/null` measured in the same run (the goal:
//      at least half of cat's bandwidth);
//   2. saves the LoRA adapters of a 4-layer toy transformer (d 128, d_ff 512, r 8 on q, k, v, o,
//      up, down) as a PEFT directory (the goal: under 10 ms), durably (fsync) and without fsync;
//      on a real disk the durable save is bounded by the device's flush latency.
// Run: build/benchmarks/io_bandwidth [--quick] [directory for the files, default: the system's temp dir]
// --quick: a 16 MB file and 2 to 3 repeats (seconds: the harness's smoke run, scripts/bench.sh --quick).
// Prints best-of-N wall times; compare numbers measured in the same run.
#include <rankwise/rankwise.hpp>
#include <rankwise/io/peft.hpp>
#include <rankwise/io/safetensors.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

template <typename F>
double best_ms(int repeats, F&& f) {
  double best = 1e300;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = Clock::now();
    f();
    best = std::min(best, std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const int first_path = quick ? 2 : 1;
  const fs::path dir =
      (argc > first_path ? fs::path(argv[first_path]) : fs::temp_directory_path()) / "rankwise_io_bandwidth";
  const int load_repeats = quick ? 2 : 7, save_repeats = quick ? 3 : 20;
  fs::create_directories(dir);
  const fs::path file = dir / "model.safetensors";
  std::printf("rankwise %s io_bandwidth; files in %s\n", rankwise::version_string, dir.c_str());

  // --- 1. loading 100 MB ----------------------------------------------------------------------
  const int tensors = quick ? 4 : 25;
  const rankwise::Index side = 1024;
  {
    rankwise::Random rng(1);
    rankwise::SafetensorsWriter writer;
    for (int i = 0; i < tensors; ++i) {
      rankwise::Matrix<float> m(side, side);
      rankwise::fill_uniform(m, -1.0, 1.0, rng);
      writer.add("layers." + std::to_string(i) + ".weight", std::move(m));
    }
    const auto t0 = Clock::now();
    writer.write(file);
    std::printf("write  %.1f MB: %.1f ms (atomic, fsync included)\n", double(fs::file_size(file)) / 1e6,
                std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  const double megabytes = double(fs::file_size(file)) / 1e6;
  const std::string cat = "cat '" + file.string() + "' > /dev/null";
  if (std::system(cat.c_str()) != 0) return 1;  // warm the page cache
  const double cat_ms = best_ms(load_repeats, [&] { (void)std::system(cat.c_str()); });

  std::vector<rankwise::Matrix<float>> loaded(tensors);
  const double load_ms = best_ms(load_repeats, [&] {
    rankwise::SafetensorsReader reader(file);
    std::vector<rankwise::Matrix<float>> fresh(tensors);
    for (int i = 0; i < tensors; ++i) fresh[std::size_t(i)] = reader.matrix<float>("layers." + std::to_string(i) + ".weight");
    loaded.swap(fresh);
  });
  const double reuse_ms = best_ms(load_repeats, [&] {
    rankwise::SafetensorsReader reader(file);
    for (int i = 0; i < tensors; ++i) reader.read_matrix("layers." + std::to_string(i) + ".weight", loaded[std::size_t(i)]);
  });
  // The floor of any loader that fills matrices: copying the same bytes from memory into matrices
  // already in memory (no file, no transpose). cat writes nothing back to memory; a loader must.
  std::vector<rankwise::Matrix<float>> copies(tensors, rankwise::Matrix<float>(side, side));
  const double copy_ms = best_ms(load_repeats, [&] {
    for (int i = 0; i < tensors; ++i) copies[std::size_t(i)] = loaded[std::size_t((i + 1) % tensors)];
  });
  std::printf("cat file > /dev/null      %7.1f ms  %6.2f GB/s  (includes starting sh and cat)\n", cat_ms, megabytes / cat_ms);
  std::printf("memory copy, same bytes   %7.1f ms  %6.2f GB/s  = %.2f x cat (no file, no transpose)\n", copy_ms,
              megabytes / copy_ms, cat_ms / copy_ms);
  std::printf("load into new matrices    %7.1f ms  %6.2f GB/s  = %.2f x cat\n", load_ms, megabytes / load_ms, cat_ms / load_ms);
  std::printf("load into matrices reused %7.1f ms  %6.2f GB/s  = %.2f x cat\n", reuse_ms, megabytes / reuse_ms, cat_ms / reuse_ms);

  // --- 2. saving a toy transformer's adapters --------------------------------------------------
  rankwise::Random rng(2);
  std::vector<std::unique_ptr<rankwise::LoRA<float>>> layers;
  std::vector<rankwise::NamedAdapter<rankwise::LoRA<float>>> modules;
  const rankwise::Index d = 128, d_ff = 512;
  for (int l = 0; l < 4; ++l) {
    const std::string prefix = "layers." + std::to_string(l) + ".";
    const std::pair<const char*, std::pair<rankwise::Index, rankwise::Index>> shapes[] = {
        {"attn.q_proj", {d, d}}, {"attn.k_proj", {d, d}},     {"attn.v_proj", {d, d}},
        {"attn.o_proj", {d, d}}, {"mlp.up_proj", {d, d_ff}}, {"mlp.down_proj", {d_ff, d}}};
    for (const auto& [name, shape] : shapes) {
      layers.push_back(std::make_unique<rankwise::LoRA<float>>(rankwise::Linear<float>(shape.first, shape.second, rng),
                                                               rankwise::LoRAOptions{.rank = 8, .alpha = 16.0}, rng));
      modules.push_back({prefix + name, layers.back().get()});
    }
  }
  const fs::path adapter_dir = dir / "adapter";
  const double save_ms = best_ms(save_repeats, [&] { rankwise::save_peft_adapter(adapter_dir, modules); });
  const double fast_ms = best_ms(save_repeats, [&] { rankwise::save_peft_adapter(adapter_dir, modules, {.durable = false}); });
  std::uintmax_t adapter_bytes = 0;
  for (const auto& entry : fs::directory_iterator(adapter_dir)) adapter_bytes += entry.file_size();
  std::printf("save PEFT adapter (%zu modules, r 8, %.1f kB): durable %.2f ms (2 files + 2 directory fsyncs); "
              "without fsync %.2f ms\n",
              modules.size(), double(adapter_bytes) / 1e3, save_ms, fast_ms);
  const double load_adapter_ms = best_ms(save_repeats, [&] { rankwise::load_peft_adapter(adapter_dir, modules); });
  std::printf("load PEFT adapter into the model               %.2f ms\n", load_adapter_ms);

  fs::remove_all(dir);
  std::printf("goals: load >= cat / 2: %s; save < 10 ms: %s durable, %s without fsync\n",
              load_ms <= 2.0 * cat_ms ? "met" : "NOT met", save_ms < 10.0 ? "met" : "not met",
              fast_ms < 10.0 ? "met" : "NOT met");
  return 0;
}
