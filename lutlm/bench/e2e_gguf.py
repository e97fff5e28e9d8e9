"""`lutlm bench e2e --gguf FILE[,FILE...]` and `--synthetic-types TYPE[,TYPE...]`: lutlm and
llama.cpp on the identical GGUF file.

Both engines read the same file: the same weights, in the same block types, output head
included. lutlm loads it with `lutlm.loader.load_model` (every linear runs on its CPU kernels
straight from the file's blocks; see lutlm.gguf_linears), prefills by model.forward and
decodes by lutlm.fast_decode, as `lutlm bench e2e`'s LutlmRunner; llama.cpp loads it through
llama-cpp-python (lutlm.peer.LlamaCpp). Timing is e2e.time_variants': per thread count,
`--repeats` rounds after an untimed warm-up, the two engines interleaved inside each round;
figures are median [min, max] over the rounds.

Per file and row:
    weight bytes per token   the bytes of the file's linear tensors that one decode step reads:
                             every blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,
                             ffn_down} plus the output head (output.weight, or token_embd.weight
                             where the head is tied), as the GGUF stores them. The same number for
                             both engines: it is the file's, not either engine's layout.
    bandwidth fraction       weight bytes per token x decode tokens/s / the machine's streaming
                             read bandwidth at that thread count (lutlm.kernels.cpu.read_bandwidth
                             over a buffer well beyond the last-level cache, measured once per
                             thread count at the start of the run).
    load                     in a fresh Python process per engine, the file read beforehand so
                             that it is in the page cache (a warm load): wall time of the load
                             call, and the process's peak resident memory (VmHWM, see LOAD_CHILD) at its end
                             and after a first 8-token prefill (llama.cpp maps the file and
                             touches its pages on first use, so the second figure is the one that
                             compares like with like); also the resident memory before the load
                             (interpreter and imports: the llama.cpp child imports llama_cpp only,
                             not torch).

--synthetic-types writes a synthetic Llama-2-7B/Llama-3-8B-shaped model (lutlm.bench.synthetic,
`--layers` decoder layers, the full-size vocabulary head) as an F16 GGUF, quantizes it with
llama.cpp's own quantizer to each type (files cached in --work-dir) and runs each file as above.

Targets per file and thread count: decode tokens/s lutlm / llama.cpp >= 1.0 (>= 1.3 for Q2_K and
TQ1_0), prefill-512 tokens/s lutlm / llama.cpp >= 1.0, and lutlm's bandwidth fraction >= 0.85.

Results: benchmarks/results/<--machine>/e2e_gguf_<name>.md and .png, and .json with --json.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lutlm import peer
from lutlm.bench import e2e

# Types --synthetic-types makes, by llama.cpp's file-type name -> the name lutlm.peer.quantize
# takes for the same llama_ftype (peer.FTYPES names ftype 12/15/17, the _M mixes, "Q3_K"/"Q4_K"/"Q5_K").
QUANT_TYPES = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q8_0": "Q8_0", "Q2_K": "Q2_K", "Q3_K_M": "Q3_K",
               "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0"}
DEFAULT_SYNTHETIC_TYPES = ("Q4_0", "Q4_K_M", "Q2_K", "Q6_K", "Q8_0", "TQ1_0", "TQ2_0")
SYNTHETIC_MODELS = ("llama2-7b", "llama3-8b")
DEFAULT_LAYERS = 8

LINEAR_TENSOR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
DECODE_RATIO = {"Q2_K": 1.3, "TQ1_0": 1.3}  # lutlm / llama.cpp decode tokens/s; 1.0 for other types
PREFILL_RATIO = 1.0  # at prefill 512
BANDWIDTH_FRACTION = 0.85  # lutlm's decode
PREFILL_TARGET_TOKENS = 512
FIRST_PREFILL_TOKENS = 8  # the load children's first prefill
MACHINES = ("xeon-avx512", "epyc-zen5-avx512", "epyc-zen3-avx2")  # existing result folders, named in errors


# ---- what a file holds ----

@dataclass
class GGUFInfo:
    """A GGUF file's linears, from its header: what one decode step reads."""

    path: str
    label: str  # the row's name: the type (synthetic files) or the file name
    file_type: str  # llama.cpp's name for the file's type (general.file_type), e.g. "Q4_K_M"
    file_bytes: int
    layer_bytes: int  # every blk.N linear
    layer_weights: int
    layer_types: dict[str, int]  # ggml type -> number of blk.N linear tensors
    head_tensor: str
    head_type: str
    head_bytes: int
    vocab_size: int
    config: dict = field(default_factory=dict)  # shapes, filled once lutlm has loaded the file
    lutlm_linears: str = ""  # how lutlm runs the linears, filled once it has loaded the file
    errors: dict[str, str] = field(default_factory=dict)  # engine -> why it could not load or run the file

    @property
    def bytes_per_token(self) -> int:
        return self.layer_bytes + self.head_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.layer_bytes / self.layer_weights

    def to_dict(self) -> dict:
        return asdict(self) | {"bytes_per_token": self.bytes_per_token,
                               "bits_per_weight": round(self.bits_per_weight, 4)}


