"""A token embedding kept in its GGUF block type, rows dequantized when looked up.

llama.cpp does the same (get_rows): a 7B model's embedding is 0.5 GB as float32 and
70-140 MB in its file's type, and a step reads one row of it. The rows are dequantized by
the reference decoders (lutlm.formats.ggml_quants), so a looked-up row equals the float
path's row bit for bit. The blocks are a view of the memory-mapped file: only the rows
looked up are ever read from disk.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lutlm.formats.ggml_quants import dequantize


class BlockEmbedding(nn.Module):
    def __init__(self, blocks: np.ndarray, ggml_type: str, shape: tuple[int, int]):
        super().__init__()
        vocab, hidden = shape
        if blocks.size % vocab:
            raise ValueError(f"an embedding of {blocks.size} bytes does not split into {vocab} rows")
        self.rows = blocks.reshape(vocab, blocks.size // vocab)  # one row's blocks per token
        self.ggml_type = ggml_type
        self.num_embeddings, self.embedding_dim = vocab, hidden

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def lookup(self, ids: np.ndarray) -> torch.Tensor:
        """float32 [len(ids), hidden] for token ids in range (checked)."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            raise ValueError(f"a token id is outside the vocabulary of {self.num_embeddings}")
        return dequantize(self.rows[ids], self.ggml_type, (len(ids), self.embedding_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.reshape(-1).cpu().numpy()
        return self.lookup(ids).view(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.ggml_type} blocks"
