"""Perplexity of lutlm and llama.cpp on the same GGUF of each block type, on the same tokens.

The bundled SmolLM2-135M-Instruct is written as an F16 GGUF (its Q4_1 weights dequantized),
llama.cpp's own quantizer makes each type from it, and each file is scored by lutlm as
loaded by default (every linear on the kernels from the file's blocks) and by llama.cpp in
the same run: WikiText-2 raw test, context 512, the second half of each chunk scored, as
llama.cpp's perplexity tool does. SmolLM2's width 576 is not a multiple of 256, so llama.cpp
stores the rows that a K-quant or ternary type cannot hold in its fallback type; the table
lists each file's tensor types.

    python benchmarks/ppl_gguf_types.py --machine xeon-avx512 [--chunks 20] [--types Q4_0,...]

Writes benchmarks/results/<machine>/ppl_gguf_types.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

TYPES = ("Q4_0", "Q4_1", "Q4_K_M", "Q2_K", "Q6_K", "Q8_0", "TQ1_0", "TQ2_0")
REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--machine", required=True, help="results folder name, e.g. xeon-avx512")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "lutlm-ppl-types")
    args = p.parse_args()

    from lutlm import peer
    from lutlm.bench.e2e_gguf import QUANT_TYPES, cpu_model
    from lutlm.cli import set_threads
    from lutlm.linear import linear_summary
    from lutlm.formats import load_checkpoint
    from lutlm.formats.gguf import bundled_model_path
    from lutlm.formats.gguf_writer import save_gguf
    from lutlm.loader import load_model
    from lutlm.perplexity import DEFAULT_TEXT, model_perplexity, perplexity_tokens, read_text, score_chunks

    if not peer.available():
        raise SystemExit("this comparison needs llama-cpp-python (make peer)")
    set_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    f16 = args.work_dir / "smollm2-F16.gguf"
    if not f16.exists():
        save_gguf(load_checkpoint(bundled_model_path()), f16, "F16")
    text = read_text(str(REPO / DEFAULT_TEXT))
    rows = []
    for kind in args.types.split(","):
        path = args.work_dir / f"smollm2-{kind}.gguf"
        if not path.exists():
            peer.quantize(str(f16), str(path), QUANT_TYPES[kind])
        model, tokenizer, checkpoint = load_model(str(path))
        start = time.perf_counter()
        ours = model_perplexity(model, tokenizer, text, 512, args.chunks)
        ours_s = time.perf_counter() - start
        llama = peer.LlamaCpp(str(path), n_ctx=512, n_threads=args.threads)
        tokens, bos = perplexity_tokens(tokenizer, text)  # the very tokens lutlm scored
        start = time.perf_counter()
        theirs = score_chunks(llama.logits, tokens, 512, args.chunks, None, bos)
        theirs_s = time.perf_counter() - start
        types = Counter(checkpoint.tensor_types.values())
        rows.append({
            "type": kind, "file_mib": round(os.path.getsize(path) / 2**20, 1),
            "tensor_types": ", ".join(f"{t} x{n}" for t, n in types.most_common()),
            "lutlm_linears": linear_summary(model, checkpoint.tensor_types),
            "lutlm": round(ours.perplexity, 4), "llama.cpp": round(theirs.perplexity, 4),
            "difference_pct": round((ours.perplexity / theirs.perplexity - 1) * 100, 3),
            "tokens_scored": ours.tokens_scored, "chunks": ours.chunks,
            "lutlm_seconds": round(ours_s, 1), "llama.cpp_seconds": round(theirs_s, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
        del model, llama
    result = {"machine": f"{cpu_model()} ({platform.machine()})", "threads": args.threads,
              "command": f"python benchmarks/ppl_gguf_types.py --machine {args.machine} --chunks {args.chunks} "
                         f"--threads {args.threads} --types {args.types}",
              "llama_cpp": peer.version(), "rows": rows}
    out = REPO / "benchmarks" / "results" / args.machine
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppl_gguf_types.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "ppl_gguf_types.md").write_text(markdown(result, args.chunks))
    print(markdown(result, args.chunks))


def markdown(result: dict, chunks: int) -> str:
    rows = result["rows"]
    lines = ["# Perplexity of the same GGUF: lutlm (default load, every linear on the kernels) vs llama.cpp", "",
             f"{result['machine']}; {result['threads']} threads; llama-cpp-python {result['llama_cpp']}; WikiText-2 "
             f"raw test, context 512, first {chunks} chunks, the same tokens for both engines.", "",
             f"Command: `{result['command']}`", "",
             "| type | file MiB | tensor types | lutlm | llama.cpp | lutlm vs llama.cpp | within 0.5% |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['type']} | {r['file_mib']} | {r['tensor_types']} | {r['lutlm']:.4f} | {r['llama.cpp']:.4f} | "
              f"{r['difference_pct']:+.3f}% | {'yes' if abs(r['difference_pct']) <= 0.5 else '**no**'} |" for r in rows]
    lines += ["", "lutlm's kernels per file:", ""] + [f"- {r['type']}: {r['lutlm_linears']}" for r in rows]
    broken = [r["type"] for r in rows if r["llama.cpp"] > 1000]
    if broken:
        lines += ["", f"{', '.join(broken)}: SmolLM2 is not a ternary model, and ternarizing its weights leaves "
                      "noise (perplexity in the thousands or more for both engines), where perplexity magnifies "
                      "small differences of the mean log-loss: lutlm vs llama.cpp "
                      + ", ".join(f"{r['type']} {math.log(r['lutlm']):.3f} vs {math.log(r['llama.cpp']):.3f} nats"
                                  for r in rows if r["type"] in broken)
                      + ". The ternary blocks' mapping itself is exact (tests/test_ggml_groups.py)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