def _metadata(reader, key: str):
    """A metadata value from lutlm's GGUF reader (`.metadata`) or gguf-py's (`.fields`)."""
    if hasattr(reader, "metadata"):
        value = reader.metadata.get(key)
    else:
        f = reader.fields.get(key)
        value = None if f is None else f.parts[f.data[0]][0]
    return value.item() if hasattr(value, "item") else value


def file_type_name(value, layer_types: Counter) -> str:
    """llama.cpp's name for a general.file_type value, e.g. 15 -> "Q4_K_M"; without one, the
    commonest type of the linears."""
    from gguf import LlamaFileType

    if value is not None:
        try:
            name = LlamaFileType(int(value)).name
            return {"ALL_F32": "F32"}.get(name, name.removeprefix("MOSTLY_"))
        except ValueError:
            pass
    return layer_types.most_common(1)[0][0]


def gguf_info(path: str | os.PathLike, label: str | None = None) -> GGUFInfo:
    """The linears of the GGUF at `path`, or a one-line error naming the file."""
    from lutlm.formats.gguf import open_gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"--gguf: no such file: {path}")
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    linears = [t for name, t in tensors.items() if LINEAR_TENSOR.fullmatch(name)]
    if not linears:
        raise ValueError(f"{path}: no decoder-layer linear tensors (blk.N.attn_q.weight ...)")
    head_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if head_name not in tensors:
        raise ValueError(f"{path}: neither output.weight nor token_embd.weight: no output head")
    head = tensors[head_name]
    layer_types = Counter(t.tensor_type.name for t in linears)
    file_type = file_type_name(_metadata(reader, "general.file_type"), layer_types)
    return GGUFInfo(path=path, label=label or Path(path).name, file_type=file_type,
                    file_bytes=os.path.getsize(path), layer_bytes=sum(int(t.n_bytes) for t in linears),
                    layer_weights=sum(int(t.n_elements) for t in linears),
                    layer_types=dict(layer_types.most_common()), head_tensor=head_name,
                    head_type=head.tensor_type.name, head_bytes=int(head.n_bytes),
                    vocab_size=int(tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in tensors
                    else int(head.shape[-1]))


# ---- the machine ----

def cpu_model() -> str:
    """lscpu's 'Model name' (else /proc/cpuinfo's, else platform's)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size per sysfs (0 where it cannot be read)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        match = re.fullmatch(r"(\d+)([KMG]?)", entry.read_text().strip())
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)])
    return max(sizes, default=0)


def bandwidth_buffer_bytes(requested_mib: int | None) -> int:
    """The read-bandwidth buffer: as asked, else 1 GiB or 4 x the last-level cache, the larger."""
    if requested_mib:
        return requested_mib << 20
    return max(1 << 30, 4 * last_level_cache_bytes())


def measure_bandwidth(threads: list[int], nbytes: int) -> dict[int, float]:
    """Streaming read bandwidth (bytes/s) with the kernels' threads, per thread count."""
    from lutlm.kernels import cpu

    if not cpu.available():
        return {}
    before = cpu.get_num_threads()
    result = {}
    for t in threads:
        cpu.set_num_threads(t)
        result[t] = cpu.read_bandwidth(nbytes)
    cpu.set_num_threads(before)
    return result


# ---- load time and memory, each engine in a fresh process ----

# Run by `python -c`, argv[1] a JSON list: engine, path, backend, threads, context, first prefill
# tokens. Prints one JSON line. The llama.cpp child imports llama_cpp alone (lutlm.peer would
# import torch, whose pages would count against llama.cpp); its Llama(...) arguments are those of
# lutlm.peer.LlamaCpp. Peak resident memory is the kernel's high-water mark of the process's own
# memory (VmHWM): getrusage's ru_maxrss would do, but Linux carries it over exec from the parent
# that spawned the child (posix_spawn/vfork), which here holds models and a bandwidth buffer.
LOAD_CHILD = r"""
import json, resource, sys, time
engine, path, backend, threads, context, n_first = json.loads(sys.argv[1])
context = max(context, n_first + 1)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
def peak():
    try:  # this process's own peak: ru_maxrss keeps the spawning parent's over exec
        return status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if engine == "lutlm":
    import torch
    from lutlm.generate import GENERATION_CACHE_DTYPE
    from lutlm.kernels import cpu
    from lutlm.loader import load_model
    if cpu.available():
        cpu.set_num_threads(threads)
    before = peak()
    start = time.perf_counter()
    model, tokenizer, checkpoint = load_model(path, backend=backend, progress=False)
    seconds = time.perf_counter() - start
    at_load = peak()
    vocab = model.config.vocab_size
    tokens = [vocab // 4 + i for i in range(n_first)]
    with torch.inference_mode():
        model.setup_cache(1, context, dtype=GENERATION_CACHE_DTYPE)
        model(torch.tensor([tokens]), 0, last_logits_only=True)
else:
    import os
    import llama_cpp
    before = peak()
    null = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    os.dup2(null, 2)  # llama.cpp's load log
    try:
        start = time.perf_counter()
        llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_batch=context, n_ubatch=min(context, 512),
                              n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        seconds = time.perf_counter() - start
        at_load = peak()
        vocab = llm.n_vocab()
        llm.eval([vocab // 4 + i for i in range(n_first)])
    finally:
        os.dup2(saved, 2)
print(json.dumps({"seconds": seconds, "rss_before": before, "peak_rss_load": at_load, "peak_rss_first": peak()}))
"""


def warm_page_cache(path: str) -> None:
    """Read the whole file once, so that a load finds it in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def load_in_child(engine: str, path: str, backend: str, threads: int, context: int, timeout: float = 3600) -> dict:
    args = json.dumps([engine, path, backend, threads, context, FIRST_PREFILL_TOKENS])
    done = subprocess.run([sys.executable, "-c", LOAD_CHILD, args], capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RuntimeError(f"loading {path} with {engine} in a fresh process failed: {why}")
    return json.loads(lines[-1])


def measure_loads(info: GGUFInfo, engines: list[str], args, context: int) -> list[dict]:
    """Load time and peak memory of each engine, `--load-repeats` fresh processes each, the
    engines alternating; the file is read into the page cache before each."""
    samples = {engine: [] for engine in engines}
    for _ in range(args.load_repeats):
        for engine in engines:
            if engine in info.errors:
                continue
            warm_page_cache(info.path)
            try:
                samples[engine].append(load_in_child(engine, info.path, args.backend, max(args.threads), context))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                fail(info, engine, e)
    rows = []
    for engine, runs in samples.items():
        if not runs:
            continue
        row = {"file": info.label, "engine": engine, "file_bytes": info.file_bytes, "runs": runs,
               "seconds": e2e.summarize([r["seconds"] for r in runs])}
        for key in ("rss_before", "peak_rss_load", "peak_rss_first"):
            row[key] = int(statistics.median(r[key] for r in runs))
        row["peak_rss_load_per_file_byte"] = row["peak_rss_load"] / info.file_bytes
        row["peak_rss_first_per_file_byte"] = row["peak_rss_first"] / info.file_bytes
        rows.append(row)
    return rows


# ---- timing one file ----

def fail(info: GGUFInfo, engine: str, error: BaseException) -> None:
    """Note that `engine` could not load or run the file (the report says so; the other engine
    goes on)."""
    text = str(error).strip().splitlines()
    info.errors.setdefault(engine, f"{type(error).__name__}: {text[0] if text else ''}")
    print(f"{engine} could not run {info.path}: {info.errors[engine]}", file=sys.stderr)


def shapes(config) -> dict:
    return {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "vocab_size",
                                            "tie_word_embeddings")}


def time_file(info: GGUFInfo, args, use_peer: bool, context: int) -> list[dict]:
    """Both engines on the file, timed by e2e.time_variants; rows as time_variants' with the file's
    label, type and weight bytes per token."""
    from lutlm.linear import linear_summary
    from lutlm.loader import load_model

    head = f"{info.head_type} ({info.head_tensor})"
    variants = []
    if "lutlm" not in info.errors:
        try:
            model, _, checkpoint = load_model(info.path, backend=args.backend)
            info.config = shapes(checkpoint.config)
            info.lutlm_linears = linear_summary(model, checkpoint.tensor_types)
            del checkpoint
            variants.append(e2e.Variant("lutlm", info.label, info.bits_per_weight, head,
                                        e2e.LutlmRunner(model, context)))
            del model
        except Exception as e:  # a type lutlm cannot load yet: the report says so, llama.cpp goes on
            fail(info, "lutlm", e)
    if use_peer and "llama.cpp" not in info.errors:
        try:
            variants.append(e2e.Variant("llama.cpp", info.label, info.bits_per_weight, head,
                                        peer.LlamaCpp(info.path, n_ctx=context, logits_all=False)))
        except Exception as e:
            fail(info, "llama.cpp", e)
    rows = []
    for variant in list(variants):  # one untimed step each: an engine that loads but cannot run is dropped
        try:
            variant.runner.set_threads(min(args.threads))
            variant.runner.prefill_seconds(e2e.prompt_tokens(info.vocab_size, 2))
            variant.runner.decode_seconds(1)
        except Exception as e:
            fail(info, variant.engine, e)
            variants.remove(variant)
    if variants:
        rows = e2e.time_variants(variants, info.vocab_size, args.threads, args.prompts, args.decode_prompt,
                                 args.new_tokens, args.repeats)
    for v in variants:  # free both engines before the next file
        llm = getattr(v.runner, "llm", None)
        if llm is not None and hasattr(llm, "close"):
            llm.close()
    del variants
    gc.collect()
    for r in rows:
        r.update(file=info.label, file_type=info.file_type, weight_bytes_per_token=info.bytes_per_token)
    return rows


def add_bandwidth(rows: list[dict], bandwidth: dict[int, float]) -> None:
    """Decode rows: bytes/s of weights read, and that over the measured read bandwidth."""
    for r in rows:
        if not r["metric"].startswith("decode"):
            continue
        read = r["weight_bytes_per_token"] * r["tokens_per_s"]["median"]
        r["weight_bytes_per_s"] = read
        bw = bandwidth.get(r["threads"])
        r["bandwidth_fraction"] = read / bw if bw else None


# ---- targets ----

def check_targets(rows: list[dict], files: list[dict] = ()) -> list[dict]:
    """Per file and thread count: decode and prefill-512 ratios lutlm / llama.cpp (where llama.cpp
    ran) and lutlm's bandwidth fraction, each against its requirement; and per file, that each
    engine loaded and ran it (`files`: GGUFInfo.to_dict()s)."""

    def find(engine: str, file: str, threads: int, metric: str) -> dict | None:
        return next((r for r in rows if (r["engine"], r["file"], r["threads"]) == (engine, file, threads)
                     and r["metric"].startswith(metric)), None)

    results = [{"target": f"{engine} loads and runs {f['label']}: {error}", "file": f["label"], "threads": None,
                "lutlm": None, "llama.cpp": None, "value": None, "required": None, "met": False}
               for f in files for engine, error in f["errors"].items()]
    keys = list(dict.fromkeys((r["file"], r["file_type"], r["threads"]) for r in rows))
    for file, file_type, threads in keys:
        where = f"{file}, {threads} thread{'s' if threads > 1 else ''}"
        for metric, required in (("decode", DECODE_RATIO.get(file_type, 1.0)),
                                 (f"prefill {PREFILL_TARGET_TOKENS}", PREFILL_RATIO)):
            ours, theirs = find("lutlm", file, threads, metric), find("llama.cpp", file, threads, metric)
            if ours is None or theirs is None:
                continue
            a, b = ours["tokens_per_s"]["median"], theirs["tokens_per_s"]["median"]
            results.append({"target": f"{ours['metric']} tok/s lutlm / llama.cpp: {where}", "file": file,
                            "threads": threads, "lutlm": round(a, 2), "llama.cpp": round(b, 2),
                            "value": round(a / b, 2), "required": required, "met": a / b >= required})
        ours, theirs = find("lutlm", file, threads, "decode"), find("llama.cpp", file, threads, "decode")
        if ours is not None and ours.get("bandwidth_fraction") is not None:
            fraction = ours["bandwidth_fraction"]
            results.append({"target": f"lutlm decode bandwidth fraction: {where}", "file": file, "threads": threads,
                            "lutlm": round(fraction, 3),
                            "llama.cpp": None if theirs is None else round(theirs["bandwidth_fraction"], 3),
                            "value": round(fraction, 3), "required": BANDWIDTH_FRACTION,
                            "met": fraction >= BANDWIDTH_FRACTION})
    return results


# ---- reporting ----

MIB = 1 << 20


def fmt_seconds(summary: dict) -> str:
    if len(summary["runs"]) == 1:
        return f"{summary['median']:.2f}"
    return f"{summary['median']:.2f} [{summary['min']:.2f}, {summary['max']:.2f}]"


def markdown(result: dict) -> str:
    rows, metrics = result["rows"], list(dict.fromkeys(r["metric"] for r in result["rows"]))
    bw = {b["threads"]: b["bytes_per_s"] for b in result["bandwidth"]}
    lines = [f"# End to end on the same GGUF file: {result['title']}", "",
             f"{result['cpu_model']} ({result['machine']}); {result['peer']}; load average "
             f"{result['load_average']['start']} at start, {result['load_average']['end']} at end.", "",
             f"Command: `{result['command']}`", "", result["method"], "",
             "## Files", "",
             "Weight bytes per token: the file's blk.N linear tensors plus the output head, as stored; "
             "the same for both engines.", "",
             "| file | type | file MiB | layer linears | bits/weight (layers) | head | weight MiB per token | "
             "shapes | lutlm linears |", "|---|---|---|---|---|---|---|---|---|"]
    for f in result["files"]:
        c = f["config"]
        layers = c.get("num_hidden_layers")
        shape = (f"{layers} layer{'s' if layers != 1 else ''}, hidden {c.get('hidden_size')}, ffn "
                 f"{c.get('intermediate_size')}, heads {c.get('num_attention_heads')}/{c.get('num_key_value_heads')}, "
                 f"vocab {c.get('vocab_size')}") if c else ""
        types = ", ".join(f"{t} x {n}" for t, n in f["layer_types"].items())
        lines.append(f"| {f['label']} | {f['file_type']} | {f['file_bytes'] / MIB:.1f} | {types} | "
                     f"{f['bits_per_weight']:.2f} | {f['head_type']} ({f['head_tensor']}) | "
                     f"{f['bytes_per_token'] / MIB:.1f} | {shape} | {f['lutlm_linears']} |")
    problems = [f"- {engine} could not load or run {f['label']}: {error}" for f in result["files"]
                for engine, error in f["errors"].items()]
    if problems:
        lines += [""] + problems
    lines += ["", "## Streaming read bandwidth", ""]
    if bw:
        lines += ["| threads | GB/s |", "|---|---|"]
        lines += [f"| {t} | {b / 1e9:.2f} |" for t, b in sorted(bw.items())]
        lines += ["", f"lutlm.kernels.cpu.read_bandwidth over a {result['bandwidth'][0]['buffer_bytes'] / MIB:.0f} MiB "
                      "buffer, best of 5, measured once per thread count at the start of the run."]
    else:
        lines += ["not measured (the lutlm CPU kernel library is not built)"]
    lines += ["", "## Speed", "", "Tokens/s, median [min, max] over the rounds; the decode row's weight GB/s is "
              "weight bytes per token x decode tokens/s, its fraction that over the read bandwidth at the "
              "same thread count.", "",
              "| file | engine | threads | " + " | ".join(metrics) + " | decode weight GB/s | bandwidth fraction |",
              "|---|---|---|" + "---|" * len(metrics) + "---|---|"]
    keys = list(dict.fromkeys((r["file"], r["engine"], r["threads"]) for r in rows))
    for file, engine, threads in sorted(keys, key=lambda k: (k[2], [f["label"] for f in result["files"]].index(k[0]),
                                                              k[1] != "lutlm")):
        cells = {r["metric"]: r for r in rows if (r["file"], r["engine"], r["threads"]) == (file, engine, threads)}
        decode = next((r for m, r in cells.items() if m.startswith("decode")), None)
        read = f"{decode['weight_bytes_per_s'] / 1e9:.2f}" if decode else ""
        fraction = decode.get("bandwidth_fraction") if decode else None
        lines.append(f"| {file} | {engine} | {threads} | " + " | ".join(
            e2e.fmt(cells[m]["tokens_per_s"]) if m in cells else "" for m in metrics)
            + f" | {read} | {'' if fraction is None else f'{fraction:.2f}'} |")
    lines += ["", "## Load (a fresh process per load, file in the page cache)", "",
              "Seconds of the load call (median [min, max] where repeated); peak resident memory (VmHWM) "
              f"at the end of the load and after a first {FIRST_PREFILL_TOKENS}-token prefill, and before the "
              "load (interpreter and imports), in MiB; the peaks over the file size.", "",
              "| file | engine | file MiB | load s | RSS before load | peak RSS at load | / file | "
              "peak RSS after first prefill | / file |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["loads"]:
        lines.append(f"| {r['file']} | {r['engine']} | {r['file_bytes'] / MIB:.1f} | {fmt_seconds(r['seconds'])} | "
                     f"{r['rss_before'] / MIB:.0f} | {r['peak_rss_load'] / MIB:.0f} | "
                     f"{r['peak_rss_load_per_file_byte']:.2f} | {r['peak_rss_first'] / MIB:.0f} | "
                     f"{r['peak_rss_first_per_file_byte']:.2f} |")
    if not result["loads"]:
        lines.append("| (not measured: --load-repeats 0) | | | | | | | | |")
    if result["targets"]:
        lines += ["", "## Targets", "", "| target | lutlm | llama.cpp | value | required | met |",
                  "|---|---|---|---|---|---|"]
        def cell(value) -> str:
            return "" if value is None else str(value)

        lines += [f"| {t['target']} | {cell(t['lutlm'])} | {cell(t['llama.cpp'])} | {cell(t['value'])} | "
                  f"{cell(t['required'])} | {'yes' if t['met'] else '**no**'} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Tokens/s per file (type), a bar per engine and thread count, a panel per metric, and a panel
    of the decode bandwidth fraction."""
    import numpy as np

    from lutlm.bench.plotting import pyplot

    plt = pyplot()

    rows = result["rows"]
    files = [f["label"] for f in result["files"]]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    series = sorted({(r["engine"], r["threads"]) for r in rows}, key=lambda s: (s[1], s[0] != "lutlm"))
    panels = metrics + (["bandwidth fraction"] if any(r.get("bandwidth_fraction") for r in rows) else [])
    if not panels:  # no engine ran any file: a figure that says so
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{result['title']}: no engine ran (see the report)", ha="center", va="center")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 0.9 * len(files) + 2.5) * len(panels), 4.4),
                             squeeze=False)
    x = np.arange(len(files))
    width = 0.8 / max(1, len(series))
    for ax, panel in zip(axes[0], panels):
        for i, (engine, threads) in enumerate(series):
            label = f"{engine}, {threads} thread{'s' if threads > 1 else ''}"
            color = plt.cm.tab20(2 * (engine != "lutlm") + (0 if threads == min(s[1] for s in series) else 1))
            if panel == "bandwidth fraction":
                picked = {r["file"]: r for r in rows if (r["engine"], r["threads"]) == (engine, threads)
                          and r["metric"].startswith("decode")}
                y = [(picked[f].get("bandwidth_fraction") or 0.0) if f in picked else 0.0 for f in files]
                ax.bar(x + (i - (len(series) - 1) / 2) * width, y, width, label=label, color=color)
                continue
            picked = {r["file"]: r["tokens_per_s"] for r in rows
                      if (r["engine"], r["threads"], r["metric"]) == (engine, threads, panel)}
            y = [picked[f]["median"] if f in picked else 0.0 for f in files]
            err = [[picked[f]["median"] - picked[f]["min"] if f in picked else 0.0 for f in files],
                   [picked[f]["max"] - picked[f]["median"] if f in picked else 0.0 for f in files]]
            ax.bar(x + (i - (len(series) - 1) / 2) * width, y, width, yerr=err, capsize=2, label=label, color=color)
        if panel == "bandwidth fraction":
            ax.axhline(BANDWIDTH_FRACTION, color="gray", linestyle="--", linewidth=1)
            ax.set_ylabel("weight bytes/token x tok/s / read bandwidth")
            ax.set_title("decode: fraction of read bandwidth")
        else:
            ax.set_ylabel("tokens/s")
            ax.set_title(panel)
        ax.set_xticks(x, files, rotation=30 if max(map(len, files), default=0) > 8 else 0, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result['title']}: lutlm and llama.cpp on the same GGUF ({result['cpu_model']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict, out_dir: Path, stem: str, as_json: bool) -> list[Path]:
    return e2e.write_results(result, out_dir, stem, as_json, render=(markdown, plot))


def bundled_file(path: str) -> str:
    """`bundled` names the bundled model's GGUF (a command line that runs anywhere)."""
    if path != "bundled":
        return path
    from lutlm.formats.gguf import bundled_model_path

    return bundled_model_path()


def command_line(args) -> str:
    """The command as typed where it came from `lutlm bench e2e`, else one that reproduces it."""
    argv = sys.argv[1:]
    if "--work-dir" in argv:  # a cache of this machine's: where files are kept changes no figure
        i = argv.index("--work-dir")
        argv = argv[:i] + argv[i + 2:]
    if argv[:2] == ["bench", "e2e"]:
        return shlex.join(["lutlm", *argv])
    parts = ["lutlm", "bench", "e2e"]
    if args.gguf:
        parts += ["--gguf", args.gguf]
    else:
        parts += ["--synthetic-types", args.synthetic_types, "--models", args.models, "--layers", str(args.layers),
                  "--seed", str(args.seed)]
    parts += ["--threads", ",".join(map(str, args.threads)), "--prompts", ",".join(map(str, args.prompts)),
              "--decode-prompt", str(args.decode_prompt), "--new-tokens", str(args.new_tokens),
              "--repeats", str(args.repeats), "--load-repeats", str(args.load_repeats), "--backend", args.backend]
    for flag, value in (("--machine", args.machine), ("--name", args.name)):
        if value:
            parts += [flag, value]
    parts += [flag for flag, on in (("--no-peer", args.no_peer), ("--no-write", args.no_write), ("--json", args.json))
              if on]
    return shlex.join(parts)


# ---- one report ----

def run_files(infos: list[GGUFInfo], title: str, args, use_peer: bool, bandwidth: dict[int, float],
              buffer_bytes: int) -> dict:
    start_load = e2e.load_average()
    # time_variants' warm-up round decodes 4 tokens whatever --new-tokens is
    context = max(args.prompts + [args.decode_prompt + max(args.new_tokens, 4)]) + 1
    engines = ["lutlm"] + (["llama.cpp"] if use_peer else [])
    rows, loads = [], []
    for info in infos:
        if args.load_repeats:
            loads += measure_loads(info, engines, args, context)
        rows += time_file(info, args, use_peer, context)
    add_bandwidth(rows, bandwidth)
    return {
        "title": title, "command": command_line(args), "cpu_model": cpu_model(), "machine": e2e.machine(),
        "peer": peer.run_description(use_peer), "load_average": {"start": start_load, "end": e2e.load_average()},
        "method": f"threads {args.threads}; prompts {args.prompts}; decode {args.new_tokens} tokens after a "
                  f"{args.decode_prompt}-token prompt; {args.repeats} rounds after a warm-up, engines interleaved; "
                  f"lutlm backend {args.backend}; loads: {args.load_repeats} fresh process(es) per engine and file "
                  f"at {max(args.threads)} thread(s).",
        "threads": args.threads, "prompts": args.prompts, "decode_prompt": args.decode_prompt,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "load_repeats": args.load_repeats,
        "bandwidth": [{"threads": t, "bytes_per_s": b, "buffer_bytes": buffer_bytes} for t, b in bandwidth.items()],
        "files": [i.to_dict() for i in infos], "rows": rows, "loads": loads,
        "targets": check_targets(rows, [i.to_dict() for i in infos]),
    }


# ---- synthetic files ----

def lazy_random_checkpoint(config, tokenizer, seed: int = 0):
    """synthetic.random_checkpoint's checkpoint (the same config and tensors), each tensor made
    when read (LazyTensors): writing it as F16 then holds the F16 arrays and one float32 tensor,
    not the whole float32 model beside them (8 layers of a 7B: 8 GB less)."""
    import dataclasses
    import functools

    from lutlm.bench import synthetic
    from lutlm.formats import Checkpoint, LazyTensors

    if len(tokenizer.tokens) != config.vocab_size:
        raise ValueError(f"the vocabulary has {len(tokenizer.tokens)} tokens, the model {config.vocab_size}")
    config = dataclasses.replace(config, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_ids=[] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id])
    readers = {name: functools.partial(synthetic.random_tensor, name, shape, seed)
               for name, shape in synthetic.tensor_shapes(config).items()}
    return Checkpoint(config, LazyTensors(readers), tokenizer, source=f"synthetic:{config.name}:seed{seed}",
                      tensor_types={name: "F32" for name in readers})


