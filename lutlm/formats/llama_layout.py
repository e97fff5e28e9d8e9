"""The tensors a Llama checkpoint holds, under Hugging Face names, and their shapes.

Every loader checks what it read against this list, so that a file that does not
fit its own config is refused at load time with the tensor named.
"""

from __future__ import annotations

import re

from lutlm.config import ModelConfig

LAYER_TENSORS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm",
)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape ([out, in] for linears) of every tensor the model needs; lm_head only if untied."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = {
        "self_attn.q_proj": (q_rows, hidden),
        "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden),
        "self_attn.o_proj": (hidden, q_rows),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
    }
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    for i in range(config.num_hidden_layers):
        for name in LAYER_TENSORS:
            shapes[f"model.layers.{i}.{name}.weight"] = per_layer[name]
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def check_layer_count(names, config: ModelConfig, source: str) -> None:
    """The config's layer count against the layers the file holds tensors for, before anything
    is made per layer: an edited count of 10^9 is refused, not looped over."""
    layers = {}
    for name in names:
        match = LAYER_NAME.match(name)
        if match:
            layers.setdefault(int(match.group(1)), name)
    n_layers = config.num_hidden_layers
    beyond = [i for i in layers if i >= n_layers]
    if beyond:
        raise ValueError(f"{source}: tensor {layers[max(beyond)]} is for layer {max(beyond)}, but num_hidden_layers "
                         f"is {n_layers} (layers 0 to {n_layers - 1})")
    if n_layers > len(layers):
        raise ValueError(f"{source}: num_hidden_layers is {n_layers}, but the file holds tensors for {len(layers)} layers")


def check_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig, source: str) -> None:
    """Refuse missing tensors and tensors whose shape disagrees with the config.

    Tensors the model does not use are the caller's business (each format knows its extras).
    """
    check_layer_count(shapes, config, source)
    expected = expected_shapes(config)
    missing = [name for name in expected if name not in shapes]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{source}: missing tensor {', '.join(missing[:3])}{more}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(
                f"{source}: shape mismatch for {name}: the file has {tuple(shapes[name])}, "
                f"the config (hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
                f"{config.num_attention_heads} heads, {config.num_key_value_heads} kv heads, "
                f"head_dim {config.head_dim}, vocab {config.vocab_size}) implies {shape}"
            )
