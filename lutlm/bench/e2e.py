"""`lutlm bench e2e`: whole-model prefill and decode speed, lutlm against llama.cpp
(llama-cpp-python) on the same model and machine, in one process run per model.

Models
    smollm2     The bundled SmolLM2-135M-Instruct. llama.cpp runs its Q4_1 file and that
                file requantized to Q4_0 and Q2_K; lutlm requantizes the same weights with
                RTN to 4 and 2 bits, groups of 64.
    llama2-7b   Synthetic models of these shapes with random weights (lutlm.bench.synthetic),
    llama3-8b   `--layers` decoder layers, written as an F16 GGUF. llama.cpp quantizes it to
                Q2_K, Q4_0, TQ1_0 and TQ2_0; lutlm quantizes the same float weights with RTN
                to 2 and 4 bits (groups of 128) and to ternary (one absmean scale per tensor).
Each engine keeps its own rule for the output head: lutlm packs it at 4 bits (groups of 64
or 128 as above), llama.cpp at its default (Q6_K when it requantizes, Q8_0 in the SmolLM2
source). The tables give both.

Timing, for each thread count, `--repeats` rounds with the variants interleaved inside each
round, so that load from other processes falls on all of them alike; one untimed warm-up
of each variant first. Figures are median [min, max] over the rounds.
    prefill T   one batched forward pass over a T-token prompt from an empty cache, logits
                of the last token only: T / seconds.
    decode N    N greedy steps after a 128-token prompt, each the argmax of the previous
                logits and a one-token forward pass: N / seconds.
lutlm prefills with model.forward (the kernels' GEMM path) and decodes with
lutlm.fast_decode; llama.cpp with llama_decode and its own greedy sampler. Prompts are the
same pseudo-random token ids for both engines.

Decode profile (where a step's time goes, lutlm only): the step through model.forward
(PyTorch operations between the kernels), through FastDecoder, and the same step's
matrix products alone; the share of time in mpGEMM is matmuls / step.

Results: benchmarks/results/e2e_<model>.md and .png (in benchmarks/results/<--machine>/ where
given), and .json with --json.

`--gguf FILE[,FILE...]` and `--synthetic-types TYPE[,...]` instead set the two engines on the
identical GGUF file (the file's own block types for both, output head included), with weight
bytes per token, bandwidth fraction, load time and peak memory: lutlm.bench.e2e_gguf.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lutlm import peer
from lutlm.bench import synthetic
from lutlm.fast_decode import fast_decoder_for
from lutlm.formats import Checkpoint, load_checkpoint
from lutlm.formats.gguf import linear_storage
from lutlm.generate import GENERATION_CACHE_DTYPE
from lutlm.kernels import cpu

MODELS = ("smollm2", "llama2-7b", "llama3-8b")
HEAD_BITS = 4


# ---- the two engines behind one interface: set_threads, prefill_seconds, decode_seconds ----

class LutlmRunner:
    """lutlm's generation path: prefill by model.forward, decode by FastDecoder (or
    model.forward where the model cannot use it), greedy."""

    def __init__(self, model, context: int):
        self.model = model
        model.setup_cache(1, context, dtype=GENERATION_CACHE_DTYPE)
        self.fast_decoder = fast_decoder_for(model)
        self.logits = torch.zeros(model.config.vocab_size)
        self.pos = 0

    def set_threads(self, n: int) -> None:
        """`n` threads for the kernels. Where the kernels run the linears, PyTorch (attention and
        norms of the prefill) keeps one: its OpenMP workers spin-wait after each operation and
        would take the cores the kernels' own threads need (3x slower prefill measured on 2 cores)."""
        on_kernels = self.fast_decoder is not None  # there is one exactly when every linear is on the kernels
        torch.set_num_threads(1 if on_kernels else n)
        if cpu.available():
            cpu.set_num_threads(n)

    def step(self, token: int, pos: int) -> torch.Tensor:
        if self.fast_decoder is not None:
            return self.fast_decoder(token, pos)
        return self.model(torch.tensor([[token]]), pos, last_logits_only=True)[0, -1]

    @torch.inference_mode()
    def prefill_seconds(self, tokens: list[int]) -> float:
        x = torch.tensor([tokens])
        start = time.perf_counter()
        self.logits = self.model(x, 0, last_logits_only=True)[0, -1]
        elapsed = time.perf_counter() - start
        self.pos = len(tokens)
        return elapsed

    @torch.inference_mode()
    def decode_seconds(self, n_tokens: int) -> float:
        start = time.perf_counter()
        for _ in range(n_tokens):
            self.logits = self.step(int(torch.argmax(self.logits)), self.pos)
            self.pos += 1
        return time.perf_counter() - start