def synthetic_files(model: str, types: list[str], args) -> list[GGUFInfo]:
    """The synthetic model as F16 GGUF, quantized by llama.cpp to each type; cached in the work dir."""
    from lutlm.bench import synthetic
    from lutlm.formats.gguf_writer import save_gguf

    config = synthetic.synthetic_config(model, args.layers)
    slug = f"{model}-{args.layers}L-seed{args.seed}"  # as `bench e2e --models` names its files: one cache
    work = args.work_dir
    f16 = work / f"{slug}-F16.gguf"
    if not f16.exists():
        checkpoint = lazy_random_checkpoint(config, synthetic.bundled_vocabulary(), args.seed)
        partial = f16.with_name(f16.name + ".partial")
        save_gguf(checkpoint, partial, "F16")
        del checkpoint
        gc.collect()
        partial.rename(f16)
    infos = []
    for kind in types:
        path = work / f"{slug}-{kind}.gguf"
        if not path.exists():
            partial = path.with_name(path.name + ".partial")
            print(f"quantizing {f16.name} to {kind} with llama.cpp", file=sys.stderr)
            peer.quantize(str(f16), str(partial), QUANT_TYPES[kind])
            partial.rename(path)
        infos.append(gguf_info(path, label=kind))
    return infos


# ---- the command ----

