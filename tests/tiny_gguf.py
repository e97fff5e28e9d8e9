"""Tiny Llama GGUF files whose decoder linears (and optionally the output head) are stored in
one ggml block type: every type lutlm maps to groups, for the mapping's tests and end-to-end
runs.

Shapes: hidden 256 and intermediate 512, so that every linear's rows are whole 256-weight
super-blocks (K-quants, TQ1_0/TQ2_0) and whole 32-weight blocks; 2 layers, 4 heads of 64,
2 kv heads. Weights are random at a trained model's scale (lutlm.bench.synthetic), quantized
by lutlm.formats.ggml_encode.quantize (gguf-py's quantizer, or round-to-nearest K-quants).
The vocabulary is a 128-token byte-level BPE one (t0 .. t127, no merges), or one passed in
(the bundled model's, for llama.cpp, which needs a real one).
"""

from __future__ import annotations

import dataclasses
import os

from lutlm.bench.synthetic import random_checkpoint
from lutlm.config import ModelConfig
from lutlm.formats import Checkpoint, TokenizerSpec
from lutlm.formats.gguf_writer import save_gguf

TINY_GGUF_CONFIG = ModelConfig(
    vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, name="tiny",
)


def tiny_vocabulary(size: int = 128) -> TokenizerSpec:
    return TokenizerSpec(gguf_model="gpt2", gguf_pre="gpt2", tokens=[f"t{i}" for i in range(size)], merges=[],
                         token_types=[1] * size, bos_token_id=1, eos_token_id=2)


def tiny_float_checkpoint(vocabulary: TokenizerSpec | None = None, seed: int = 0) -> Checkpoint:
    vocabulary = vocabulary or tiny_vocabulary()
    config = dataclasses.replace(TINY_GGUF_CONFIG, vocab_size=len(vocabulary.tokens))
    return random_checkpoint(config, vocabulary, seed)


def write_tiny_gguf(path: str | os.PathLike, linear_type: str, head_type: str | None = None,
                    vocabulary: TokenizerSpec | None = None, seed: int = 0) -> Checkpoint:
    """Write the tiny model with its decoder linears in `linear_type` (and its untied output
    head in `head_type`; F32 otherwise) to `path`; returns the float checkpoint it was written from."""
    checkpoint = tiny_float_checkpoint(vocabulary, seed)
    save_gguf(checkpoint, path, "F32", linear_type=linear_type, head_type=head_type)
    return checkpoint
