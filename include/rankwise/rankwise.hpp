#pragma once
/// \file rankwise/rankwise.hpp
/// Everything public in rankwise, for applications and examples. Library headers never include it.
/// The toy transformer, its tasks, teacher and Finetuner are a demonstration, not the library: include
/// <rankwise/models/toy_transformer.hpp>, tasks.hpp, teacher.hpp, finetune.hpp, base_checkpoint.hpp.

#include <rankwise/version.hpp>

#include <rankwise/core/config.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/init.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/memory.hpp>
#include <rankwise/core/parallel.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>

#include <rankwise/layers/causal_attention.hpp>
#include <rankwise/layers/cross_entropy.hpp>
#include <rankwise/layers/embedding.hpp>
#include <rankwise/layers/gelu.hpp>
#include <rankwise/layers/layer_norm.hpp>
#include <rankwise/layers/linear.hpp>

#include <rankwise/models/adapter_set.hpp>
#include <rankwise/models/trainer.hpp>
#include <rankwise/models/trainer_state.hpp>

#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/adapters/bora.hpp>
#include <rankwise/adapters/dylora.hpp>
#include <rankwise/adapters/factory.hpp>
#include <rankwise/adapters/kinds.hpp>
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/lora_export.hpp>
#include <rankwise/adapters/melora.hpp>
#include <rankwise/adapters/red.hpp>
#include <rankwise/adapters/vera.hpp>

#include <rankwise/rank/dylora_sampler.hpp>
#include <rankwise/rank/erat_sampler.hpp>

#include <rankwise/optim/adamw.hpp>
#include <rankwise/optim/grad_clip.hpp>
#include <rankwise/optim/loraplus.hpp>
#include <rankwise/optim/lr_schedule.hpp>
#include <rankwise/optim/optimizer.hpp>
#include <rankwise/optim/sgd.hpp>

#include <rankwise/rank/allocator.hpp>
#include <rankwise/rank/hooks.hpp>
#include <rankwise/rank/importance.hpp>
#include <rankwise/rank/module.hpp>

#include <rankwise/io/atomic_file.hpp>
#include <rankwise/io/checkpoint.hpp>
#include <rankwise/io/named_adapter.hpp>
#include <rankwise/io/peft.hpp>
#include <rankwise/io/peft_bora.hpp>
#include <rankwise/io/peft_config.hpp>
#include <rankwise/io/rankwise_adapter.hpp>
#include <rankwise/io/safetensors.hpp>
#include <rankwise/io/state.hpp>

#include <rankwise/testing/gradient_check.hpp>
