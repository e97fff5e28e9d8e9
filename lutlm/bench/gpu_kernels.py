"""`lutlm bench kernels --device cuda`: the GPU mpGEMM kernels against cuBLAS fp16 on the layer
shapes of Llama-2-7B, Llama-3-8B and Llama-2-70B, and of the bundled SmolLM2-135M.

For each shape, bits (2, 3, 4, ternary) and batch, the row gives the time of the kernel the
dispatcher chooses, the best time of each kernel (table lookup, dequantize), cuBLAS fp16
(`torch.matmul`) on the same shape, the weight bytes per second against the device-to-device
copy bandwidth measured in the same run, and the roofline time (weight bytes over that
bandwidth). Times are medians (with 25th/75th percentiles) of CUDA-graph replays, each of 40
launches over enough weight copies to overflow L2 (see lutlm.bench.gpu_timing). Where the
choice is the dp4a GEMV, the row also gives its time launched with PDL, as the GPU decoder
launches it (``us_pdl``): each launch may read its weights while the previous one finishes, but
waits for it before it reads the activations, as a dependent product must; cuBLAS launches as
torch.matmul does. With --tune every candidate configuration is timed (the GEMV with PDL) and
the winners are written to the tuning table (replacing the entries of the same weights, shape
and batch, keeping the others).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

MODEL_SHAPES = {  # (out, in) of each distinct linear
    # the bundled model, its q/k/v and gate/up stacked as lutlm.gpu_decode multiplies them
    "smollm2-135m": {"q_o": (576, 576), "down": (576, 1536), "qkv_stacked": (960, 576),
                     "gate_up_stacked": (3072, 576)},
    "llama2-7b": {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008),
                  # q, k, v and gate, up stacked by rows, as lutlm.gpu_decode multiplies them
                  "qkv_stacked": (12288, 4096), "gate_up_stacked": (22016, 4096)},
    "llama3-8b": {"q_o": (4096, 4096), "k_v": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)},
    "llama2-70b": {"q_o": (8192, 8192), "k_v": (1024, 8192), "gate_up": (28672, 8192), "down": (8192, 28672)},
}
KINDS = {"2": (2, False), "3": (3, False), "4": (4, False), "ternary": (2, True)}


def add_cuda_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the cuda branch of `lutlm bench kernels`."""
    p.add_argument("--models", default=",".join(MODEL_SHAPES), help="comma-separated: " + ", ".join(MODEL_SHAPES))
    p.add_argument("--gpu-bits", default="2,3,4,ternary", help="comma-separated: 2, 3, 4, ternary")
    p.add_argument("--gpu-batch", default="1,4,8,16,64,256", help="comma-separated batch sizes")
    p.add_argument("--group-size", type=int, default=128,
                   help="weights per scale; a shape whose input size it does not divide (SmolLM2's 576) runs at "
                        "the largest group that divides both")
    p.add_argument("--tune", action="store_true", help="time every candidate and write the tuning table")
    p.add_argument("--table", type=Path, help="tuning table to write with --tune (default: the package's)")
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/gpu_kernels_<device>.json)")


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def cublas_time(n: int, k: int, batch: int):
    from lutlm.bench.gpu_timing import copies_to_defeat_cache, time_calls

    weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
               for _ in range(copies_to_defeat_cache(n * k * 2))]
    x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
    return time_calls([lambda w=w: torch.matmul(x, w.t()) for w in weights])


