// safetensors_io: write matrices to a safetensors file (as PyTorch lays them out) and read them back.
// Shows shapes ([out, in] <-> out x in), 1-D vectors, a BF16 tensor, metadata and the checked reader.
// Run: build/examples/safetensors_io [file]   (exits non-zero if a value does not come back)
#include <rankwise/rankwise.hpp>
#include <rankwise/io/safetensors.hpp>

#include <cstdio>
#include <filesystem>

int main(int argc, char** argv) {
  using rankwise::Matrix;
  const std::filesystem::path path =
      argc > 1 ? std::filesystem::path(argv[1]) : std::filesystem::temp_directory_path() / "rankwise_example.safetensors";
  rankwise::Random rng(3);
  rankwise::Linear<float> q(16, 8, rng), head(8, 32, rng);

  // [snippet: write]
  rankwise::SafetensorsWriter writer;                          // F32 unless told otherwise
  writer.add("layers.0.attn.q_proj.weight", q.weight());       // 2-D [out, in], as PyTorch stores it
  writer.add_vector("layers.0.attn.q_proj.bias", q.bias());    // 1-D [out]
  writer.add("lm_head.weight", head.weight(), rankwise::DType::BF16);
  writer.set_metadata("base_model", "toy-transformer");        // next to {"format": "pt"}
  writer.write(path);                                          // temporary file, fsync, rename
  // [snippet: write]

  // [snippet: read]
  rankwise::SafetensorsReader file(path);  // checks the whole header against the file
  for (const rankwise::TensorInfo& t : file.tensors())
    std::printf("%-30s %-4s %zu-D, %llu bytes\n", t.name.c_str(), rankwise::to_string(t.dtype), t.shape.size(),
                static_cast<unsigned long long>(t.byte_size()));
  const Matrix<float> w = file.matrix<float>("layers.0.attn.q_proj.weight");  // 8 x 16, entry for entry
  const Matrix<double> lm = file.matrix<double>("lm_head.weight");            // BF16 widened exactly
  // [snippet: read]

  const bool ok = w == q.weight() && file.matrix<float>("layers.0.attn.q_proj.bias") == q.bias() &&
                  (lm.cast<float>() - head.weight()).cwiseAbs().maxCoeff() <= 0.01f * head.weight().cwiseAbs().maxCoeff() &&
                  file.metadata().at("format") == "pt";
  std::printf("read back: %s\n", ok ? "ok" : "WRONG");
  std::filesystem::remove(path);
  return ok ? 0 : 1;
}
