"""Synthetic Llama-2-7B- and Llama-3-8B-shaped checkpoints for the end-to-end benchmark.

Speed depends on the shapes, not on what the weights encode, so these models hold random
weights at a trained model's scale: every matrix (embedding and output head included) is
N(0, (0.5 / sqrt(in_features))^2), which keeps activations of order one through the
layers and gives the quantizers realistic groups to fit; norm weights are 1. Each tensor
has its own seed, derived from its name, so a model can be rebuilt or extended tensor by
tensor with the same values.

A full-depth 7B model is 27 GB in float32; the benchmark keeps a few decoder layers (the
per-layer work is the same in every layer) and states how many. The vocabulary is the
bundled SmolLM2's (49152 tokens) so that llama.cpp accepts the GGUF and both engines read
the same tokens; Llama-2's 32000 or Llama-3's 128256 would only resize the embedding and
the output head.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from lutlm.config import ModelConfig
from lutlm.formats import Checkpoint, TokenizerSpec

SHAPES = {
    "llama2-7b": ModelConfig(vocab_size=49152, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                             rope_theta=10000.0, max_position_embeddings=4096, name="llama2-7b-shaped"),
    "llama3-8b": ModelConfig(vocab_size=49152, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                             rope_theta=500000.0, max_position_embeddings=8192, name="llama3-8b-shaped"),
}
WEIGHT_SCALE = 0.5  # standard deviation times sqrt(in_features)


def synthetic_config(shape: str, layers: int) -> ModelConfig:
    """The named shape with `layers` decoder layers."""
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic model shape {shape!r}; choose one of {', '.join(SHAPES)}")
    full = SHAPES[shape]
    if not 1 <= layers <= full.num_hidden_layers:
        raise ValueError(f"{shape} has 1 to {full.num_hidden_layers} layers, not {layers}")
    name = f"{full.name} ({layers} of {full.num_hidden_layers} layers)"
    return dataclasses.replace(full, num_hidden_layers=layers, name=name)


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an untied Llama checkpoint, by Hugging Face name."""
    c = config
    hidden, attn, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, hidden)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (attn, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, attn),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate_proj.weight": (c.intermediate_size, hidden),
            f"{p}.mlp.up_proj.weight": (c.intermediate_size, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, c.intermediate_size),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (c.vocab_size, hidden)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The tensor `name` of the synthetic model: ones for norms, scaled normal for matrices."""
    if len(shape) == 1:
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * (WEIGHT_SCALE / shape[1] ** 0.5)


def random_checkpoint(config: ModelConfig, tokenizer: TokenizerSpec, seed: int = 0) -> Checkpoint:
    """A float32 checkpoint of `config` with random weights and the given vocabulary."""
    if len(tokenizer.tokens) != config.vocab_size:
        raise ValueError(f"the vocabulary has {len(tokenizer.tokens)} tokens, the model {config.vocab_size}")
    config = dataclasses.replace(config, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_ids=[] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id])
    tensors = {name: random_tensor(name, shape, seed) for name, shape in tensor_shapes(config).items()}
    return Checkpoint(config, tensors, tokenizer, source=f"synthetic:{config.name}:seed{seed}",
                      tensor_types={name: "F32" for name in tensors})


def bundled_vocabulary() -> TokenizerSpec:
    """The bundled SmolLM2's GGUF vocabulary (what llama.cpp needs to load a synthetic GGUF)."""
    from lutlm.formats.gguf import bundled_model_path, load_gguf

    return load_gguf(bundled_model_path()).tokenizer
