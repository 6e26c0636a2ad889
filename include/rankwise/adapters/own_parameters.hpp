#pragma once
/// \file rankwise/adapters/own_parameters.hpp
/// The bookkeeping every adapter does over its frozen base and its own parameters, in one place: an
/// adapter lists its own parameters with the suffix each is named by (OwnParameter), and parameters(),
/// zero_grad() and set_path() are these helpers. An adapter holds no pointers to its own members (it
/// must stay movable), so it builds the list when asked: `own()` returns a small std::array.
///
///   parameters()      the base's (frozen), then the adapter's own, in the listed order
///   zero_grad()       the base's and the adapter's own gradients
///   set_path(path)    "<path>.base_layer.*" for the base, "<path>.<suffix>" for each own parameter
///                     (the suffix alone for an empty path)

#include <rankwise/core/parameter.hpp>
#include <rankwise/core/types.hpp>

#include <array>
#include <cstddef>
#include <string>
#include <vector>

namespace rankwise::detail {

template <FloatScalar Scalar>
struct OwnParameter {
  Parameter<Scalar>* parameter;
  const char* suffix;  ///< its name after the module path, e.g. "lora_A.weight"
};

template <typename Base, FloatScalar Scalar, std::size_t N>
std::vector<Parameter<Scalar>*> adapter_parameters(Base& base, const std::array<OwnParameter<Scalar>, N>& own) {
  std::vector<Parameter<Scalar>*> params = base.parameters();
  for (const OwnParameter<Scalar>& p : own) params.push_back(p.parameter);
  return params;
}

template <typename Base, FloatScalar Scalar, std::size_t N>
void adapter_zero_grad(Base& base, const std::array<OwnParameter<Scalar>, N>& own) {
  base.zero_grad();
  for (const OwnParameter<Scalar>& p : own) p.parameter->zero_grad();
}

template <typename Base, FloatScalar Scalar, std::size_t N>
void adapter_set_path(Base& base, const std::string& path, const std::array<OwnParameter<Scalar>, N>& own) {
  const std::string prefix = path.empty() ? std::string() : path + ".";
  base.set_path(prefix + "base_layer");
  for (const OwnParameter<Scalar>& p : own) p.parameter->name = prefix + p.suffix;
}

}  // namespace rankwise::detail