@dataclass
class Variant:
    engine: str  # "lutlm" or "llama.cpp"
    kind: str  # "2-bit", "4-bit", "ternary" (lutlm) or the llama.cpp type, e.g. "Q2_K"
    bits_per_weight: float  # decoder-layer linears, scales included
    head: str  # how the output head is stored
    runner: object = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.engine} {self.kind}"


# ---- building the variants ----

def lutlm_recipes(group_size: int):
    from lutlm.quantize.config import QuantConfig

    return {
        "4-bit": QuantConfig(method="rtn", bits=4, group_size=group_size),
        "2-bit": QuantConfig(method="rtn", bits=2, group_size=group_size),
        "ternary": QuantConfig(method="ternary"),
    }


def pack_with_head(checkpoint: Checkpoint, recipe, head_group: int) -> Checkpoint:
    """The decoder layers quantized by `recipe`, the output head by RTN at HEAD_BITS."""
    from lutlm.quantize.model_quantizer import float_weight, quantize_checkpoint
    from lutlm.quantize.rtn import quantize_rtn

    packed, _ = quantize_checkpoint(checkpoint, recipe)
    packed.packed["lm_head"] = quantize_rtn(float_weight(checkpoint, "lm_head"), HEAD_BITS, head_group)
    packed.tensors.pop("lm_head.weight", None)
    return packed


def layer_bits(packed: dict) -> float:
    layers = [w for name, w in packed.items() if name != "lm_head"]
    weights = sum(w.out_features * w.in_features for w in layers)
    return sum(w.bits_per_weight * w.out_features * w.in_features for w in layers) / weights


def lutlm_variants(checkpoint_fn, slug: str, group_size: int, kinds: list[str], work: Path, context: int,
                   backend: str | None) -> list[Variant]:
    """lutlm's packed variants, quantized once and cached as packed folders in `work`."""
    from lutlm.formats.packed_model import save_packed_model
    from lutlm.loader import build_model

    variants = []
    recipes = lutlm_recipes(group_size)
    for kind in kinds:
        folder = work / f"{slug}-lutlm-{recipes[kind].describe().replace(' ', '-')}-head{HEAD_BITS}-g{group_size}"
        if not (folder / "lutlm.json").exists():
            save_packed_model(str(folder), pack_with_head(checkpoint_fn(), recipes[kind], group_size))
        checkpoint = load_checkpoint(folder)
        head = checkpoint.packed["lm_head"]
        model = build_model(checkpoint, backend)
        variants.append(Variant("lutlm", kind, layer_bits(checkpoint.packed),
                                f"{head.bits}-bit g{head.group_size}", LutlmRunner(model, context)))
    return variants


def gguf_blocks_variant(checkpoint: Checkpoint, head_group: int, context: int, backend: str | None) -> Variant:
    """lutlm on the GGUF's own Q4_0/Q4_1 weights (packed from their blocks, no requantization),
    the head as in the other lutlm variants: the closest match to llama.cpp on the same file."""
    from lutlm.formats.gguf_packed import pack_gguf_linears
    from lutlm.loader import build_model
    from lutlm.quantize.model_quantizer import float_weight
    from lutlm.quantize.rtn import quantize_rtn

    packed = pack_gguf_linears(checkpoint)
    packed.packed["lm_head"] = quantize_rtn(float_weight(checkpoint, "lm_head"), HEAD_BITS, head_group)
    packed.tensors.pop("lm_head.weight", None)
    kind = "+".join(sorted({checkpoint.tensor_types[f"{name}.weight"] for name in packed.packed if name != "lm_head"}))
    return Variant("lutlm", f"{kind} (GGUF blocks)", layer_bits(packed.packed), f"{HEAD_BITS}-bit g{head_group}",
                   LutlmRunner(build_model(packed, backend), context))


