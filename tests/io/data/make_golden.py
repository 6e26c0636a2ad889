#!/usr/bin/env python3
"""Writes the golden files of tests/io/data with nothing but Python's standard library.

Each file follows the safetensors format as its specification states it (u64 little-endian
header length, compact JSON header padded with spaces to a multiple of 8, tensors ordered by
descending dtype then name, contiguous data). The PEFT directory follows PEFT's LoRA layout.
Run from anywhere:  python3 tests/io/data/make_golden.py   (rewrites the files in place)
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# The reference writer's dtype order (ascending); tensors are written in descending order.
DTYPE_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
               "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
               "F64", "I64", "U64"]
PACK = {"F32": "<f", "F64": "<d", "I64": "<q", "U16": "<H"}


def tensor(dtype, shape, values=None, raw=None):
    """(dtype, shape, bytes); values are row-major; raw 16-bit patterns are packed as given."""
    if raw is not None:
        data = b"".join(struct.pack("<H", v) for v in raw)
    else:
        data = b"".join(struct.pack(PACK[dtype], v) for v in values)
    return dtype, list(shape), data


def safetensors_bytes(tensors, metadata=None, align=True):
    order = sorted(tensors.items(), key=lambda kv: (-DTYPE_ORDER.index(kv[1][0]), kv[0]))
    header = {}
    if metadata is not None:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, (dtype, shape, data) in order:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if align:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(t[2] for _, t in order)


def write(path, data):
    with open(os.path.join(HERE, path), "wb") as f:
        f.write(data)


def main():
    # Every basic kind: a 2-D F32 matrix, a 1-D vector, a 0-d scalar, F64 and a non-float I64.
    write("basic.safetensors", safetensors_bytes({
        "weight": tensor("F32", [2, 3], [1, 2, 3, 4, 5, 6]),
        "bias": tensor("F32", [3], [0.5, -1.25, 3.0]),
        "scale": tensor("F32", [], [2.5]),
        "precise": tensor("F64", [2, 2], [1 / 3, 2 / 3, -1e-300, 1e300]),
        "counts": tensor("I64", [2], [7, -3]),
    }, metadata={"format": "pt", "note": "golden"}))

    # 16-bit edge values as bit patterns: zeros, subnormals, normal limits, infinities, NaN.
    f16 = [0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0xC000, 0x7BFF, 0x7C00, 0xFC00, 0x7E00]
    bf16 = [0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x3F80, 0xC000, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0]
    write("half.safetensors", safetensors_bytes({
        "f16": tensor("F16", [len(f16)], raw=f16),
        "bf16": tensor("BF16", [len(bf16)], raw=bf16),
    }, metadata={"format": "pt"}))

    # An old-style file: header not padded, so the data starts at an odd file offset.
    unaligned = safetensors_bytes({"m": tensor("F32", [2, 2], [1.5, -2.5, 3.5, -4.5])}, align=False)
    assert (8 + struct.unpack("<Q", unaligned[:8])[0]) % 4 != 0
    write("unaligned.safetensors", unaligned)

    # No tensors at all, with and without metadata.
    write("empty.safetensors", safetensors_bytes({}))
    write("metadata_only.safetensors", safetensors_bytes({}, metadata={"format": "pt"}))

    # A PEFT LoRA adapter directory (config keys of PEFT 0.19.1, some unknown to rankwise), for a
    # model with layers.{0,1}.attn.{q_proj,v_proj}: in = 4, out = 3; r = 2 except layers.1 v_proj
    # (rank 1, alpha 3). A[i][j] = (i + 1) / 4 - j / 8 and B[i][j] = (i - j) / 2 + m, with m the
    # module's index (0..3) in the order below.
    os.makedirs(os.path.join(HERE, "peft_lora"), exist_ok=True)
    modules = ["layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj", "layers.1.attn.v_proj"]
    tensors = {}
    for m, path in enumerate(modules):
        r = 1 if path == "layers.1.attn.v_proj" else 2
        a = [(i + 1) / 4 - j / 8 for i in range(r) for j in range(4)]
        b = [(i - j) / 2 + m for i in range(3) for j in range(r)]
        tensors["base_model.model." + path + ".lora_A.weight"] = tensor("F32", [r, 4], a)
        tensors["base_model.model." + path + ".lora_B.weight"] = tensor("F32", [3, r], b)
    write("peft_lora/adapter_model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
    config = {
        "alora_invocation_tokens": None, "alpha_pattern": {"layers.1.attn.v_proj": 3}, "arrow_config": None,
        "auto_mapping": None, "base_model_name_or_path": "toy-transformer", "bias": "none",
        "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 4,
        "lora_bias": False, "lora_dropout": 0.05, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
        "peft_version": "0.19.1", "qalora_group_size": 16, "r": 2,
        "rank_pattern": {"layers.1.attn.v_proj": 1}, "revision": None, "target_modules": ["q_proj", "v_proj"],
        "target_parameters": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None,
        "use_bdlora": None, "use_dora": False, "use_qalora": False, "use_rslora": False,
    }
    with open(os.path.join(HERE, "peft_lora/adapter_config.json"), "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