def parse_types(text: str) -> list[str]:
    types = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in types if t not in QUANT_TYPES]
    if not types or unknown:
        raise ValueError(f"unknown type {(unknown or [text])[0]!r} for --synthetic-types; choose from "
                         f"{', '.join(QUANT_TYPES)}")
    return types


def check_peer_imports() -> None:
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # installed (find_spec found it) but broken
        raise RuntimeError(f"llama-cpp-python is installed but does not import ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); fix it or pass --no-peer") from None


def run(args) -> list[dict]:
    """`bench e2e --gguf` / `--synthetic-types`; args.threads and args.prompts already parsed."""
    if args.gguf and args.synthetic_types:
        raise ValueError("give --gguf or --synthetic-types, not both")
    if args.load_repeats < 0:
        raise ValueError(f"--load-repeats takes a count of 0 or more, got {args.load_repeats}")
    use_peer = peer.available() and not args.no_peer
    jobs = []  # (name, title, infos or a function making them)
    if args.gguf:
        paths = [bundled_file(p) for p in args.gguf.split(",") if p]
        if not paths:
            raise ValueError("--gguf takes comma-separated GGUF file paths")
        infos = [gguf_info(p) for p in paths]
        labels = Counter(i.label for i in infos)
        for i in infos:  # two files of one name in different folders: tell them apart
            if labels[i.label] > 1:
                i.label = i.path
        name = args.name or (Path(paths[0]).stem if len(paths) == 1 else f"{Path(paths[0]).stem}+{len(paths) - 1}")
        jobs.append((name, ", ".join(i.label for i in infos), lambda infos=infos: infos))
    else:
        types = parse_types(args.synthetic_types)
        models = (args.models or SYNTHETIC_MODELS[0]).split(",")
        bad = [m for m in models if m not in SYNTHETIC_MODELS]
        if bad:
            raise ValueError(f"--synthetic-types takes --models {' or '.join(SYNTHETIC_MODELS)}, not {bad[0]!r}")
        if not use_peer:
            raise RuntimeError("--synthetic-types needs llama.cpp's quantizer to make the files: "
                               + ("it cannot run with --no-peer" if args.no_peer else
                                  "install llama-cpp-python (pip install -e '.[peer]')"))
        for model in models:
            name = f"{model}-{args.layers}L" + (f"_{args.name}" if args.name else "")
            title = (f"{model}-shaped, {args.layers} layer{'s' if args.layers > 1 else ''}, llama.cpp "
                     "quantizations of one F16 file")
            jobs.append((name, title, lambda model=model: synthetic_files(model, types, args)))
    if not args.no_write:
        if not args.machine:
            raise ValueError("--machine NAME is required to write the results (benchmarks/results/NAME/"
                             f"e2e_gguf_*; existing: {', '.join(MACHINES)}), or pass --no-write")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.machine):
            raise ValueError(f"--machine takes a folder name (letters, digits, '.', '_', '-'), got {args.machine!r}")
    if use_peer:
        check_peer_imports()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_write:
        out_dir = args.out_dir / args.machine
        print(f"results go to {out_dir}/e2e_gguf_<name>.*", file=sys.stderr)

    buffer_bytes = bandwidth_buffer_bytes(args.bandwidth_mib)
    bandwidth = measure_bandwidth(args.threads, buffer_bytes)
    results = []
    for name, title, make_infos in jobs:
        infos = make_infos()
        result = run_files(infos, title, args, use_peer, bandwidth, buffer_bytes)
        print(markdown(result))
        if not args.no_write:
            paths = write_results(result, out_dir, f"e2e_gguf_{name}", args.json)
            print("wrote " + ", ".join(map(str, paths)))
        results.append(result)
        gc.collect()
    return results


