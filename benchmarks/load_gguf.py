"""Load time and peak resident memory of `lutlm.loader.load_model` on a GGUF, in this process.

    python benchmarks/load_gguf.py FILE [--layout-cache DIR] [--drop-caches] [--new-tokens N]

Prints one JSON line: the seconds of the imports and of the load call, the process's peak
resident memory (VmHWM) after the load and after generating N tokens, the file's size and
the peak over it. --drop-caches first asks the kernel to drop the page cache (root only), so
that the load reads the file from disk (a cold load). Run it once per figure: each run is a
fresh process, so no figure inherits another's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--layout-cache")
    p.add_argument("--drop-caches", action="store_true")
    p.add_argument("--new-tokens", type=int, default=8)
    args = p.parse_args()
    if args.drop_caches:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    start = time.perf_counter()
    from lutlm.generate import Generator, SamplingParams
    from lutlm.loader import load_model

    loaded = time.perf_counter()
    model, tokenizer, _ = load_model(args.file, layout_cache=args.layout_cache, progress=False)
    done = time.perf_counter()
    at_load = vm_hwm()
    generator = Generator(model, tokenizer, 256)
    generator.complete(tokenizer.encode("The capital of France is"), SamplingParams(max_new_tokens=args.new_tokens))
    size = os.path.getsize(args.file)
    print(json.dumps({
        "file": os.path.basename(args.file), "file_bytes": size, "cold": args.drop_caches,
        "layout_cache": bool(args.layout_cache), "imports_s": round(loaded - start, 2),
        "load_s": round(done - loaded, 2), "peak_rss_load": at_load, "peak_rss_after_generate": vm_hwm(),
        "peak_over_file": round(vm_hwm() / size, 3),
        "decode_tokens_per_s": round(generator.stats.decode_tokens_per_second, 2),
    }))


if __name__ == "__main__":
    main()
