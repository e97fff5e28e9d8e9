"""`lutlm bench ppl`: perplexity against bits per weight, lutlm's quantizers beside llama.cpp's.

One run, one text, one set of chunks for every row, so that rows differ only by their weights:

  * the source model (the GGUF dequantized to float32, run by lutlm);
  * lutlm's RTN, AWQ and GPTQ at each bit-width and group size asked for, and ternary
    (absmean, per tensor), quantized from that source and run on the exact reference path
    (weights dequantized once, fp32 matmuls), so that a row measures its quantizer alone;
  * packed folders quantized beforehand (--packed: say, tuned on a GPU), from the same source
    GGUF and calibrated on the same text, run on the same reference path;
  * with llama-cpp-python installed, llama.cpp's own quantizations of the same source GGUF
    (requantized by its quantize function) and the source itself, run and scored by
    llama.cpp on the very tokens lutlm scored.

Bits per weight count the decoder-layer linears only, scales and zeros included (embedding
and output head are kept the same way by both engines' defaults, and reported apart).

Calibration (AWQ, GPTQ) takes the text's last tokens (lutlm.quantize.calibration); every
row skips the chunks that overlap them, or those of any --packed folder, so no row is scored
on text a quantizer saw.
On SmolLM2, whose hidden size 576 is not a multiple of 128, "g128" uses the group-size
fallback (QuantConfig.group_fallback): groups of 96 where K = 576, 128 where K = 1536; the
bits per weight reported are those of the group sizes used.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lutlm import peer
from lutlm.formats import Checkpoint, load_checkpoint
from lutlm.formats.gguf import linear_storage
from lutlm.loader import build_model, default_model_path
from lutlm.perplexity import DEFAULT_TEXT, PerplexityResult, model_perplexity, perplexity_tokens, read_text, score_chunks
from lutlm.quantize.calibration import DEFAULT_SEQ_LEN, DEFAULT_SEQUENCES, calibration_set
from lutlm.quantize.config import CALIBRATED_METHODS, GPTQ_METHODS, QuantConfig
from lutlm.quantize.model_quantizer import quantize_checkpoint
from lutlm.tokenizer import Tokenizer

PEER_TYPES = ("source", "Q4_K", "Q4_0", "Q3_K", "Q2_K", "TQ2_0", "TQ1_0")  # "source": the GGUF itself
TARGETS = {4: 0.04, 3: 0.15}  # allowed perplexity increase over the source at group size 128


@dataclass
class Row:
    engine: str
    variant: str  # e.g. "gptq 4-bit g128", "Q4_K", "source"
    method: str  # "source", a lutlm method, or "llama.cpp"
    bits: int | None
    group: str  # "g128", "g64", "per-tensor", "" for llama.cpp types
    bits_per_weight: float
    ppl: float
    ppl_low: float
    ppl_high: float
    tokens_scored: int
    quantize_seconds: float
    eval_seconds: float

    def delta(self, source_ppl: float) -> float:
        return self.ppl / source_ppl - 1.0


def scored_row(engine, variant, method, bits, group, bpw, result: PerplexityResult, q_seconds, e_seconds) -> Row:
    low, high = result.ppl_interval
    return Row(engine, variant, method, bits, group, bpw, result.perplexity, low, high, result.tokens_scored,
               q_seconds, e_seconds)


def lutlm_configs(methods: list[str], bits: list[int], groups: list[int], ternary: bool,
                  act_order: bool = False, tune_steps: int = 0) -> list[QuantConfig]:
    configs = [QuantConfig(method=m, bits=b, group_size=g, group_fallback=True,
                           act_order=act_order and m in GPTQ_METHODS, tune_steps=tune_steps)
               for g in groups for b in bits for m in methods]
    return ([QuantConfig(method="ternary")] if ternary else []) + configs


def packed_folder(path: str, source: str, text: str) -> tuple[Checkpoint, QuantConfig]:
    """A packed folder for a row of its own, once it is known to come from `source` and to
    have been calibrated (if at all) on `text`."""
    checkpoint = load_checkpoint(path)
    info = checkpoint.quantization
    if not checkpoint.packed or not info:
        raise ValueError(f"{path} is not a packed model folder written by lutlm quantize")
    if Path(info["source"]).name != Path(source).name:
        raise ValueError(f"{path} was quantized from {info['source']}, not from {source}")
    calibration = info.get("calibration")
    if calibration and Path(calibration["text"]).name != Path(text).name:
        raise ValueError(f"{path} was calibrated on {calibration['text']}, not on the scored text {text}")
    return checkpoint, QuantConfig.from_dict(info)


def run(args) -> dict:
    source = args.model or default_model_path()
    if not str(source).endswith(".gguf"):
        raise ValueError("bench ppl compares with llama.cpp's quantizations of a GGUF file; -m must name one")
    methods = [m for m in args.methods.split(",") if m]
    bits = [int(b) for b in args.bits.split(",") if b]
    groups = [int(g) for g in args.groups.split(",") if g]
    # Built first: a bad request is refused before any work.
    configs = lutlm_configs(methods, bits, groups, not args.no_ternary, args.act_order, args.tune_steps)
    folders = {path: packed_folder(path, source, args.text) for path in args.packed}
    use_peer = peer.available() and not args.no_peer
    args.max_chunks = args.max_chunks or None
    torch.set_num_threads(args.threads)

    checkpoint = load_checkpoint(source)
    tokenizer = Tokenizer(checkpoint.tokenizer)
    text = read_text(args.text)
    tokens, bos = perplexity_tokens(tokenizer, text)
    calibration = calibration_set(tokenizer, args.text, args.calib_sequences, args.calib_seq_len)
    # Calibration slices are the text's last tokens: the widest covers every other.
    ranges = [calibration.token_range] + [tuple(c.quantization["calibration"]["token_range"])
                                          for c, _ in folders.values() if c.quantization.get("calibration")]
    exclude = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    source_bpw, head_type = linear_storage(source)

    def evaluate(model) -> tuple[PerplexityResult, float]:
        start = time.perf_counter()
        result = model_perplexity(model, tokenizer, text, args.ctx, args.max_chunks, exclude, progress=True)
        return result, time.perf_counter() - start

    report = {
        "command": shlex.join(["lutlm", *sys.argv[1:]]),
        "model": source,
        "text": args.text,
        "ctx": args.ctx,
        "excluded_tokens": list(exclude),
        "calibration": calibration.describe(),
        "threads": args.threads,
        "head": f"{head_type} in the source, kept as is by both engines",
        "packed": list(folders),
        "peer": peer.run_description(not args.no_peer),
        "rows": [],
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def add(row: Row) -> None:
        """Record a row and rewrite the results, so that an interrupted run keeps what it measured."""
        report["rows"].append(asdict(row))
        rows = [Row(**r) for r in report["rows"]]
        report["targets"] = check_targets(rows)
        (out / f"{args.stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{args.stem}.md").write_text(markdown(report))
        plot(report, out / f"{args.stem}.png")
        tqdm.write(f"{row.engine} {row.variant}: {row.bits_per_weight:.3f} bpw, ppl {row.ppl:.3f} "
                   f"(quantized in {row.quantize_seconds:.0f} s, scored in {row.eval_seconds:.0f} s)")

    source_result, seconds = evaluate(build_model(checkpoint))
    report.update(chunks=source_result.chunks, tokens_scored=source_result.tokens_scored)
    add(scored_row("lutlm", "source (dequantized)", "source", None, "", source_bpw, source_result, 0.0, seconds))

    # llama.cpp's rows first: they are quick, and the targets are set against them.
    if use_peer:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        stem = Path(source).stem
        for kind in tqdm(args.peer_types.split(","), desc="llama.cpp rows", unit="row"):
            start = time.perf_counter()
            path = source if kind == "source" else str(work / f"{stem}-{kind}.gguf")
            if kind != "source" and not Path(path).exists():
                peer.quantize(source, path, kind)
            q_seconds = time.perf_counter() - start
            bpw, _ = linear_storage(path)
            llama = peer.LlamaCpp(path, n_ctx=args.ctx, n_threads=args.threads)
            start = time.perf_counter()
            result = score_chunks(llama.logits, tokens, args.ctx, args.max_chunks, exclude, bos)
            del llama
            label = f"{Path(source).stem.rsplit('.', 1)[-1]} (source)" if kind == "source" else kind
            add(scored_row("llama.cpp", label, "llama.cpp", None, "", bpw, result, q_seconds,
                           time.perf_counter() - start))

    for config in tqdm(configs, desc="lutlm rows", unit="row"):
        quantized, info = quantize_checkpoint(checkpoint, config, calibration if config.needs_calibration else None,
                                              progress=False)
        result, seconds = evaluate(build_model(quantized, backend="reference"))
        group = ("per-tensor" if config.ternary_group is None else f"g{config.ternary_group}") if config.ternary \
            else f"g{config.group_size}"
        add(scored_row("lutlm", config.describe(), config.method, None if config.ternary else config.bits,
                       group, info.bits_per_weight, result, info.seconds, seconds))

    for path, (quantized, config) in folders.items():
        result, seconds = evaluate(build_model(quantized, backend="reference"))
        info = quantized.quantization
        add(scored_row("lutlm", f"{config.describe()} [{Path(path).name}]", config.method, config.bits,
                       f"g{config.group_size}", info["bits_per_weight"], result, info["seconds"], seconds))

    print(markdown(report))
    print(f"wrote {out / args.stem}.{{md,json,png}}")
    return report


def check_targets(rows: list[Row]) -> list[dict]:
    """The issue's targets, each with the measured figures and whether it is met."""
    source = next(r for r in rows if r.method == "source")
    targets = []
    for bits, allowed in TARGETS.items():
        candidates = [r for r in rows if r.method in CALIBRATED_METHODS and r.bits == bits and r.group == "g128"]
        if candidates:
            best = min(candidates, key=lambda r: r.ppl)
            targets.append({"target": f"{bits}-bit g128, AWQ or GPTQ, within +{allowed:.0%} of the source",
                            "row": best.variant, "delta": best.delta(source.ppl),
                            "met": best.delta(source.ppl) <= allowed})
    for peer_row in (r for r in rows if r.engine == "llama.cpp" and "source" not in r.variant):
        larger = [r for r in rows if r.engine == "lutlm" and r.method != "source"
                  and r.bits_per_weight >= peer_row.bits_per_weight]
        worse = [r for r in larger if r.ppl > peer_row.ppl]
        summary = ", ".join(f"{r.variant} ({r.ppl:.2f})" for r in worse) or \
            (f"none of {len(larger)} worse" if larger else "no lutlm row that large")
        targets.append({"target": f"no lutlm row at >= {peer_row.bits_per_weight:.2f} bpw worse than "
                                  f"llama.cpp {peer_row.variant} (ppl {peer_row.ppl:.2f})",
                        "row": summary, "delta": None, "met": not worse if larger else None})
    return targets


