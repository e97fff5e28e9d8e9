"""Argument groups that several commands share (the CLI's own and the bench modules')."""

from __future__ import annotations

import argparse
import math


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file, Hugging Face folder or lutlm packed folder "
                                         "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("-t", "--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--backend", choices=["reference", "cpu", "cuda"],
                   help="kernels for low-bit weights (default: the fastest available). A GGUF's linears run "
                        "on them from their own blocks; 'reference' keeps them float (plain PyTorch), for checks")
    p.add_argument("--layout-cache", metavar="DIR",
                   help="keep a GGUF's weights in the CPU kernels' layout in DIR, so that the next load maps them "
                        "instead of laying them out again (default: $LUTLM_LAYOUT_CACHE, else none)")


def bounded(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            what: str = ""):
    """An argparse `type`: a finite int or float within [low, high] ((low, high] if low_open),
    refused by argparse (a usage line and exit status 2) otherwise: nan, inf and a value out
    of range are named instead of running."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            lower = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            upper = "" if high is None else f"<= {high:g}"
            expected = " and ".join(filter(None, [lower, upper])) or "finite"
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected a finite number {expected}{what}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def even_context(text: str) -> int:
    """--ctx of perplexity: an even number of tokens >= 2 (its second half is scored)."""
    value = bounded(int, 2, 1 << 24)(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"{text} is odd; expected an even number of tokens")
    return value
