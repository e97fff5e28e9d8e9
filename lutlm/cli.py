"""The `lutlm` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from lutlm.arguments import add_model_args, bounded, even_context

DEMO_PROMPT = "What is the capital of France? Answer in one sentence, then name one famous landmark there."


def set_threads(n: int | None) -> None:
    """`-t N` (lutlm.loader.set_threads; here for the bench modules that call it)."""
    from lutlm.loader import set_threads as set_loader_threads

    set_loader_threads(n)


def load(args):
    """The model, tokenizer and checkpoint a command runs on (lutlm.loader.load_for_command)."""
    from lutlm.loader import load_for_command

    return load_for_command(args)


def describe(checkpoint, model) -> str:
    """What a model is: architecture, shapes, storage types, size and bits per weight."""
    from lutlm.linear import PackedLinear, linear_summary

    c = checkpoint.config
    lines = [
        f"model:        {c.name or os.path.basename(checkpoint.source)}",
        f"source:       {checkpoint.source}",
        f"architecture: {c.architecture}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
        f"MLP {c.intermediate_size}, heads {c.num_attention_heads} (kv {c.num_key_value_heads}), "
        f"head dim {c.head_dim}, vocab {c.vocab_size}, context {c.max_position_embeddings}",
        f"rope:         theta {c.rope_theta:g}" + (f", scaling {c.rope_scaling}" if c.rope_scaling else ""),
        f"embeddings:   {'tied' if c.tie_word_embeddings else 'separate output head'}",
    ]
    types = Counter(checkpoint.tensor_types.values())
    lines.append("tensor types: " + ", ".join(f"{t} x{n}" for t, n in types.most_common()))
    n_params = sum(p.numel() for p in model.parameters())
    n_params += sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, PackedLinear))
    lines.append(f"parameters:   {n_params / 1e6:.1f} M")
    stored_bits = checkpoint_storage_bits(checkpoint)
    if stored_bits:
        lines.append(f"file size:    {stored_bits / 8 / 2**20:.1f} MiB, {stored_bits / n_params:.2f} bits per weight")
    if checkpoint.quantization:
        lines.append(f"quantization: {checkpoint.quantization}")
    lines.append(f"linears:      {linear_summary(model, checkpoint.tensor_types)}")
    return "\n".join(lines)


def checkpoint_storage_bits(checkpoint) -> int:
    path = checkpoint.source
    if os.path.isfile(path):
        return os.path.getsize(path) * 8
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(".safetensors"))
    return total * 8


def cmd_info(args) -> None:
    model, _, checkpoint = load(args)
    print(describe(checkpoint, model))


def _sampling(args):
    from lutlm.generate import SamplingParams

    return SamplingParams(
        max_new_tokens=args.n_predict, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repeat_penalty, stop=args.stop or [], seed=args.seed,
    )


def _print_speed(stats) -> None:
    print(
        f"\n[prompt {stats.prompt_tokens} tokens, prefill {stats.prefill_tokens_per_second:.1f} tokens/s | "
        f"generated {stats.generated_tokens} tokens, decode {stats.decode_tokens_per_second:.1f} tokens/s | "
        f"finish: {stats.finish_reason}]",
        file=sys.stderr,
    )


def _stream(generator, prompt_ids, params) -> str:
    pieces = []
    for piece in generator.stream_text(prompt_ids, params):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces)


def cmd_generate(args) -> None:
    from lutlm.generate import Generator

    model, tokenizer, _ = load(args)
    generator = Generator(model, tokenizer, args.ctx)
    _stream(generator, tokenizer.encode(args.prompt), _sampling(args))
    _print_speed(generator.stats)


def cmd_chat(args) -> None:
    from lutlm.generate import Generator

    model, tokenizer, _ = load(args)
    generator = Generator(model, tokenizer, args.ctx)
    params = _sampling(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: an empty line or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
        answer = _stream(generator, prompt, params)
        _print_speed(generator.stats)
        messages.append({"role": "assistant", "content": answer})


def cmd_demo(args) -> None:
    """The quick start's main job: what the bundled model is, one chat answer, its speed."""
    import torch

    from lutlm.generate import Generator, SamplingParams

    model, tokenizer, checkpoint = load(args)
    print(describe(checkpoint, model))
    print(f"threads:      {torch.get_num_threads()}")
    print(f"\nuser: {DEMO_PROMPT}\nassistant: ", end="", flush=True)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": DEMO_PROMPT}]))
    generator = Generator(model, tokenizer, args.ctx)
    _stream(generator, prompt, SamplingParams(max_new_tokens=args.n_predict))
    s = generator.stats
    print(f"\nprefill: {s.prefilled_tokens} tokens at {s.prefill_tokens_per_second:.1f} tokens/s")
    print(f"decode:  {s.generated_tokens} tokens at {s.decode_tokens_per_second:.1f} tokens/s")


