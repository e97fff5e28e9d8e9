"""The KV cache: keys and values of a fixed number of sequences ("slots"), owned by whoever
generates (a Generator, the serving engine) and passed to `Transformer.forward` and the decoders,
as gpt-fast's KVCache or mlx-lm's cache list are. A model may serve many caches.

Each layer holds one tensor of keys and one of values, [slots, n_kv_heads, max_seq, head_dim]:
slot s of a layer is a contiguous [n_kv_heads, max_seq, head_dim] block, the layout the C
decode attention (runtime_csrc/decode_ops.cpp) reads. Which positions of a slot are valid is
the owner's to track; everything is allocated up front, so a step never allocates.
"""

from __future__ import annotations

import torch

from lutlm.config import ModelConfig


def kv_bytes(config: ModelConfig, slots: int, max_seq: int, dtype: torch.dtype) -> int:
    """Bytes a KVCache of this size holds (keys and values of every layer)."""
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return slots * max_seq * per_position * torch.empty(0, dtype=dtype).element_size()


class KVCache:
    def __init__(self, config: ModelConfig, slots: int, max_seq: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if slots < 1 or max_seq < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, got {slots} x {max_seq}")
        if max_seq > config.max_position_embeddings:
            raise ValueError(f"context {max_seq} exceeds the model's {config.max_position_embeddings} positions")
        shape = (slots, config.num_key_value_heads, max_seq, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.slots, self.max_seq, self.dtype = slots, max_seq, dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def fits(self, slots: int, max_seq: int, dtype: torch.dtype | None = None) -> bool:
        return slots <= self.slots and max_seq <= self.max_seq and dtype in (None, self.dtype)

    def check(self, slots: list[int] | range, end: int) -> None:
        """A clear error unless every slot exists and positions up to `end` fit."""
        bad = [s for s in slots if not 0 <= s < self.slots]
        if bad or end > self.max_seq:
            raise ValueError(f"slots {list(slots)} at positions up to {end}: that does not fit the KV cache "
                             f"({self.slots} slots x {self.max_seq} positions)")
