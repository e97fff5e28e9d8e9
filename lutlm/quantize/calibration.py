"""Calibration data for AWQ and GPTQ: token sequences cut from a text file, and the
statistics of each linear layer's inputs on them.

Which tokens: the text is tokenized whole, exactly as perplexity evaluation tokenizes it,
and the calibration slice is its LAST n_sequences * seq_len tokens. The slice's token range
is recorded in the packed model's metadata ("calibration": {"text", "token_range"}), and
perplexity on the same text skips every chunk overlapping it. Being at the end, the
slice never meets an evaluation limited to the first chunks (--max-chunks). With the
defaults (32 x 512 tokens) on WikiText-2 test, that is the last 16384 of its tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lutlm.perplexity import DEFAULT_TEXT, read_text

DEFAULT_SEQUENCES = 32
DEFAULT_SEQ_LEN = 512


@dataclass
class CalibrationSet:
    tokens: torch.Tensor  # long [n_sequences, seq_len]
    text_path: str
    token_range: tuple[int, int]  # [start, end) in the tokens of the whole text

    def describe(self) -> dict:
        n, seq_len = self.tokens.shape
        return {
            "text": self.text_path,
            "token_range": list(self.token_range),
            "sequences": n,
            "seq_len": seq_len,
        }


def calibration_set(
    tokenizer,
    text_path: str = DEFAULT_TEXT,
    n_sequences: int = DEFAULT_SEQUENCES,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> CalibrationSet:
    """The last n_sequences * seq_len tokens of the text, as [n_sequences, seq_len]."""
    if n_sequences < 1 or seq_len < 2:
        raise ValueError(f"calibration needs at least one sequence of 2 tokens, got {n_sequences} x {seq_len}")
    tokens = tokenizer.encode(read_text(text_path), add_bos=False)
    need = n_sequences * seq_len
    if len(tokens) < need:
        raise ValueError(
            f"{text_path} has {len(tokens)} tokens, fewer than the {need} that calibration needs "
            f"({n_sequences} sequences of {seq_len})"
        )
    start = len(tokens) - need
    sequences = torch.tensor(tokens[start:], dtype=torch.long).view(n_sequences, seq_len)
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        sequences[:, 0] = tokenizer.bos_id  # as perplexity feeds its chunks
    return CalibrationSet(sequences, text_path, (start, len(tokens)))


class InputStats:
    """Running second moment E[x x^T] (GPTQ's Hessian, AWQ's error metric) and mean |x|
    (AWQ's channel salience) of one linear layer's inputs."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        # float64 sums: tens of thousands of tokens are added, one batch product at a time
        self.xtx = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.xtx += x.T @ x  # widened to float64 inside the addition: no float64 copy of the product
        self.abs_sum += x.abs().sum(0)
        self.count += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx.float().div_(self.count)  # not xtx / count: a float64 temporary of K x K

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / self.count).float()


@contextlib.contextmanager
def record_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, InputStats]]:
    """Accumulate InputStats of each module's first input while the block runs."""
    stats = {name: InputStats(module.in_features, module.weight.device) for name, module in modules.items()}
    hooks = [
        module.register_forward_pre_hook(lambda _module, args, s=stats[name]: s.add(args[0]))
        for name, module in modules.items()
    ]
    try:
        yield stats
    finally:
        for hook in hooks:
            hook.remove()