def cmd_ppl(args) -> None:
    from lutlm.perplexity import model_perplexity, perplexity_tokens, read_text, score_chunks

    text = read_text(args.text)  # a missing text is refused before the model loads
    model, tokenizer, checkpoint = load(args)
    exclude = None
    calibration = (checkpoint.quantization or {}).get("calibration")
    if calibration and os.path.basename(calibration.get("text", "")) == os.path.basename(args.text):
        exclude = tuple(calibration["token_range"])
        print(f"leaving out tokens {exclude[0]}..{exclude[1]}: the quantizer calibrated on them", file=sys.stderr)
    results = {"lutlm": model_perplexity(model, tokenizer, text, args.ctx, args.max_chunks, exclude)}
    if args.peer:
        from lutlm import peer

        if not peer.available():
            raise RuntimeError("--peer needs llama-cpp-python: pip install -e '.[peer]' (or make peer)")
        if not os.path.isfile(checkpoint.source):
            raise ValueError("--peer runs llama.cpp on the same GGUF file; -m must name a GGUF file")
        llama = peer.LlamaCpp(checkpoint.source, n_ctx=args.ctx, n_threads=args.threads)
        tokens, bos = perplexity_tokens(tokenizer, text)  # the very tokens lutlm scored
        results["llama.cpp"] = score_chunks(llama.logits, tokens, args.ctx, args.max_chunks, exclude, bos)
    for name, r in results.items():
        low, high = r.ppl_interval
        print(f"{name}: perplexity {r.perplexity:.4f} (95% interval {low:.4f}-{high:.4f}) over "
              f"{r.tokens_scored} scored tokens in {r.chunks} chunks of {r.ctx}")
    if args.peer:
        ratio = results["lutlm"].perplexity / results["llama.cpp"].perplexity
        print(f"lutlm / llama.cpp = {ratio:.5f} ({(ratio - 1) * 100:+.3f}%)")


def add_sampling_args(p: argparse.ArgumentParser, n_predict: int) -> None:
    p.add_argument("-n", "--n-predict", type=bounded(int, 0, 1 << 24), default=n_predict, help="maximum new tokens")
    p.add_argument("--temperature", type=bounded(float, 0), default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=bounded(int, 0), default=0, help="0 means no limit")
    p.add_argument("--top-p", type=bounded(float, 0, 1, low_open=True), default=1.0)
    p.add_argument("--repeat-penalty", type=bounded(float, 0, low_open=True), default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=bounded(int, 0, 2**64 - 1))
    p.add_argument("--ctx", type=bounded(int, 1, 1 << 24), default=2048, help="context length to allocate")


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from lutlm import serve  # FastAPI and uvicorn load only for the command that serves
    except ImportError as e:  # an optional extra: say which, not where the import failed
        if (e.name or "").split(".")[0] in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise SystemExit("lutlm serve needs FastAPI and uvicorn: pip install 'lutlm[serve]'") from None
        raise
    serve.run(args)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--ctx", type=int, default=2048,
                   help="context length of each slot: a request's prompt + max_tokens must fit")
    p.add_argument("-np", "--parallel", type=int, default=4,
                   help="requests generated together (KV cache slots), decoded as one batch")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for a slot while all generate; beyond that: 429")
    p.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    p.add_argument("--step-tokens", type=int, default=10,
                   help="rows per engine step: the decoding requests' tokens, then prompt chunks in what is left "
                        "(bounds the token gaps while prompts are prefilled)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the largest request body accepted")
    p.add_argument("--model-id", help="the name clients give as `model` (default: the model file's name "
                                      "without its extension)")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lutlm", description="Low-bit LLM inference by table lookup")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe a model")
    add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="continue a prompt")
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True)
    add_sampling_args(p, n_predict=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model's chat template")
    add_model_args(p)
    p.add_argument("--system", help="system message")
    add_sampling_args(p, n_predict=256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="describe the model, answer one chat prompt, report speed")
    add_model_args(p)
    p.add_argument("-n", "--n-predict", type=bounded(int, 0, 1 << 24), default=64)
    p.add_argument("--ctx", type=bounded(int, 1, 1 << 24), default=512)
    p.set_defaults(func=cmd_demo)

    from lutlm.perplexity import DEFAULT_TEXT

    p = sub.add_parser("ppl", help="perplexity over a text file")
    add_model_args(p)
    p.add_argument("--text", default=DEFAULT_TEXT, help=f"text file (default: {DEFAULT_TEXT})")
    p.add_argument("--ctx", type=even_context, default=512, help="tokens per chunk, an even number (default 512)")
    p.add_argument("--max-chunks", type=bounded(int, 1), help="score at most this many chunks (default: all)")
    p.add_argument("--peer", action="store_true",
                   help="also score llama.cpp on the same GGUF and the same tokens, in this run")
    p.set_defaults(func=cmd_ppl)

    add_serve_parser(sub)

    from lutlm.quantize import cli as quantize_cli

    quantize_cli.add_parser(sub)

    from lutlm.bench import e2e, gpu_decode, kernels, ppl_table, serve_load

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    serve_load.add_parser(bench)
    gpu_decode.add_parser(bench)
    e2e.add_parser(bench)
    kernels.add_parser(bench)
    ppl_table.add_parser(bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, RuntimeError, MemoryError) as e:  # OSError: a file unreadable, a disk full
        print(f"lutlm: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("lutlm: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