def markdown(report: dict) -> str:
    rows = [Row(**r) for r in report["rows"]]
    source = next(r for r in rows if r.method == "source")
    peer_rows = report["peer"] if report["peer"].startswith("not run") else f"run and scored by {report['peer']}"
    lines = [
        f"# Perplexity against bits per weight: {Path(report['model']).name}",
        "",
        f"Text {report['text']}, context {report['ctx']}, {report['tokens_scored']} tokens scored per row (the same "
        f"chunks for every row; chunks overlapping the calibration tokens {report['excluded_tokens'][0]}.."
        f"{report['excluded_tokens'][1]} skipped). Bits per weight: decoder-layer linears, scales and zeros "
        f"included; output head: {report['head']}. lutlm rows run on the exact reference path; llama.cpp rows: "
        f"{peer_rows}. 95% interval from the standard error of the mean NLL "
        f"(rows are scored on identical tokens, so their differences are far tighter than the intervals).",
        "",
        f"Command: `{report.get('command', 'not recorded')}`, {report['threads']} "
        f"thread{'s' if report['threads'] != 1 else ''}.",
        "",
        *(["Rows named [folder] were quantized beforehand (`lutlm quantize -o folder`, given to --packed); "
           "their quantize seconds are those recorded in the folder.", ""] if report.get("packed") else []),
        "| engine | variant | bits/weight | perplexity | 95% interval | vs source | quantize s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.engine != "lutlm" or r.method != "source", -r.bits_per_weight)):
        lines.append(f"| {r.engine} | {r.variant} | {r.bits_per_weight:.3f} | {r.ppl:.3f} | "
                     f"{r.ppl_low:.2f}-{r.ppl_high:.2f} | {100 * r.delta(source.ppl):+.1f}% | {r.quantize_seconds:.0f} |")
    lines += ["", "## Targets", "", "| target | row | vs source | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        delta = "" if t["delta"] is None else f"{100 * t['delta']:+.1f}%"
        met = "n/a" if t["met"] is None else "yes" if t["met"] else "**no**"
        lines.append(f"| {t['target']} | {t['row']} | {delta} | {met} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from lutlm.bench.plotting import pyplot

    plt = pyplot()

    rows = [Row(**r) for r in report["rows"]]
    source = next(r for r in rows if r.method == "source")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.axhline(source.ppl, color="gray", linestyle=":", label=f"source ({source.ppl:.2f})")
    styles = {"rtn": "C0", "awq": "C1", "gptq": "C2", "awq-gptq": "C3"}
    for method, color in styles.items():
        for group, marker, line in (("g128", "o", "-"), ("g64", "s", "--")):
            sel = sorted((r for r in rows if r.method == method and r.group == group), key=lambda r: r.bits_per_weight)
            if sel:
                ax.plot([r.bits_per_weight for r in sel], [r.ppl for r in sel], marker=marker, linestyle=line,
                        color=color, label=f"lutlm {method} {group}")
    for r in rows:
        if r.method == "ternary":
            ax.plot(r.bits_per_weight, r.ppl, "D", color="C4", label=f"lutlm {r.variant}")
        if r.engine == "llama.cpp":
            ax.plot(r.bits_per_weight, r.ppl, "x", color="C3", markersize=9)
            ax.annotate(r.variant, (r.bits_per_weight, r.ppl), textcoords="offset points", xytext=(5, 4),
                        fontsize=8, color="C3")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (decoder linears, scales included)")
    ax.set_ylabel(f"perplexity, context {report['ctx']} (log scale)")
    ax.set_title(f"{Path(report['model']).name}: perplexity vs bits (x: llama.cpp)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("ppl", help="perplexity vs bits: lutlm's quantizers beside llama.cpp's")
    p.add_argument("-m", "--model", help="source GGUF (default: the bundled model)")
    p.add_argument("--text", default=DEFAULT_TEXT, help=f"text to score and calibrate on (default: {DEFAULT_TEXT})")
    p.add_argument("--ctx", type=int, default=512, help="context of each scored chunk")
    p.add_argument("--max-chunks", type=int, default=40, help="chunks scored per row (0: the whole text)")
    p.add_argument("--methods", default="rtn,awq,gptq", help="lutlm methods, comma-separated")
    p.add_argument("--bits", default="4,3,2", help="bit-widths, comma-separated")
    p.add_argument("--groups", default="128,64", help="group sizes, comma-separated (g128 falls back where needed)")
    p.add_argument("--no-ternary", action="store_true", help="leave out the ternary row")
    p.add_argument("--act-order", action="store_true", help="GPTQ rounding in order of decreasing activation energy")
    p.add_argument("--tune-steps", type=int, default=0,
                   help="end-to-end grid tuning steps after each non-ternary quantizer (lutlm quantize --tune-steps)")
    p.add_argument("--packed", nargs="*", default=[], metavar="DIR",
                   help="also score these packed folders (lutlm quantize -o DIR from the same source and text, "
                        "e.g. tuned on a GPU)")
    p.add_argument("--peer-types", default=",".join(PEER_TYPES),
                   help="llama.cpp quantizations, comma-separated; 'source' scores the source GGUF itself (its "
                        "Q4_1 takes llama.cpp 2-3 times a Q4_0's time here)")
    p.add_argument("--no-peer", action="store_true", help="lutlm rows only, even with llama-cpp-python installed")
    p.add_argument("--calib-sequences", type=int, default=DEFAULT_SEQUENCES)
    p.add_argument("--calib-seq-len", type=int, default=DEFAULT_SEQ_LEN)
    p.add_argument("--threads", type=int, default=2, help="threads for PyTorch and llama.cpp")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "lutlm-bench-ppl"),
                   help="where llama.cpp's quantized GGUF files are kept between runs")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--stem", default="ppl_smollm2", help="file name stem of the results")
    p.set_defaults(func=run)