def peer_variants(source: str, source_kind: str, kinds: list[str], slug: str, work: Path,
                  context: int) -> list[Variant]:
    """llama.cpp's variants: the `source` GGUF (of type `source_kind`) and its quantizations."""
    variants = []
    for kind in tqdm(kinds, desc=f"{slug}: llama.cpp variants", unit="model"):
        path = Path(source) if kind == source_kind else work / f"{slug}-{kind}.gguf"
        if not path.exists():
            peer.quantize(source, str(path), kind)
        bits, head = linear_storage(str(path))
        runner = peer.LlamaCpp(str(path), n_ctx=context, logits_all=False)
        variants.append(Variant("llama.cpp", kind, bits, head, runner))
    return variants


# ---- timing ----

def prompt_tokens(vocab: int, length: int, seed: int = 0) -> list[int]:
    """Pseudo-random token ids clear of the low ids where vocabularies keep special tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab // 4, vocab, (length,), generator=g).tolist()


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def time_variants(variants: list[Variant], vocab: int, threads: list[int], prompts: list[int], decode_prompt: int,
                  new_tokens: int, repeats: int) -> list[dict]:
    """Rows {variant, threads, metric, tokens_per_s: summary}, variants interleaved in each round."""
    prompt = prompt_tokens(vocab, max(prompts + [decode_prompt]))
    metrics = [f"prefill {n}" for n in prompts] + [f"decode {new_tokens}"]
    samples = {(v.name, t, m): [] for v in variants for t in threads for m in metrics}

    def one_round(v: Variant, t: int, record: bool) -> None:
        for n in prompts:
            seconds = v.runner.prefill_seconds(prompt[:n])
            if record:
                samples[(v.name, t, f"prefill {n}")].append(n / seconds)
        v.runner.prefill_seconds(prompt[:decode_prompt])
        seconds = v.runner.decode_seconds(new_tokens if record else 4)
        if record:
            samples[(v.name, t, f"decode {new_tokens}")].append(new_tokens / seconds)

    bar = tqdm(total=len(threads) * (repeats + 1) * len(variants), desc="timing", unit="run")
    for t in threads:
        for r in range(repeats + 1):  # round 0 is the warm-up
            for v in variants:
                v.runner.set_threads(t)
                one_round(v, t, record=r > 0)
                bar.update()
    bar.close()
    return [{"engine": v.engine, "variant": v.name, "kind": v.kind, "bits_per_weight": round(v.bits_per_weight, 3),
             "head": v.head, "threads": t, "metric": m, "tokens_per_s": summarize(samples[(v.name, t, m)])}
            for v in variants for t in threads for m in metrics]


@torch.inference_mode()
def decode_profile(variant: Variant, vocab: int, threads: int, decode_prompt: int, steps: int) -> dict | None:
    """A decode step's time through model.forward and through FastDecoder, against its
    matrix products alone, after a `decode_prompt`-token prompt. The three are timed in turn
    at every step, so that load from other processes falls on each alike."""
    runner = variant.runner
    if runner.fast_decoder is None:
        return None
    runner.set_threads(threads)
    prompt = prompt_tokens(vocab, decode_prompt)
    runner.prefill_seconds(prompt)
    token = torch.tensor([prompt[-1:]])
    calls = {"forward": lambda pos: runner.model(token, pos, last_logits_only=True),
             "fast": lambda pos: runner.fast_decoder(prompt[-1], pos),
             "matmuls": lambda pos: runner.fast_decoder.run_matmuls_only()}
    times = {name: [] for name in calls}
    for i in range(steps + 1):  # step 0 is a warm-up
        for name, call in calls.items():
            start = time.perf_counter()
            call(decode_prompt + i)
            if i:
                times[name].append(1e3 * (time.perf_counter() - start))
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {"variant": variant.name, "threads": threads, "position": decode_prompt, "steps": steps,
            "forward_step_ms": round(ms["forward"], 4), "fast_step_ms": round(ms["fast"], 4),
            "matmuls_ms": round(ms["matmuls"], 4), "mpgemm_share_forward": round(ms["matmuls"] / ms["forward"], 3),
            "mpgemm_share_fast": round(ms["matmuls"] / ms["fast"], 3)}


# ---- targets (the "done when") ----

# (models, lutlm kind, llama.cpp kinds (the fastest is the reference), metric, threads, required ratio)
TARGETS = [
    (("llama2-7b", "llama3-8b"), "2-bit", ("Q2_K",), "decode", 1, 2.0),
    (("llama2-7b", "llama3-8b"), "2-bit", ("Q2_K",), "decode", 2, 1.5),
    (("llama2-7b", "llama3-8b"), "4-bit", ("Q4_0",), "decode", 1, 1.3),
    (("llama2-7b", "llama3-8b"), "4-bit", ("Q4_0",), "decode", 2, 1.3),
    (("llama2-7b", "llama3-8b"), "ternary", ("TQ1_0", "TQ2_0"), "decode", 1, 1.5),
    (("llama2-7b", "llama3-8b"), "ternary", ("TQ1_0", "TQ2_0"), "decode", 2, 1.5),
    *[(("llama2-7b", "llama3-8b"), kind, peers, "prefill 512", t, 1.0)
      for kind, peers in (("2-bit", ("Q2_K",)), ("4-bit", ("Q4_0",)), ("ternary", ("TQ1_0", "TQ2_0")))
      for t in (1, 2)],
    (("smollm2",), "4-bit", ("Q4_1",), "decode", 2, 1.0),
    (("smollm2",), "2-bit", ("Q4_1",), "decode", 2, 1.0),
    (("smollm2",), "Q4_1 (GGUF blocks)", ("Q4_1",), "decode", 2, 1.0),
]


def check_targets(model: str, rows: list[dict]) -> list[dict]:
    def speed(engine: str, kind: str, metric: str, threads: int) -> float | None:
        for r in rows:
            if (r["engine"], r["kind"], r["threads"]) == (engine, kind, threads) and r["metric"].startswith(metric):
                return r["tokens_per_s"]["median"]
        return None

    results = []
    for models, kind, peers, metric, threads, required in TARGETS:
        ours = speed("lutlm", kind, metric, threads)
        theirs = {p: speed("llama.cpp", p, metric, threads) for p in peers}
        theirs = {p: s for p, s in theirs.items() if s is not None}
        if model not in models or ours is None or not theirs:
            continue
        best = max(theirs, key=theirs.get)
        ratio = ours / theirs[best]
        name = f"{metric} {threads} thread{'s' if threads > 1 else ''}: lutlm {kind} vs llama.cpp {best}"
        results.append({"target": name,
                        "lutlm": round(ours, 2), "llama.cpp": round(theirs[best], 2), "ratio": round(ratio, 2),
                        "required": required, "met": ratio >= required})
    return results


# ---- reporting ----

def fmt(summary: dict) -> str:
    return f"{summary['median']:.1f} [{summary['min']:.1f}, {summary['max']:.1f}]"


def markdown(result: dict) -> str:
    rows, metrics = result["rows"], list(dict.fromkeys(r["metric"] for r in result["rows"]))
    lines = [f"# End to end: {result['model']['name']}", "",
             f"{result['machine']}; load average {result['load_average']['start']} at start, "
             f"{result['load_average']['end']} at end. {result['method']}", "",
             "Tokens/s, median [min, max] over the rounds.", "",
             "| engine | variant | bits/weight (layers) | head | threads | " + " | ".join(metrics) + " |",
             "|---|---|---|---|---|" + "---|" * len(metrics)]
    keys = list(dict.fromkeys((r["variant"], r["threads"]) for r in rows))
    for variant, threads in sorted(keys, key=lambda k: (k[1], k[0])):
        cells = {r["metric"]: r for r in rows if (r["variant"], r["threads"]) == (variant, threads)}
        first = next(iter(cells.values()))
        lines.append(f"| {first['engine']} | {first['kind']} | {first['bits_per_weight']:.2f} | {first['head']} | "
                     f"{threads} | " + " | ".join(fmt(cells[m]["tokens_per_s"]) for m in metrics) + " |")
    if result["targets"]:
        lines += ["", "## Targets", "", "| target | lutlm tok/s | llama.cpp tok/s | ratio | required | met |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['lutlm']} | {t['llama.cpp']} | {t['ratio']} | {t['required']} | "
                  f"{'yes' if t['met'] else '**no**'} |" for t in result["targets"]]
    if result["profile"]:
        lines += ["", f"## Decode step profile (lutlm, position {result['profile'][0]['position']})", "",
                  "| variant | threads | model.forward ms | FastDecoder ms | matmuls alone ms | "
                  "mpGEMM share via model.forward | via FastDecoder |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {p['variant']} | {p['threads']} | {p['forward_step_ms']:.2f} | {p['fast_step_ms']:.2f} | "
                  f"{p['matmuls_ms']:.2f} | {p['mpgemm_share_forward']:.0%} | {p['mpgemm_share_fast']:.0%} |"
                  for p in result["profile"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Tokens/s against bits per weight, one panel per metric, a series per engine and thread count."""
    from lutlm.bench.plotting import pyplot

    plt = pyplot()

    rows = result["rows"]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for (engine, threads), marker in zip(sorted({(r["engine"], r["threads"]) for r in rows}), "os^vD*"):
            series = sorted((r for r in rows if (r["engine"], r["threads"], r["metric"]) == (engine, threads, metric)),
                            key=lambda r: r["bits_per_weight"])
            x = [r["bits_per_weight"] for r in series]
            y = [r["tokens_per_s"]["median"] for r in series]
            err = [[r["tokens_per_s"]["median"] - r["tokens_per_s"]["min"] for r in series],
                   [r["tokens_per_s"]["max"] - r["tokens_per_s"]["median"] for r in series]]
            ax.errorbar(x, y, yerr=err, marker=marker, linestyle="none", capsize=3,
                        label=f"{engine}, {threads} thread{'s' if threads > 1 else ''}")
            for r in series:
                ax.annotate(r["kind"], (r["bits_per_weight"], r["tokens_per_s"]["median"]), fontsize=7,
                            xytext=(4, 2), textcoords="offset points")
        ax.set_title(metric)
        ax.set_xlabel("bits per weight (decoder linears, scales included)")
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(result["model"]["name"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    isa = cpu.best_isa() if cpu.available() else "n/a"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, kernels on {isa}"


# ---- one model ----

def model_variants(model: str, args, work: Path, use_peer: bool) -> tuple[list[Variant], dict]:
    context = max(args.prompts + [args.decode_prompt + args.new_tokens + args.profile_steps]) + 1
    if model == "smollm2":
        from lutlm.formats.gguf import bundled_model_path

        source = bundled_model_path()
        base = load_checkpoint(source)
        variants = lutlm_variants(lambda: base, "smollm2", 64, ["4-bit", "2-bit"], work, context, args.backend)
        variants.append(gguf_blocks_variant(base, 64, context, args.backend))
        if use_peer:
            variants += peer_variants(source, "Q4_1", ["Q4_1", "Q4_0", "Q2_K"], "smollm2", work, context)
        info = {"name": "SmolLM2-135M-Instruct (bundled, Q4_1 source)", "config": base.config.to_dict()}
        return variants, info
    config = synthetic.synthetic_config(model, args.layers)
    slug = f"{model}-{args.layers}L-seed{args.seed}"
    cached = {}

    def float_checkpoint():
        if "ckpt" not in cached:
            cached["ckpt"] = synthetic.random_checkpoint(config, synthetic.bundled_vocabulary(), args.seed)
        return cached["ckpt"]

    variants = lutlm_variants(float_checkpoint, slug, 128, ["2-bit", "4-bit", "ternary"], work, context, args.backend)
    if use_peer:
        from lutlm.formats.gguf_writer import save_gguf

        f16 = work / f"{slug}-F16.gguf"
        if not f16.exists():
            save_gguf(float_checkpoint(), f16, "F16")
        cached.clear()
        gc.collect()
        variants += peer_variants(str(f16), "F16", ["Q2_K", "Q4_0", "TQ1_0", "TQ2_0"], slug, work, context)
    return variants, {"name": config.name, "config": config.to_dict()}


def run_model(model: str, args, work: Path, use_peer: bool) -> dict:
    variants, info = model_variants(model, args, work, use_peer)
    gc.collect()
    start_load = load_average()
    vocab = info["config"]["vocab_size"]
    rows = time_variants(variants, vocab, args.threads, args.prompts, args.decode_prompt, args.new_tokens, args.repeats)
    profile = [p for t in args.threads for v in variants if v.engine == "lutlm"
               for p in [decode_profile(v, vocab, t, args.decode_prompt, args.profile_steps)] if p]
    result = {
        "model": info, "machine": machine(), "load_average": {"start": start_load, "end": load_average()},
        "method": f"threads {args.threads}; prompts {args.prompts}; decode {args.new_tokens} tokens after a "
                  f"{args.decode_prompt}-token prompt; {args.repeats} rounds after a warm-up, variants interleaved.",
        "peer": peer.run_description(not args.no_peer),
        "rows": rows, "targets": check_targets(model, rows), "profile": profile,
    }
    return result


def write_results(result: dict, out_dir: Path, stem: str, as_json: bool, render=None) -> list[Path]:
    """The report as markdown, a plot and optionally JSON; `render` = (markdown, plot) functions
    of another report (bench e2e --gguf) in place of this module's."""
    to_markdown, to_plot = render or (markdown, plot)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(to_markdown(result))
    to_plot(result, paths[1])
    if as_json:
        paths.append(out_dir / f"{stem}.json")
        paths[-1].write_text(json.dumps(result, indent=1) + "\n")
    return paths


def parse_ints(option: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{option} takes positive integers, got {text!r}")
    return values


def add_parser(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("e2e", help="end-to-end prefill/decode tokens/s, lutlm against llama.cpp")
    p.add_argument("--models", default=None, help=f"comma-separated: {', '.join(MODELS)} (default: all; with "
                                                  "--synthetic-types llama2-7b)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of the synthetic 7B/8B-shaped models (default 4; 8 with --synthetic-types)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--prompts", default="128,512", help="comma-separated prompt lengths for prefill")
    p.add_argument("--decode-prompt", type=int, default=128, help="prompt length before the timed decode steps")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed after the prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--profile-steps", type=int, default=32, help="decode steps per figure of the step profile")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    p.add_argument("--backend", default="cpu", help="lutlm kernel backend (default: the CPU table-lookup kernels)")
    p.add_argument("--no-peer", action="store_true", help="lutlm only, even where llama-cpp-python is installed")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "lutlm-bench-e2e",
                   help="where quantized models and GGUF files are cached between runs")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--json", action="store_true", help="also write the results as JSON")
    from lutlm.bench import e2e_gguf  # here, not at the top: e2e_gguf builds on this module

    e2e_gguf.add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> list[dict]:
    args.threads, args.prompts = parse_ints("--threads", args.threads), parse_ints("--prompts", args.prompts)
    if getattr(args, "gguf", None) or getattr(args, "synthetic_types", None):
        from lutlm.bench import e2e_gguf  # here, not at the top: e2e_gguf builds on this module

        if args.layers is None:
            args.layers = e2e_gguf.DEFAULT_LAYERS
        return e2e_gguf.run(args)
    models = (args.models or ",".join(MODELS)).split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r} for bench e2e; choose from {', '.join(MODELS)}")
    if args.layers is None:
        args.layers = 4
    use_peer = peer.available() and not args.no_peer
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for model in models:
        result = run_model(model, args, args.work_dir, use_peer)
        stem = "e2e_" + (model if model == "smollm2" else f"{model}-{args.layers}L")
        out_dir = args.out_dir / args.machine if getattr(args, "machine", None) else args.out_dir
        paths = write_results(result, out_dir, stem, args.json)
        print(markdown(result))
        print("wrote " + ", ".join(map(str, paths)))
        results.append(result)
        gc.collect()
    return results
