"""Which CPU kernel family runs a weight on this machine: table lookup ("lut") or int8 dot
products of the unpacked codes ("dot").

Table lookup costs grow with the bit-width and not with the multiply units; dot products
cost the same at every width up to 8 bits, and on CPUs with fast int8 multiply-adds (AVX-512
VNNI) they can beat the lookups at 2 and 4 bits. So the choice is measured, not assumed: for
a bit-width both families run (1 to 4 bits, groups that are multiples of 32), a one-token
product (decode) and a 64-token one (prefill) of 4096 x 4096 weights, cycled over copies that
overflow the L2 cache, are timed with each family at the current thread count, alternating,
and the family with the smaller sum of slowdowns (fastest rounds) wins. Widths
and groups only the dot kernels run (5 to 8 bits, groups of 16) go there.

Results are kept per CPU (model name, instruction set, threads) in a JSON file under the
cache directory (LUTLM_CACHE_DIR, else ~/.cache/lutlm), so a machine measures once, about a
second per bit-width. LUTLM_KERNEL=lut or dot forces a family wherever it
runs the weight.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from lutlm.kernels import cpu

FAMILIES = ("lut", "dot")
BENCH_SHAPE = (4096, 4096)
BENCH_COPIES = 8  # 4-bit: 8 x 8 MiB, beyond any L2 (and most L3 slices)
_measured: dict[str, str] = {}


def cache_dir() -> str:
    return os.environ.get("LUTLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lutlm")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_key(bits: int, group_size: int) -> str:
    return f"{_cpu_name()} | {cpu.get_isa()} | {cpu.get_num_threads()} threads | {bits}-bit g{group_size}"


def _cache_path() -> str:
    return os.path.join(cache_dir(), "kernel_choice.json")


def _read_cache() -> dict:
    try:
        with open(_cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, family: str, timings: dict) -> None:
    """Best effort: a read-only home only means measuring again next time."""
    data = _read_cache()
    data[key] = {"family": family, "us": timings}
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = _cache_path() + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, _cache_path())
    except OSError:
        pass


def measure(bits: int, group_size: int, rounds: int = 5) -> dict[str, dict[str, float]]:
    """Microseconds per family (the fastest of `rounds`) of a one-token (decode) and a 64-token
    (prefill) product with 4096 x 4096 weights, the families alternating."""
    n, k = BENCH_SHAPE
    g = torch.Generator().manual_seed(0)
    handles = {family: [] for family in FAMILIES}
    for _ in range(BENCH_COPIES):
        codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
        scales = (torch.rand(n, k // group_size, generator=g) * 0.01).half()
        zeros = torch.full((n, k // group_size), (2 ** bits - 1) / 2).half()
        for family in FAMILIES:
            handles[family].append(cpu.prepare_codes(codes, scales, zeros, bits, group_size, kernel=family))
        del codes
    inputs = {"gemv": torch.randn(1, k), "gemm64": torch.randn(64, k)}
    times = {family: {shape: [] for shape in inputs} for family in FAMILIES}
    for r in range(rounds + 1):  # round 0 warms up
        for shape, x in inputs.items():
            for family in FAMILIES:
                start = time.perf_counter()
                for h in handles[family]:
                    cpu.matmul(x, h)
                if r:
                    times[family][shape].append((time.perf_counter() - start) / BENCH_COPIES * 1e6)
    # The fastest round, not the median: other work on the machine only ever adds time, and a
    # choice made from a disturbed median would be kept in the cache.
    return {family: {shape: round(min(t), 1) for shape, t in by_shape.items()} for family, by_shape in times.items()}


def fastest(timings: dict[str, dict[str, float]]) -> str:
    """The family with the smallest sum of slowdowns against the best of each shape: decode
    and prefill count alike (a family 5% faster at decode but twice as slow at prefill loses)."""
    best = {shape: min(t[shape] for t in timings.values()) for shape in next(iter(timings.values()))}
    return min(timings, key=lambda f: sum(timings[f][s] / best[s] for s in best))


def cpu_kernel(bits: int, group_size: int, in_features: int, ternary: bool = False) -> str:
    """The family that runs a `bits`-bit weight with groups of `group_size` fastest here."""
    runs = [f for f in FAMILIES if cpu.supports(bits, group_size, in_features, f)]
    if not runs:
        raise ValueError(f"no CPU kernel runs {bits}-bit weights in groups of {group_size} over {in_features} inputs")
    forced = os.environ.get("LUTLM_KERNEL")
    if forced:
        if forced not in FAMILIES:
            raise ValueError(f"LUTLM_KERNEL={forced!r}: choose one of {', '.join(FAMILIES)}")
        if forced in runs:
            return forced
    if len(runs) == 1:
        return runs[0]
    # One measurement per width and group class: every group that is a multiple of 32 runs alike.
    bench_group = 128 if group_size % 128 == 0 else 32 if group_size % 32 == 0 else group_size
    key = _machine_key(bits, bench_group)
    if key not in _measured:
        cached = _read_cache().get(key)
        if isinstance(cached, dict) and cached.get("family") in FAMILIES:
            _measured[key] = cached["family"]
        else:
            timings = measure(bits, bench_group)
            _measured[key] = fastest(timings)
            _write_cache(key, _measured[key], timings)
    return _measured[key]
