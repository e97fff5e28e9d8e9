"""A deeper GGUF from a shallower one: its decoder layers' blocks repeated, byte for byte.

    python benchmarks/repeat_layers_gguf.py IN.gguf OUT.gguf --layers 32

Layer i of OUT is layer i mod L of IN (L its block count); every other tensor and all metadata
are copied, block_count set to --layers. For load-time and memory measurements of a full-depth
model (`benchmarks/load_gguf.py`) where quantizing a full-depth synthetic F16 file would take a
13 GB detour: the blocks are still the ones llama.cpp's quantizer wrote, and each tensor keeps its
type and shape, so a loader does exactly the work the full-depth file asks of it.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np
from gguf import GGUFReader, GGUFWriter, GGUFValueType

LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def field_value(field):
    """A metadata field's value as GGUFWriter takes it."""
    kind = field.types[0]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if kind == GGUFValueType.ARRAY:
        item = field.types[1]
        if item == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    return field.parts[field.data[0]][0].item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--layers", type=int, required=True)
    args = p.parse_args()
    reader = GGUFReader(args.source)
    arch = field_value(reader.fields["general.architecture"])
    depth = field_value(reader.fields[f"{arch}.block_count"])
    if args.layers < depth:
        sys.exit(f"{args.source} has {depth} layers; --layers must be at least that")
    writer = GGUFWriter(args.out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer's own header fields
        value = args.layers if name == f"{arch}.block_count" else field_value(field)
        if name == "general.name":
            value = f"{value}, layers repeated to {args.layers}"
        kind = field.types[0]
        sub = field.types[1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, kind, sub_type=sub)
    layers, others = {}, []
    for t in reader.tensors:
        m = LAYER.match(t.name)
        (layers.setdefault(int(m.group(1)), []).append((m.group(2), t)) if m else others.append(t))

    def add(name, t):  # the reader's array is [rows, bytes per row] for block types: the writer's raw form
        writer.add_tensor(name, np.asarray(t.data), raw_dtype=t.tensor_type)

    for t in others:
        add(t.name, t)
    for i in range(args.layers):
        for suffix, t in layers[i % depth]:
            add(f"blk.{i}.{suffix}", t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


if __name__ == "__main__":
    main()
