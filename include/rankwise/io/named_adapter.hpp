#pragma once
/// \file rankwise/io/named_adapter.hpp
/// NamedAdapter: how a model hands its adapters to the I/O functions — the module path under which
/// files name the adapter ("layers.0.attn.q_proj", Hugging Face style) and the adapter itself.
///
///   std::vector<rankwise::NamedAdapter<rankwise::LoRA<float>>> modules = {
///       {"layers.0.attn.q_proj", &q0}, {"layers.0.attn.v_proj", &v0}};
/// The adapters must outlive the call. Docs: docs/io/peft-interop.md

#include <rankwise/core/error.hpp>

#include <set>
#include <string>
#include <vector>

namespace rankwise {

template <typename AdapterType>
struct NamedAdapter {
  std::string path;                 ///< module path inside the model, without PEFT's "base_model.model." prefix
  AdapterType* adapter = nullptr;   ///< not owned
};

namespace detail {
/// Paths non-empty and unique, adapters non-null.
template <typename AdapterType>
void check_named_adapters(const char* where, const std::vector<NamedAdapter<AdapterType>>& modules) {
  std::set<std::string> seen;
  for (const NamedAdapter<AdapterType>& m : modules) {
    if (m.path.empty()) fail(where, "every module needs a non-empty path");
    if (m.adapter == nullptr) fail(where, "module '", m.path, "' has a null adapter");
    if (!seen.insert(m.path).second) fail(where, "module path '", m.path, "' is listed twice");
  }
}
}  // namespace detail

}  // namespace rankwise
