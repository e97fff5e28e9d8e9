"""A tiny random Llama checkpoint for the quantization and packed-folder tests.

Shapes exercise the group-size rules: q/k/v/o/gate/up read K = 64 inputs, down_proj reads
K = 96 (a multiple of 32 that 64 does not divide); grouped-query attention (4 heads, 2 kv).
"""

import torch

from lutlm.config import ModelConfig
from lutlm.formats import Checkpoint, TokenizerSpec
from lutlm.model import Transformer


def tiny_checkpoint(seed: int = 0) -> Checkpoint:
    config = ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
    )
    torch.manual_seed(seed)
    model = Transformer(config)
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    for name, t in tensors.items():
        if name.endswith("norm.weight"):  # not all ones, so that folding scales into them is visible
            t.uniform_(0.5, 1.5)
    tokenizer = TokenizerSpec(gguf_model="gpt2", tokens=[f"t{i}" for i in range(128)], merges=[],
                              token_types=[1] * 128, bos_token_id=1, eos_token_id=2, chat_template="{{ x }}")
    return Checkpoint(config, tensors, tokenizer, source="tiny", tensor_types={n: "F32" for n in tensors})
