"""`lutlm quantize`: quantize a model's linear layers and write a packed model folder."""

from __future__ import annotations

import argparse
import time

from lutlm.formats.packed_model import FLOAT_DTYPES
from lutlm.quantize.calibration import DEFAULT_SEQ_LEN, DEFAULT_SEQUENCES
from lutlm.quantize.config import DEFAULT_CODE_LR, METHODS, TERNARY_TAKES_NO_GROUP, QuantConfig


def parse_group_size(text: str) -> int | None:
    """A group size: a positive integer, or 'row' for one group per row."""
    if text == "row":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"group size must be an integer or 'row', not {text!r}") from None


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig asked for; uniform methods default to 4 bits and groups of 64."""
    if args.method == "ternary":
        if args.group_size is not None:
            raise ValueError(TERNARY_TAKES_NO_GROUP)
        group_size = None
    else:
        group_size = 64 if args.group_size is None else parse_group_size(args.group_size)
    return QuantConfig(
        method=args.method,
        bits=args.bits,
        group_size=group_size,
        symmetric=args.symmetric,
        group_fallback=args.group_fallback,
        ternary_group=args.ternary_group,
        act_order=args.act_order,
        damp=args.damp,
        quantize_head=args.quantize_head,
        tune_steps=args.tune_steps,
        tune_sequences=args.tune_sequences,
        tune_codes=args.tune_codes,
        tune_code_lr=args.tune_code_lr,
        tune_generated=args.tune_generated,
    )


def cmd_quantize(args: argparse.Namespace) -> None:
    from lutlm.formats import load_checkpoint
    from lutlm.formats.packed_model import check_output_folder, save_packed_model
    from lutlm.loader import default_model_path
    from lutlm.perplexity import check_text_file
    from lutlm.quantize.calibration import calibration_set
    from lutlm.quantize.model_quantizer import quantize_checkpoint
    from lutlm.tokenizer import Tokenizer

    config = config_from_args(args)  # refuse a bad request before loading anything
    check_output_folder(args.output, replace=args.force)  # and an output that would lose a file
    if config.needs_calibration:
        check_text_file(args.calib_text, "--calib-text")
        if args.calib_sequences < 1 or args.calib_seq_len < 2:
            raise ValueError(f"--calib-sequences {args.calib_sequences} and --calib-seq-len {args.calib_seq_len}: "
                             "expected at least one sequence of at least 2 tokens")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: PyTorch sees no CUDA GPU here")
    start = time.perf_counter()
    checkpoint = load_checkpoint(args.model or default_model_path())
    calibration = None
    if config.needs_calibration:
        calibration = calibration_set(Tokenizer(checkpoint.tokenizer), args.calib_text, args.calib_sequences,
                                      args.calib_seq_len)
        first, end = calibration.token_range
        print(f"calibration: tokens {first}..{end} of {args.calib_text} "
              f"({args.calib_sequences} x {args.calib_seq_len}); perplexity on it leaves them out")
    quantized, result = quantize_checkpoint(checkpoint, config, calibration, device=args.device)
    save_packed_model(args.output, quantized, args.float_dtype, replace=args.force)
    fallbacks = sorted({f"K={w.in_features}: g{w.group_size}" for w in quantized.packed.values()})
    print(f"quantized {len(quantized.packed)} linear layers of {checkpoint.source} ({config.describe()}; "
          f"group sizes used {', '.join(fallbacks)})")
    print(f"bits per weight: {result.bits_per_weight:.3f} (fp16 scales and zeros included)")
    print(f"time: {result.seconds:.1f} s quantizing, {time.perf_counter() - start:.1f} s in all; wrote {args.output}")


def add_parser(subparsers) -> None:
    from lutlm.perplexity import DEFAULT_TEXT

    p = subparsers.add_parser("quantize", help="quantize a model to low-bit packed weights")
    p.add_argument("-m", "--model", help="float source: GGUF file or Hugging Face folder (default: the bundled model)")
    p.add_argument("-o", "--output", required=True,
                   help="packed model folder to write: a new or empty folder (written beside it, then renamed into "
                        "place once complete)")
    p.add_argument("--force", action="store_true",
                   help="replace a packed model that lutlm wrote in the -o folder (a folder holding any other file "
                        "is still refused)")
    p.add_argument("--method", choices=METHODS, default="gptq",
                   help="quantizer (default: gptq); awq-gptq folds AWQ's scales, then rounds by GPTQ")
    p.add_argument("--bits", type=int, help="1, 2, 3 or 4 (default 4; ternary is stored in 2)")
    p.add_argument("--group-size", help="inputs per scale: 32, 64, 128 ... or 'row' (default 64; not for ternary)")
    p.add_argument("--group-fallback", action="store_true",
                   help="where the group size does not divide a layer's K, use the largest multiple of 32 "
                        "below it that does (96 for K=576 and 128)")
    p.add_argument("--symmetric", action="store_true", help="grid symmetric about 0 (no zero-point term)")
    p.add_argument("--ternary-group", type=int, help="ternary: one absmean scale per group of this many inputs "
                                                      "(default: one per tensor)")
    p.add_argument("--act-order", action="store_true",
                   help="gptq, awq-gptq: quantize columns by decreasing activation energy")
    p.add_argument("--damp", type=float, default=0.01,
                   help="gptq, awq-gptq: Hessian damping, fraction of its mean diagonal")
    p.add_argument("--tune-steps", type=int, default=0,
                   help="then tune the scales, zeros and norms end to end for this many steps, by KL divergence "
                        "to the source model (about 10 s a step of 2 sequences for SmolLM2 on 2 cores, 0.35 s a "
                        "step of 16 on an H200; default 0: no tuning)")
    p.add_argument("--tune-sequences", type=int, default=2, help="calibration sequences per tuning step (default 2)")
    p.add_argument("--tune-codes", action="store_true",
                   help="tuning also moves the integer codes (straight-through rounding); pays off over hundreds "
                        "of steps, so on a GPU")
    p.add_argument("--tune-code-lr", type=float, default=DEFAULT_CODE_LR,
                   help=f"with --tune-codes: Adam's learning rate of the code offsets, in code units (default "
                        f"{DEFAULT_CODE_LR:g}); a longer run moves codes further at the same rate")
    p.add_argument("--tune-generated", type=int, default=0,
                   help="add this many sequences sampled from the source model (each continuing a few tokens of "
                        "the calibration text) to the tuning data: the calibration sequences alone are "
                        "memorized over long runs (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the calibrated quantizers and the tuning run: cpu (default) or cuda; the result is "
                        "the same packed model up to float rounding")
    p.add_argument("--quantize-head", action="store_true", help="also quantize lm_head (default: kept in float)")
    p.add_argument("--float-dtype", choices=list(FLOAT_DTYPES), default="float16",
                   help="storage of the float matrices kept (embedding, float lm_head)")
    p.add_argument("--calib-text", default=DEFAULT_TEXT, help=f"calibration text (default: {DEFAULT_TEXT})")
    p.add_argument("--calib-sequences", type=int, default=DEFAULT_SEQUENCES, help="calibration sequences")
    p.add_argument("--calib-seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per calibration sequence")
    p.set_defaults(func=cmd_quantize)
