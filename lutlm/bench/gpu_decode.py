"""`lutlm bench gpu-decode`: decode speed on the GPU, lutlm's packed kernels against fp16
PyTorch of the same shape.

Two shapes, with random weights of a trained model's scale: SmolLM2-135M (the bundled model's
shape), packed at 4 bits in groups of 64, and Llama-2-7B (32 layers, hidden 4096, MLP 11008),
packed at 4 and 2 bits in groups of 128, each against its fp16 twin. Embeddings, norms and
the output head stay fp16 in every variant; only the linears change.

A decode step is one token at context position `--position` (its KV cache allocated up to
there) through lutlm.gpu_decode, which captures it once in a CUDA graph and replays it, so
that the Python launcher stays out of the figure; tokens/s = 1 / step time. Each row also
gives the step's products alone (their share of the step) and the same step through
model.forward, graph-replayed too (the path before lutlm.gpu_decode). Where the bundled model
and its GGUF reader are installed, it is also quantized (RTN, 4 bits, groups of 64), generates
greedily through lutlm.generate on the GPU, and its tokens are compared with the reference
backend's on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from lutlm.config import ModelConfig

SMOLLM2_135M = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                           tie_word_embeddings=True, rope_theta=100000.0, name="SmolLM2-135M-shaped (random weights)")
LLAMA2_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                        name="llama2-7b-shaped (random weights)")


def add_parser(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("gpu-decode", help="GPU decode tokens/s: packed kernels against fp16 PyTorch")
    p.add_argument("--position", type=int, default=256, help="context position of the timed decode step")
    p.add_argument("--tokens", type=int, default=32, help="tokens the bundled model generates greedily")
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/gpu_decode_<device>.json)")
    p.set_defaults(func=run)


@torch.inference_mode()
def decode_step_us(model, position: int) -> dict:
    """Step times in microseconds, each (median, p25, p75): through lutlm.gpu_decode (the
    headline), its products alone, and through model.forward, each replayed from a CUDA graph;
    and the device memory the model holds before and after the decoder is built (MiB)."""
    from lutlm.gpu_decode import GpuDecoder
    from lutlm.bench.gpu_timing import time_calls, time_replays

    model.setup_cache(1, position + 1)
    token = torch.full((1, 1), 7, dtype=torch.long, device="cuda")
    forward = time_calls([lambda: model(token, position, last_logits_only=True)], launches=8, repeats=10)
    torch.cuda.empty_cache()
    memory_before = torch.cuda.memory_allocated() / 2**20
    decoder = GpuDecoder(model)
    torch.cuda.empty_cache()
    memory_after = torch.cuda.memory_allocated() / 2**20
    decoder(7, position)  # captures the step's graph
    steps = 8

    def replay_steps() -> None:
        for _ in range(steps):
            decoder.graph.replay()

    step = time_replays(replay_steps, steps, repeats=10)
    products = time_calls([decoder.products_only], launches=8, repeats=10)
    del decoder
    return {"decoder": step, "products": products, "forward": forward,
            "memory_mib": {"model": round(memory_before), "with_decoder": round(memory_after)}}


def random_model(config: ModelConfig):
    """A Transformer on the GPU in fp16 with N(0, 0.02) weights and unit norms."""
    from lutlm.model import Transformer, rope_inverse_frequencies

    with torch.device("meta"):
        model = Transformer(config)
    model.to(torch.float16).to_empty(device="cuda")
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02)
    model.inv_freq = rope_inverse_frequencies(config).cuda()
    return model.eval()


def on_cpu(w):
    return dataclasses.replace(w, planes=w.planes.cpu(), scales=w.scales.cpu(), zeros=w.zeros.cpu())


def synthetic_rows(config: ModelConfig, position: int, bits_list: tuple[int, ...], group: int) -> list[dict]:
    """Decode step of a random model of this shape in fp16, then with its linears packed."""
    from lutlm.bench.gpu_timing import random_weight
    from lutlm.linear import replace_linears

    model = random_model(config)
    rows = [{"model": config.name, "weights": "fp16 (torch)", "step_us": decode_step_us(model, position)}]
    c = config
    shapes = {"self_attn.q_proj": (c.num_attention_heads * c.head_dim, c.hidden_size),
              "self_attn.k_proj": (c.num_key_value_heads * c.head_dim, c.hidden_size),
              "self_attn.v_proj": (c.num_key_value_heads * c.head_dim, c.hidden_size),
              "self_attn.o_proj": (c.hidden_size, c.num_attention_heads * c.head_dim),
              "mlp.gate_proj": (c.intermediate_size, c.hidden_size),
              "mlp.up_proj": (c.intermediate_size, c.hidden_size),
              "mlp.down_proj": (c.hidden_size, c.intermediate_size)}
    for bits in bits_list:
        # Drawn on the GPU (fast), kept on the CPU as a loaded checkpoint's are: only the GPU
        # layouts that prepare builds from them stay on the device.
        packed = {f"model.layers.{i}.{linear}": on_cpu(random_weight(*shape, bits, group))
                  for i in range(c.num_hidden_layers) for linear, shape in shapes.items()}
        replace_linears(model, packed, backend="cuda")
        rows.append({"model": config.name, "weights": f"lutlm {bits}-bit g{group}", "step_us": decode_step_us(model, position)})
    del model
    torch.cuda.empty_cache()
    return rows


def bundled_generation(tokens: int) -> dict:
    """Greedy generation of the bundled model, 4-bit RTN on the GPU, against the reference on the CPU."""
    from lutlm.formats import load_checkpoint
    from lutlm.generate import Generator, SamplingParams
    from lutlm.loader import build_model, default_model_path
    from lutlm.quantize.config import QuantConfig
    from lutlm.quantize.model_quantizer import plan_group_sizes, quantize_weights_only
    from lutlm.tokenizer import Tokenizer

    checkpoint = load_checkpoint(default_model_path())
    config = QuantConfig(method="rtn", bits=4, group_size=64)
    checkpoint.packed = quantize_weights_only(checkpoint, config, plan_group_sizes(checkpoint, config), progress=True)
    model = build_model(checkpoint, backend="cuda")  # on the GPU in fp16
    tokenizer = Tokenizer(checkpoint.tokenizer)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    params = SamplingParams(max_new_tokens=tokens)
    gpu_gen = Generator(model, tokenizer, context_length=512)
    list(gpu_gen.generate_ids(prompt, params))  # compiles the kernels and captures the graph: not timed
    gpu_ids = list(gpu_gen.generate_ids(prompt, params))
    cpu_ids = list(Generator(build_model(checkpoint, backend="reference"), tokenizer, context_length=512)
                   .generate_ids(prompt, params))
    same = next((i for i, (a, b) in enumerate(zip(gpu_ids, cpu_ids)) if a != b), min(len(gpu_ids), len(cpu_ids)))
    return {
        "model": checkpoint.config.name or "SmolLM2-135M", "weights": "lutlm 4-bit g64 (RTN)",
        "prompt_tokens": len(prompt), "decode_tokens_per_s": round(gpu_gen.stats.decode_tokens_per_second, 1),
        "text": tokenizer.decode(gpu_ids), "tokens_equal_to_cpu_reference": same, "tokens": len(gpu_ids),
    }


def run(args) -> dict:
    from lutlm.bench.gpu_kernels import device_slug

    if not torch.cuda.is_available():
        sys.exit("lutlm bench gpu-decode: no CUDA device here")
    rows = synthetic_rows(SMOLLM2_135M, args.position, (4,), 64) + synthetic_rows(LLAMA2_7B, args.position, (4, 2), 128)
    try:
        generation = bundled_generation(args.tokens)
    except (ImportError, FileNotFoundError) as e:  # the bundled model or its GGUF reader is not installed
        generation = {"skipped": str(e)}
    for r in rows:
        times = r.pop("step_us")
        median, p25, p75 = times["decoder"]
        r.update(step_us=round(median, 1), step_us_p25=round(p25, 1), step_us_p75=round(p75, 1),
                 tokens_per_s=round(1e6 / median, 1), products_us=round(times["products"][0], 1),
                 products_share=round(times["products"][0] / median, 3),
                 forward_step_us=round(times["forward"][0], 1),
                 forward_products_share=round(times["products"][0] / times["forward"][0], 3),
                 memory_mib=times["memory_mib"])
    for r in rows:
        fp16 = next(f for f in rows if f["model"] == r["model"] and f["weights"] == "fp16 (torch)")
        r["speedup_vs_fp16"] = round(fp16["step_us"] / r["step_us"], 2)
    result = {"device": torch.cuda.get_device_name(), "position": args.position,
              "timing": "median of 10 timings of 8 CUDA-graph replays of a decode step (lutlm.gpu_decode); "
                        "p25/p75 give the spread. forward_step_us: the same step through model.forward, "
                        "also graph-replayed; products_us: the step's matrix products alone; memory_mib: "
                        "torch.cuda.memory_allocated with the model (weights, KV cache) and with the decoder too",
              "decode": rows, "generation": generation}
    out = args.out or Path("benchmarks/results") / f"gpu_decode_{device_slug()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(f"{r['model']:40s} {r['weights']:24s} {r['step_us']:9.1f} us/token {r['tokens_per_s']:8.1f} tok/s "
              f"x{r['speedup_vs_fp16']:.2f} vs fp16; products {100 * r['products_share']:.0f}% of the step "
              f"(model.forward: {r['forward_step_us']:.1f} us, {100 * r['forward_products_share']:.0f}%); "
              f"device memory {r['memory_mib']['model']} MiB, {r['memory_mib']['with_decoder']} with the decoder")
    print(f"bundled model, greedy on the GPU: {generation}")
    return result
