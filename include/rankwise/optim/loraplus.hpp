#pragma once
/// \file rankwise/optim/loraplus.hpp
/// LoRA+ parameter groups (Hayou, Ghosh & Yu, 2024, arXiv:2402.12354): B learns `ratio` times faster
/// than A, eta_B = ratio * eta_A.
///
/// The grouping follows PEFT's create_loraplus_optimizer:
///   "lora_A"  every trainable matrix that is not a lora_B            lr,          weight_decay
///   "lora_B"  every trainable matrix whose name contains "lora_B"   ratio * lr,  weight_decay
///   "vectors" every trainable 1-D parameter (biases, VeRA/RED/...    ratio * lr,  0
///             vectors), which PEFT puts with B, without weight decay
/// Frozen parameters are left out. Empty groups are dropped. Docs: docs/optim/loraplus.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/optim/optimizer.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace rankwise {

struct LoRAPlusOptions {
  double lr = 1e-4;            ///< eta_A
  double ratio = 16.0;         ///< eta_B / eta_A, >= 1 (the paper's suggested default is 2^4)
  double weight_decay = 0.0;   ///< for the two matrix groups (PEFT's LoRA+ default is 0)
};

template <FloatScalar Scalar>
std::vector<ParameterGroup<Scalar>> loraplus_groups(const std::vector<Parameter<Scalar>*>& params,
                                                    const LoRAPlusOptions& options) {
  if (!(options.lr > 0.0) || !std::isfinite(options.lr))
    detail::fail("rankwise::loraplus_groups", "lr must be a finite number > 0 (got ", options.lr, ")");
  if (!(options.ratio >= 1.0) || !std::isfinite(options.ratio))
    detail::fail("rankwise::loraplus_groups", "ratio must be a finite number >= 1 (got ", options.ratio, ")");
  if (!(options.weight_decay >= 0.0) || !std::isfinite(options.weight_decay))
    detail::fail("rankwise::loraplus_groups", "weight_decay must be >= 0 (got ", options.weight_decay, ")");
  ParameterGroup<Scalar> a{{}, options.lr, options.weight_decay, "lora_A"};
  ParameterGroup<Scalar> b{{}, options.lr * options.ratio, options.weight_decay, "lora_B"};
  ParameterGroup<Scalar> vectors{{}, options.lr * options.ratio, 0.0, "vectors"};
  for (Parameter<Scalar>* p : params) {
    if (p == nullptr || !p->trainable) continue;
    if (p->is_vector)
      vectors.parameters.push_back(p);
    else if (p->name.find("lora_B") != std::string::npos)
      b.parameters.push_back(p);
    else
      a.parameters.push_back(p);
  }
  std::vector<ParameterGroup<Scalar>> groups;
  for (ParameterGroup<Scalar>* g : {&a, &b, &vectors})
    if (!g->parameters.empty()) groups.push_back(std::move(*g));
  return groups;
}

}  // namespace rankwise