def add_arguments(p) -> None:
    """This mode's options on `bench e2e`'s parser."""
    p.add_argument("--gguf", metavar="FILE[,FILE...]",
                   help="lutlm and llama.cpp on these GGUF files, each engine reading the same file "
                        "('bundled': the bundled SmolLM2 model)")
    p.add_argument("--synthetic-types", metavar="TYPE[,TYPE...]",
                   help=f"a synthetic --models shape (default {SYNTHETIC_MODELS[0]}, --layers default "
                        f"{DEFAULT_LAYERS}) quantized by llama.cpp to these types, then as --gguf; types: "
                        f"{', '.join(QUANT_TYPES)} (e.g. {','.join(DEFAULT_SYNTHETIC_TYPES)})")
    p.add_argument("--machine", help="--gguf/--synthetic-types: write into OUT_DIR/MACHINE/ (e.g. "
                                     f"{', '.join(MACHINES)}); required unless --no-write")
    p.add_argument("--name", help="--gguf: the results' name, e2e_gguf_NAME.* (default: the first file's); "
                                  "--synthetic-types: a suffix to MODEL-NL")
    p.add_argument("--no-write", action="store_true", help="--gguf/--synthetic-types: print the report only")
    p.add_argument("--load-repeats", type=int, default=1,
                   help="--gguf/--synthetic-types: fresh-process loads per engine and file (0: none)")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="buffer of the read-bandwidth measure (default: 1 GiB or 4 x the last-level cache)")
