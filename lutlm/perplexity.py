"""Perplexity over a text file, the way llama.cpp's `perplexity` tool computes it.

The text is tokenized whole and cut into consecutive chunks of `ctx` tokens. Each chunk
is run from an empty cache and only its second half is scored (each scored token has at
least ctx/2 tokens of context), as llama.cpp does, so that figures can be set beside its
own. Where the tokenizer adds BOS, the chunk's first token is replaced by BOS, as there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from lutlm.model import model_device

# The held-out text (WikiText-2 raw, test split) beside the repository, found from the package's
# own place so that `lutlm ppl` and calibration work from any current directory.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.normpath(os.path.join(PACKAGE_ROOT, "..", "shared", "data", "wikitext-2-raw-test.txt"))


@dataclass
class PerplexityResult:
    perplexity: float
    nll_std_error: float  # standard error of the mean negative log-likelihood
    tokens_scored: int
    chunks: int
    ctx: int

    @property
    def ppl_interval(self) -> tuple[float, float]:
        """An approximate 95% interval, from the standard error of the mean NLL."""
        mean = math.log(self.perplexity)
        return math.exp(mean - 1.96 * self.nll_std_error), math.exp(mean + 1.96 * self.nll_std_error)


def check_text_file(path: str, option: str = "--text") -> None:
    """Refuse a text that cannot be read, before a model is loaded for it."""
    if not os.path.exists(path):
        hint = (" (the default, WikiText-2's test split, is read from beside the repository; pass a text file with "
                f"{option})") if os.path.abspath(path) == DEFAULT_TEXT else ""
        raise FileNotFoundError(f"{path}: no such text file{hint}")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a file; {option} names a UTF-8 text file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not readable")


def read_text(path: str) -> str:
    check_text_file(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:  # keep CRLF: tokens must not depend on the OS
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def chunk_starts(n_tokens: int, ctx: int, max_chunks: int | None, exclude: tuple[int, int] | None) -> list[int]:
    """Start offsets of the chunks to score, skipping any that overlap the `exclude` token range
    (for example the calibration slice a quantizer saw)."""
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"--max-chunks is {max_chunks}; expected at least 1 (leave it out to score every chunk)")
    starts = []
    for start in range(0, n_tokens - ctx + 1, ctx):
        if exclude and start < exclude[1] and exclude[0] < start + ctx:
            continue
        starts.append(start)
    return starts if max_chunks is None else starts[:max_chunks]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target under float logits [T, vocab]."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def score_chunks(
    chunk_logits: Callable[[list[int]], torch.Tensor],
    tokens: list[int],
    ctx: int,
    max_chunks: int | None = None,
    exclude: tuple[int, int] | None = None,
    bos_id: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Score with any model given as `chunk_logits(chunk tokens) -> logits [ctx, vocab]`.

    Shared by lutlm's model and the llama.cpp peer, so both are scored on identical tokens.
    """
    if ctx < 2 or ctx % 2:
        raise ValueError(f"context must be an even number >= 2, got {ctx}")
    starts = chunk_starts(len(tokens), ctx, max_chunks, exclude)
    if not starts:
        raise ValueError(f"the text has {len(tokens)} tokens, too few for one chunk of {ctx}")
    first = ctx // 2
    nlls = []
    bar = tqdm(starts, desc=f"perplexity (ctx {ctx})", unit="chunk", disable=not progress)
    for start in bar:
        chunk = tokens[start : start + ctx]
        if bos_id is not None:
            chunk = [bos_id] + chunk[1:]
        logits = chunk_logits(chunk)
        targets = torch.tensor(chunk[first + 1 :], dtype=torch.long, device=logits.device)
        nlls.append(token_nll(logits[first : ctx - 1], targets).cpu())
        running = torch.cat(nlls)
        bar.set_postfix(ppl=f"{math.exp(running.mean().item()):.4f}")
    all_nll = torch.cat(nlls).double()
    n = all_nll.numel()
    std_error = (all_nll.std().item() / math.sqrt(n)) if n > 1 else 0.0
    return PerplexityResult(math.exp(all_nll.mean().item()), std_error, n, len(starts), ctx)


def perplexity_tokens(tokenizer, text: str) -> tuple[list[int], int | None]:
    """The whole text's tokens, and the BOS id that replaces each chunk's first token (if any)."""
    return tokenizer.encode(text, add_bos=False), (tokenizer.bos_id if tokenizer.add_bos else None)


@torch.inference_mode()
def model_perplexity(model, tokenizer, text: str, ctx: int = 512, max_chunks: int | None = None,
                     exclude: tuple[int, int] | None = None, progress: bool = True) -> PerplexityResult:
    tokens, bos = perplexity_tokens(tokenizer, text)
    model.setup_cache(1, ctx)

    def chunk_logits(chunk: list[int]) -> torch.Tensor:
        return model(torch.tensor([chunk], dtype=torch.long, device=model_device(model)), 0)[0]

    return score_chunks(chunk_logits, tokens, ctx, max_chunks, exclude, bos, progress)
