"""`lutlm bench kernels`: the CPU table-lookup kernels against PyTorch fp32 and the
dequantize-then-multiply baseline, on the layer shapes of Llama-2-7B, Llama-3-8B and
SmolLM2-135M (`--device cuda` runs the GPU kernels' benchmark instead).

For every shape (out x in), bits, thread count and batch a row gives the median time and
spread (25th-75th percentile) of each of the three, after warm-up, timed in turns so that
all three see the same load on the machine, both warm (weights left in cache by the
previous call, where they fit) and cold (after the others ran; see time_calls); the bytes of weight
(codes and fp16 scales) the kernels read per second; and the machine's memory read
bandwidth measured in the same run with the same threads, both from DRAM (a 512 MiB
buffer) and for a buffer the size of the weight (which may be served from cache, as the
weights are when the same layer is timed repeatedly). Weights are random codes with
random scales: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lutlm.formats.packed import PackedWeight

MODEL_SHAPES = {  # (out, in) of each distinct linear
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-8b": [(14336, 4096), (4096, 14336)],
    "smollm2-135m": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
}
KINDS = ("1", "2", "3", "4", "ternary")
DRAM_PROBE_BYTES = 512 << 20
MIN_SECONDS = 0.25  # time each measurement at least this long (and at least MIN_REPEATS times)
MIN_REPEATS, MAX_REPEATS, WARMUP = 5, 200, 2
CALLS_PER_TURN = 4  # one cold call, then warm ones (see time_calls)
# The baseline's dot product on each instruction set (cpu_dequant runs on the one in use).
DEQUANT_LABELS = {"avx512": "dequantize + VNNI dot (AVX-512)", "avx2": "dequantize + maddubs dot (AVX2)"}


def parse_shapes(text: str) -> list[tuple[str, int, int]]:
    """"MxK,..." or model names -> [(model, out, in)]."""
    shapes = []
    for item in text.split(","):
        item = item.strip()
        if item in MODEL_SHAPES:
            shapes += [(item, n, k) for n, k in MODEL_SHAPES[item]]
            continue
        try:
            n, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {item!r} is neither OUTxIN (e.g. 4096x11008) nor one of {', '.join(MODEL_SHAPES)}")
        shapes.append(("", n, k))
    return shapes


def parse_list(text: str, allowed=None, kind=str) -> list:
    items = [kind(v.strip()) for v in text.split(",") if v.strip()]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad or not items:
        raise ValueError(f"bad value(s) {bad or text!r}; choose from {', '.join(map(str, allowed))}")
    return items


def random_weight(n: int, k: int, kind: str, group_size: int) -> PackedWeight:
    """Uniformly random bit-planes (ternary: plane 1 only where plane 0 is clear, so codes
    stay in 0..2) and random scales: drawn as planes, since packing 58 M codes is slow."""
    ternary = kind == "ternary"
    bits = 2 if ternary else int(kind)
    # The quantizers' rule where the group size does not divide K: the largest multiple of
    # 32 below it that does (96 for SmolLM2's K = 576 at 128), else the whole row.
    fitting = [g for g in range(32, group_size + 1, 32) if k % g == 0]
    group = k if ternary or not fitting else fitting[-1]
    planes = torch.randint(0, 256, (bits, n, k // 8), dtype=torch.uint8)
    if ternary:
        planes[1] &= ~planes[0]
    scales = (torch.rand(n, k // group) * 0.02 + 0.001).half()
    zeros = torch.ones(n, k // group).half() if ternary else (torch.rand(n, k // group) * ((1 << bits) - 1)).half()
    return PackedWeight(planes, scales, zeros, bits, group, ternary)


def time_calls(fns: dict) -> dict[str, dict[str, float]]:
    """Times of each function in milliseconds: median, 25th and 75th percentile of warm
    calls, and the median of cold ones. The functions take turns, round after round, so
    that all see the same machine (other processes share its cores and memory bandwidth).
    In each turn a function runs a few times in a row: the first call follows the others,
    which have evicted its weights from the caches (cold, as in a model whose layers do not
    fit in cache); the next calls find them where they fit (warm, as a layer timed alone)."""
    for fn in fns.values():
        for _ in range(WARMUP):
            fn()
    warm: dict[str, list[float]] = {name: [] for name in fns}
    cold: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < MIN_REPEATS or (time.perf_counter() - start < MIN_SECONDS * len(fns) and rounds < MAX_REPEATS):
        for name, fn in fns.items():
            for call in range(CALLS_PER_TURN):
                t0 = time.perf_counter()
                fn()
                (cold if call == 0 else warm)[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    result = {}
    for name in fns:
        q = statistics.quantiles(warm[name], n=4)
        result[name] = {"ms": statistics.median(warm[name]), "p25_ms": q[0], "p75_ms": q[2],
                        "cold_ms": statistics.median(cold[name])}
    return result


def run(args) -> list[dict]:
    from lutlm.kernels import cpu, cpu_dequant

    if not cpu.available():
        raise RuntimeError("the CPU kernel library is not built")
    shapes = parse_shapes(args.shapes)
    kinds = parse_list(args.bits, KINDS)
    threads_list = parse_list(args.threads, kind=int)
    batches = parse_list(args.batch, kind=int)
    rows = []
    bandwidth = {}
    for threads in threads_list:  # the machine's DRAM read bandwidth at each thread count
        cpu.set_num_threads(threads)
        bandwidth[threads] = cpu.read_bandwidth(DRAM_PROBE_BYTES, repeats=3)
    progress = tqdm(total=len(shapes) * len(kinds) * len(threads_list) * len(batches), desc="bench kernels", unit="row")
    for model, n, k in shapes:
        dense = torch.randn(n, k) * 0.02
        for kind in kinds:
            w = random_weight(n, k, kind, args.group_size)
            lut = cpu.prepare(w)
            deq = cpu_dequant.prepare(w) if cpu_dequant.available() else None
            for threads in threads_list:
                torch.set_num_threads(threads)
                cpu.set_num_threads(threads)
                cached = cpu.read_bandwidth(lut.nbytes, repeats=20)
                for batch in batches:
                    x = torch.randn(batch, k)
                    fns = {"lutlm": lambda: cpu.matmul(x, lut), "torch_fp32": lambda: torch.nn.functional.linear(x, dense)}
                    if deq is not None:
                        fns["dequant"] = lambda: cpu_dequant.matmul(x, deq)
                    t = time_calls(fns)
                    row = {
                        "model": model, "shape": f"{n}x{k}", "out": n, "in": k, "bits": kind,
                        "group_size": w.group_size, "threads": threads, "batch": batch, "isa": cpu.get_isa(),
                        "lutlm_kernel": "dot" if cpu.uses_dot_gemm(lut, batch) else "lookup",
                        "weight_bytes": lut.nbytes,
                        "lutlm_weight_GBps": lut.nbytes / t["lutlm"]["ms"] / 1e6,
                        "lutlm_cold_weight_GBps": lut.nbytes / t["lutlm"]["cold_ms"] / 1e6,
                        "mem_read_dram_GBps": bandwidth[threads] / 1e9,
                        "mem_read_weight_size_GBps": cached / 1e9,
                        "speedup_vs_torch_fp32": t["torch_fp32"]["ms"] / t["lutlm"]["ms"],
                        "cold_speedup_vs_torch_fp32": t["torch_fp32"]["cold_ms"] / t["lutlm"]["cold_ms"],
                    }
                    for name, times in t.items():
                        row.update({f"{name}_{key}": value for key, value in times.items()})
                    if deq is not None:
                        row.update({
                            "dequant_weight_bytes": deq.nbytes,
                            "speedup_vs_dequant": t["dequant"]["ms"] / t["lutlm"]["ms"],
                            "cold_speedup_vs_dequant": t["dequant"]["cold_ms"] / t["lutlm"]["cold_ms"],
                        })
                    rows.append(row)
                    progress.update()
        del dense
    progress.close()
    return rows


def print_table(rows: list[dict]) -> None:
    print("warm: weights left in cache by the previous call; cold: after the other contenders ran")
    print("kernel: lookup = table lookup; dot = 4-bit batch as int8 dot products of codes recovered from the bit-planes")
    if rows:
        isa = rows[0]["isa"]
        print(f"instruction set: {isa}; dequant: " + (DEQUANT_LABELS[isa] if "dequant_ms" in rows[0] else "not available"))
    print(f"{'shape':>11} {'bits':>7} {'thr':>3} {'batch':>5} {'kernel':>6} | {'lutlm ms warm (p25-p75)':>25} {'cold':>7} | "
          f"{'torch fp32':>10} | {'dequant':>7} {'cold':>7} | {'x torch':>7} {'x deq':>5} {'cold':>5} | "
          f"{'GB/s':>5} {'cold':>5} {'DRAM':>5} {'same-size':>9}")
    for r in rows:
        deq = f"{r['dequant_ms']:7.3f} {r['dequant_cold_ms']:7.3f}" if "dequant_ms" in r else f"{'-':>7} {'-':>7}"
        xdeq = f"{r['speedup_vs_dequant']:5.2f} {r['cold_speedup_vs_dequant']:5.2f}" if "dequant_ms" in r else f"{'-':>5} {'-':>5}"
        lut = f"{r['lutlm_ms']:.3f} ({r['lutlm_p25_ms']:.3f}-{r['lutlm_p75_ms']:.3f})"
        print(f"{r['shape']:>11} {r['bits']:>7} {r['threads']:>3} {r['batch']:>5} {r.get('lutlm_kernel', '-'):>6} | "
              f"{lut:>25} {r['lutlm_cold_ms']:7.3f} | "
              f"{r['torch_fp32_ms']:10.3f} | {deq} | {r['speedup_vs_torch_fp32']:7.1f} {xdeq} | "
              f"{r['lutlm_weight_GBps']:5.1f} {r['lutlm_cold_weight_GBps']:5.1f} {r['mem_read_dram_GBps']:5.1f} "
              f"{r['mem_read_weight_size_GBps']:9.1f}")


def plot(rows: list[dict], path: Path) -> None:
    """Time against bits, one panel per shape and batch (first thread count)."""
    from lutlm.bench.plotting import pyplot

    plt = pyplot()

    threads = rows[0]["threads"]
    panels = sorted({(r["batch"], r["shape"]) for r in rows if r["threads"] == threads},
                    key=lambda p: (p[0], [r["shape"] for r in rows].index(p[1])))
    cols = min(3, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(4.2 * cols, 3.3 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (batch, shape) in zip(axes.flat, panels):
        sel = [r for r in rows if r["threads"] == threads and r["batch"] == batch and r["shape"] == shape]
        labels = [r["bits"] for r in sel]
        xs = range(len(sel))
        label = "lutlm (4-bit: int8 dot)" if any(r.get("lutlm_kernel") == "dot" for r in sel) else "lutlm table lookup"
        ax.plot(xs, [r["lutlm_ms"] for r in sel], "o-", color="C0", label=label)
        ax.plot(xs, [r["lutlm_cold_ms"] for r in sel], "o:", color="C0", alpha=0.5, label="lutlm, cold cache")
        if all("dequant_ms" in r for r in sel):
            ax.plot(xs, [r["dequant_ms"] for r in sel], "s--", color="C1", label=DEQUANT_LABELS.get(sel[0]["isa"], "dequantize"))
        ax.axhline(sel[0]["torch_fp32_ms"], color="gray", linestyle=":", label="PyTorch fp32")
        ax.set_xticks(list(xs), labels)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (codes)")
        ax.set_ylabel("ms")
        ax.set_title(f"{shape}, batch {batch}, {threads} thread(s)", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_kernels(args) -> None:
    if args.device == "cuda":
        from lutlm.bench import gpu_kernels

        gpu_kernels.run(args)
        return
    rows = run(args)
    print_table(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"wrote {args.plot}")


def add_parser(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("kernels", help="mpGEMM kernels against PyTorch fp32 and dequantize-then-multiply",
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shapes", default=",".join(MODEL_SHAPES),
                   help="comma-separated OUTxIN shapes or model names (" + ", ".join(MODEL_SHAPES) + ")")
    p.add_argument("--bits", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--batch", default="1,128", help="comma-separated batch sizes (tokens)")
    p.add_argument("--json", help="write the rows as JSON to this file")
    p.add_argument("--plot", help="write a time-against-bits plot (PNG) to this file")
    from lutlm.bench import gpu_kernels

    gpu_kernels.add_cuda_arguments(p)  # the cuda branch's options; --group-size is shared
    p.set_defaults(func=cmd_kernels)