def run(args) -> list[dict]:
    from lutlm.bench import gpu_timing
    from lutlm.kernels import gpu, gpu_tuning
    from lutlm.kernels.gpu_ops import pdl_supported

    if not torch.cuda.is_available():
        sys.exit("lutlm bench kernels --device cuda: no CUDA device here")
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODEL_SHAPES]
    if unknown:
        sys.exit(f"unknown model shapes {unknown}; choose from {', '.join(MODEL_SHAPES)}")
    kinds = args.gpu_bits.split(",")
    if any(b not in KINDS for b in kinds):
        sys.exit(f"--gpu-bits takes {', '.join(KINDS)}, got {args.gpu_bits}")
    batches = [int(b) for b in args.gpu_batch.split(",")]
    bandwidth = gpu_timing.copy_bandwidth()
    with_pdl = pdl_supported(torch.device("cuda"))
    shapes = {}  # (n, k) -> the layers that have it
    for model in models:
        for layer, shape in MODEL_SHAPES[model].items():
            shapes.setdefault(shape, []).append(f"{model}.{layer}")
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", file=sys.stderr)
    rows, table = [], []
    jobs = [(shape, kind) for shape in shapes for kind in kinds]
    cublas: dict[tuple[int, int, int], tuple[float, float, float]] = {}
    for (n, k), kind in tqdm(jobs, desc="gpu kernels", unit="case"):
        bits, ternary = KINDS[kind]
        group = math.gcd(k, args.group_size)
        handles = gpu_timing.random_handles(n, k, bits, group, with_lut=True, ternary=ternary)
        nbytes = handles[0].dequant.nbytes
        for batch in batches:
            x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
            if (n, k, batch) not in cublas:
                cublas[(n, k, batch)] = cublas_time(n, k, batch)
            per_kernel = {}
            if args.tune and not ternary:  # ternary runs the 2-bit kernels, so it shares their entries
                entry = gpu_timing.tune_case(handles, x)
                table.append(entry)
                per_kernel = entry["per_kernel"]
                plan = gpu_tuning.Plan.from_dict(entry["best"])
            else:  # the dispatcher's choice; while tuning, from the entries just measured
                plan = (gpu_tuning.choose(table, handles[0].kind, n, k, batch) if args.tune
                        else gpu.plan_for(handles[0], batch))
            timing = gpu_timing.time_plan(handles, x, plan)
            pdl = gpu_timing.time_plan(handles, x, plan, overlap=True) if gpu.is_gemv(plan) and with_pdl else None
            cb = cublas[(n, k, batch)]
            rows.append({
                "layers": shapes[(n, k)], "n": n, "k": k, "bits": kind, "group_size": group, "batch": batch,
                "kernel": plan.kernel, "config": plan.to_dict()["config"],
                "us": round(timing[0], 2), "us_p25": round(timing[1], 2), "us_p75": round(timing[2], 2),
                "per_kernel_us": {name: v["us"] for name, v in per_kernel.items()},
                "cublas_fp16_us": round(cb[0], 2), "cublas_p25": round(cb[1], 2), "cublas_p75": round(cb[2], 2),
                "speedup_vs_cublas": round(cb[0] / timing[0], 2),
                **({"us_pdl": round(pdl[0], 2), "us_pdl_p25": round(pdl[1], 2), "us_pdl_p75": round(pdl[2], 2),
                    "speedup_vs_cublas_pdl": round(cb[0] / pdl[0], 2)} if pdl else {}),
                "weight_bytes": nbytes, "weight_GBps": round(nbytes / timing[0] / 1e3, 1),
                "fraction_of_copy_bandwidth": round(nbytes / timing[0] / 1e-6 / bandwidth, 3),
                "roofline_us": round(nbytes / bandwidth * 1e6, 2),
            })
        del handles
        torch.cuda.empty_cache()
        save(rows, table, bandwidth, args)  # after every case, so that a cut-off run still leaves results
    plot(rows, results_path(args).with_suffix(".png"))
    print_table(rows)
    return rows


def results_path(args) -> Path:
    return args.out or Path("benchmarks/results") / f"gpu_kernels_{device_slug()}.json"


def save(rows: list[dict], table: list[dict], bandwidth: float, args) -> None:
    from lutlm.kernels import gpu_tuning
    import triton

    if args.tune:
        gpu_tuning.save_table(table, args.table or gpu_tuning.TABLE_PATH)
    out = results_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "timing": "median of 15 CUDA-graph replays, each 40 launches over weight copies that overflow L2; "
                  "p25/p75 give the spread. us_pdl: the dp4a GEMV launched with PDL, as the GPU decoder "
                  "launches it (weights read while the previous launch finishes, activations after it)",
        "weight_bytes": "packed codes + fp16 scales and zeros, as the GPU layout stores them",
        "rows": rows,
    }, indent=1) + "\n")


def print_table(rows: list[dict]) -> None:
    print(f"{'layers':28s} {'bits':>7s} {'batch':>5s} {'kernel':>7s} {'us':>8s} {'PDL us':>8s} {'cuBLAS':>8s} "
          f"{'x':>6s} {'x PDL':>6s} {'GB/s':>6s} {'of copy':>7s} {'roof us':>7s}")
    for r in rows:
        pdl_us, pdl_x = ((f"{r['us_pdl']:8.1f}", f"{r['speedup_vs_cublas_pdl']:6.2f}") if "us_pdl" in r
                         else (f"{'-':>8s}", f"{'-':>6s}"))
        print(f"{r['layers'][0]:28s} {r['bits']:>7s} {r['batch']:5d} {r['kernel']:>7s} {r['us']:8.1f} {pdl_us} "
              f"{r['cublas_fp16_us']:8.1f} {r['speedup_vs_cublas']:6.2f} {pdl_x} {r['weight_GBps']:6.0f} "
              f"{r['fraction_of_copy_bandwidth']:7.2f} {r['roofline_us']:7.1f}")


def plot(rows: list[dict], path: Path) -> None:
    """Batch-1 time against bits per shape, with cuBLAS fp16 for reference."""
    from lutlm.bench.plotting import pyplot

    plt = pyplot()

    order = ["2", "ternary", "3", "4"]
    shapes = sorted({(r["n"], r["k"]) for r in rows})
    colors = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(10, 6))
    for i, (n, k) in enumerate(shapes):
        sel = sorted((r for r in rows if (r["n"], r["k"]) == (n, k) and r["batch"] == 1),
                     key=lambda r: order.index(r["bits"]))
        if not sel:
            continue
        line, = ax.plot([r["bits"] for r in sel], [r["us"] for r in sel], marker="o", label=f"{n}x{k}",
                        color=colors(i % colors.N))
        if all("us_pdl" in r for r in sel):
            ax.plot([r["bits"] for r in sel], [r["us_pdl"] for r in sel], marker="x", linestyle="--",
                    color=line.get_color(), linewidth=1)
        ax.axhline(sel[0]["cublas_fp16_us"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("batch-1 time (us); dashed: with PDL; dotted: cuBLAS fp16")
    groups = " or ".join(str(g) for g in sorted({r["group_size"] for r in rows}))
    ax.set_title(f"lutlm GPU GEMV, groups of {groups} weights")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cuda_arguments(p)
    run(p.parse_args())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
