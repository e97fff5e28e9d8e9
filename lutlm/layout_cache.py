"""A GGUF's linears in the CPU kernels' layout, kept in a folder the user names, so that the
next load maps them instead of decoding and laying out every block again.

One file per model and machine: `<file stem>-<key>.lutlm-layout` in the folder, where the
key is a hash of what the layout depends on: the GGUF's path, size, modification time and
header bytes (metadata and tensor table: the first MiB), the layout version, the instruction
set and each linear's kernel, bits and group size. A changed file, machine or kernel choice
gives another key, so a stale layout is never read; the folder keeps old files until the user
deletes them.

File layout (little-endian):
    0   8 bytes  magic b"LUTLMLAY"
    8   u64      JSON header length L
    16  L bytes  JSON: {"version", "key", "linears": {module: {bits, group_size, ternary, kind,
                 n, k, k_padded, group, q_block, codes: [offset, shape], scales: [offset, shape]}}}
    then the blobs from the next 64-byte boundary on, each at its 64-byte-aligned offset from
    there: the layout's uint8 codes and fp16 scales exactly as lutlm.kernels.cpu holds them.

A load maps the file copy-on-write (the kernels never write their weights, so its pages stay
shared with the page cache) and wraps the blobs as tensors, with no copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import torch

MAGIC = b"LUTLMLAY"
VERSION = 2
ALIGN = 64
HEADER_PROBE = 1 << 20


def cache_key(gguf_path: str, choices: list[tuple]) -> str:
    """What a layout depends on (see the module docstring), as 16 hex digits."""
    from lutlm.kernels import cpu

    st = os.stat(gguf_path)
    h = hashlib.sha256()
    h.update(json.dumps([os.path.realpath(gguf_path), st.st_size, st.st_mtime_ns, VERSION, cpu.get_isa(),
                         sorted(choices)]).encode())
    with open(gguf_path, "rb") as f:
        h.update(f.read(HEADER_PROBE))
    return h.hexdigest()[:16]


def cache_path(folder: str, gguf_path: str, key: str) -> str:
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(folder, f"{stem}-{key}.lutlm-layout")


def _data_start(header_length: int) -> int:
    """Where the blobs start: after magic, length and header, at the next 64-byte boundary."""
    return -(-(16 + header_length) // ALIGN) * ALIGN


def write(path: str, key: str, handles: dict) -> None:
    """Write module -> LutWeight (+ its PackedLinear's bits, group size, ternary) to `path`, through
    a temporary file renamed into place: a reader sees a whole file or none."""
    entries, blobs, offset = {}, [], 0
    for module, (handle, bits, group_size, ternary) in handles.items():
        c = handle.c
        entry = {"bits": bits, "group_size": group_size, "ternary": ternary,
                 "n": c.n, "k": c.k, "k_padded": c.k_padded, "group": c.group_size, "q_block": c.q_block,
                 "kind": c.kind, "scale_layout": handle.scale_layout}
        for name, t in (("codes", handle.codes), ("scales", handle.scales)):
            offset = -(-offset // ALIGN) * ALIGN
            entry[name] = [offset, list(t.shape)]
            blobs.append((offset, t))
            offset += t.numel() * t.element_size()
        entries[module] = entry
    header = json.dumps({"version": VERSION, "key": key, "linears": entries}).encode()
    start = _data_start(len(header))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for blob_offset, t in blobs:
                f.seek(start + blob_offset)
                f.write(t.contiguous().view(torch.uint8).numpy().data)  # the buffer itself, no copy
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path: str, key: str) -> dict | None:
    """module -> (LutWeight, bits, group_size, ternary) from a layout file, or None where the
    file is missing, of another version or key, or damaged (then the caller lays out anew)."""
    from lutlm.kernels import cpu

    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                return None
            (length,) = struct.unpack("<Q", head[8:])
            if length > os.path.getsize(path):
                return None
            meta = json.loads(f.read(length))
        if meta.get("version") != VERSION or meta.get("key") != key:
            return None
        data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, shared pages
        start = _data_start(length)
        handles = {}
        for module, e in meta["linears"].items():
            views = {}
            scale_layout = e.get("scale_layout", "f16")
            scale_dtype = torch.float16 if scale_layout == "f16" else torch.uint8  # two-level scales: bytes
            for name, dtype in (("codes", torch.uint8), ("scales", scale_dtype)):
                offset, shape = e[name]
                size = int(np.prod(shape)) * (2 if dtype == torch.float16 else 1)
                if start + offset + size > data.size:
                    return None
                blob = torch.from_numpy(data[start + offset:start + offset + size])
                views[name] = blob.view(dtype).view(shape)
            handle = cpu.laid_out(views["codes"], views["scales"], e["n"], e["k"], e["k_padded"], e["bits"],
                                  e["group"], e["q_block"], e["kind"], scale_layout)
            handles[module] = (handle, e["bits"], e["group_size"], e["ternary"])
        return handles
    except (OSError, ValueError, KeyError, TypeError):
        return None
