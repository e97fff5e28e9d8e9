"""Checkpoint -> GGUF file, the way llama.cpp's converter writes a Llama.

Used to hand llama.cpp exactly the weights lutlm runs (to separate the two engines'
arithmetic from their weights) and to write synthetic models that llama.cpp then quantizes.
Matrices are F32 or F16; the decoder-layer linears and the output head may instead be
stored in a quantized ggml type (lutlm.formats.ggml_encode.quantize: gguf-py's quantizer
where it has one, round-to-nearest K-quants otherwise), which gives test files of every
block type lutlm reads.
"""

from __future__ import annotations

import os

import numpy as np
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, RopeScalingType, get_tensor_name_map

from lutlm.formats import Checkpoint
from lutlm.formats.ggml_encode import GGUF_QUANTIZES, K_QUANTS, quantize
from lutlm.formats.gguf import permute_rotary
from lutlm.formats.llama_layout import LAYER_TENSORS

TENSOR_DTYPES = {"F32": np.float32, "F16": np.float16}
QUANTIZED_TYPES = GGUF_QUANTIZES + K_QUANTS
LAYER_LINEARS = tuple(f"{name}.weight" for name in LAYER_TENSORS if name.endswith("_proj"))


def _check_type(kind: str | None, what: str, quantized: bool) -> None:
    allowed = tuple(TENSOR_DTYPES) + (QUANTIZED_TYPES if quantized else ())
    if kind is not None and kind not in allowed:
        raise ValueError(f"GGUF {what} type {kind!r} is not written by lutlm; choose {', '.join(allowed)}")


def save_gguf(checkpoint: Checkpoint, path: str | os.PathLike, tensor_type: str = "F32",
              linear_type: str | None = None, head_type: str | None = None) -> None:
    """Write `checkpoint` as a GGUF: matrices in `tensor_type` (F32 or F16), norms F32; the
    decoder-layer linears in `linear_type` and the output head (lm_head, or the embedding
    where they are tied) in `head_type` where given, either of them F32, F16 or a quantized
    ggml type (Q4_0 ... Q8_0, Q2_K ... Q6_K, TQ1_0, TQ2_0; rows must be whole blocks)."""
    _check_type(tensor_type, "tensor", quantized=False)
    _check_type(linear_type, "linear", quantized=True)
    _check_type(head_type, "head", quantized=True)
    if checkpoint.packed:
        raise ValueError(f"{checkpoint.source}: a packed low-bit model cannot be written as GGUF")
    spec = checkpoint.tokenizer
    if spec.gguf_model != "gpt2":
        raise ValueError(f"{checkpoint.source}: only GGUF byte-level BPE vocabularies can be written to GGUF")
    c = checkpoint.config
    writer = GGUFWriter(os.fspath(path), "llama")
    writer.add_name(c.name or "lutlm")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if c.rope_scaling:
        if c.rope_scaling.get("rope_type", c.rope_scaling.get("type")) != "linear":
            raise ValueError(f"rope scaling {c.rope_scaling} cannot be written to GGUF by lutlm")
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_scaling["factor"])
    writer.add_tokenizer_model(spec.gguf_model)
    if spec.gguf_pre:
        writer.add_tokenizer_pre(spec.gguf_pre)
    writer.add_token_list(spec.tokens)
    writer.add_token_merges(spec.merges)
    writer.add_token_types(spec.token_types)
    if spec.bos_token_id is not None:
        writer.add_bos_token_id(spec.bos_token_id)
    if spec.eos_token_id is not None:
        writer.add_eos_token_id(spec.eos_token_id)
    writer.add_add_bos_token(spec.add_bos_token)
    if spec.chat_template:
        writer.add_chat_template(spec.chat_template)

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in checkpoint.tensors.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if name.endswith("self_attn.q_proj.weight"):
            array = permute_rotary(array, c.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = permute_rotary(array, c.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        kind = tensor_type
        if name.startswith("model.layers.") and name.endswith(LAYER_LINEARS):
            kind = linear_type or tensor_type
        elif name == ("model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"):
            kind = head_type or tensor_type
        if array.ndim == 1:  # norm weights stay F32, as llama.cpp's converter keeps every 1-D tensor
            writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
        elif kind in TENSOR_DTYPES:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=TENSOR_DTYPES[kind]))
        else:
            writer.add_tensor(gguf_name, quantize(array, kind), raw_dtype=GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
