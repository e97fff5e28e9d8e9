"""lutlm's own GGUF reader: a memory-mapped file, checked before it is believed.

GGUF (llama.cpp's format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), versions 2
and 3, in the file's byte order:

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x      (string key, u32 value type, value)
    tensor_count x  (string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml type,
                     u64 offset of the data, relative to the data section)
    padding to `general.alignment` (default 32), then the data section.

    string: u64 byte length, UTF-8 bytes.  array: u32 element type, u64 count, the elements.

gguf-py's GGUFReader builds a few numpy arrays per metadata value, slow for a large vocabulary
and its merges. Here arrays of numbers are one numpy view of the map and arrays of strings one
Python loop of slices (docs/kernels.md), so opening a file costs milliseconds whatever its size.
And nothing is believed before it is checked: every length and count against the bytes the
file has left (so an edited length of 2^40 is refused, not allocated or looped over), every
tensor's range against the file, its alignment and the other tensors. Every problem is a ValueError with a one-line message that names the file.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
HEADER_BYTES = 24  # magic, version, tensor count, kv count
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS: llama.cpp refuses more
MAX_NAME_BYTES = 65535  # the GGUF spec's limit on a key; applied to tensor names too
MAX_NESTING = 8  # arrays of arrays of ...
# Strings (or arrays) in one array value: each becomes a Python object, so the bound that the
# file's size sets (8 bytes per string) is not enough. Vocabularies and merges are < 10^6.
MAX_OBJECT_ARRAY = 1 << 22

# struct format and numpy dtype (without byte order) of each scalar value type
SCALARS: dict[GGUFValueType, tuple[str, str]] = {
    GGUFValueType.UINT8: ("B", "u1"),
    GGUFValueType.INT8: ("b", "i1"),
    GGUFValueType.UINT16: ("H", "u2"),
    GGUFValueType.INT16: ("h", "i2"),
    GGUFValueType.UINT32: ("I", "u4"),
    GGUFValueType.INT32: ("i", "i4"),
    GGUFValueType.FLOAT32: ("f", "f4"),
    GGUFValueType.BOOL: ("?", "?"),
    GGUFValueType.UINT64: ("Q", "u8"),
    GGUFValueType.INT64: ("q", "i8"),
    GGUFValueType.FLOAT64: ("d", "f8"),
}
# Fewest bytes one value of each type takes in the file: bounds a count before it is looped over.
MIN_VALUE_BYTES = {t: struct.calcsize(fmt) for t, (fmt, _) in SCALARS.items()} | {
    GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (no dims)

# ggml types whose data GGUFReader hands over as numbers of their own dtype (the rest as bytes)
TYPED_DATA = {
    GGMLQuantizationType.F32: "f4",
    GGMLQuantizationType.F16: "f2",
    GGMLQuantizationType.F64: "f8",
    GGMLQuantizationType.I8: "i1",
    GGMLQuantizationType.I16: "i2",
    GGMLQuantizationType.I32: "i4",
    GGMLQuantizationType.I64: "i8",
}


def printable(name: str, limit: int = 80) -> str:
    """A key or tensor name for a one-line message: as is if printable and short, else its
    repr (control characters escaped), cut at `limit` characters."""
    if name.isprintable() and len(name) <= limit:
        return name
    return repr(name[:limit]) + ("..." if len(name) > limit else "")


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One tensor of a GGUF file, as gguf-py's ReaderTensor describes it.

    shape: ggml order, innermost first (uint64, like GGUFReader's).
    data: a read-only view of the mapped bytes: F32/F16/F64/I8..I64 as numbers of that dtype in
    numpy order (shape reversed); other types as uint8 [..., bytes per row].
    """

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray


class GGUFFile:
    """A GGUF file, parsed and checked.

    metadata: key -> value, in file order: ints, floats, bools, str; arrays of numbers as numpy
    arrays (read-only views of the file), arrays of strings (and of arrays) as lists.
    value_types: key -> (GGUFValueType, element type, ...) as GGUFReader's field.types.
    tensors: list of GGUFTensor in file order. byte_order: "I" (the host's byte order) or "S"
    (swapped), as GGUFReader's. version, alignment, data_offset (start of the data section), size.
    The map stays open as long as the object, or any array it handed out, lives.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_BYTES)
            if head[:4] != MAGIC:
                self._fail(f"not a GGUF file (starts with {head[:4]!r}, a GGUF file starts with {MAGIC!r})")
            if len(head) < HEADER_BYTES:
                self._truncated("the GGUF header", HEADER_BYTES)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # As GGUFReader decides: a version whose low 16 bits are 0 is in the other byte order.
        little = int.from_bytes(head[4:8], "little") & 0xFFFF != 0
        version = int.from_bytes(head[4:8], "little" if little else "big")
        self._endian = "<" if little else ">"
        self.byte_order = "I" if little == (sys.byteorder == "little") else "S"
        if version not in VERSIONS:
            self._fail(f"unreadable GGUF header: GGUF version {version} (lutlm reads versions 2 and 3)")
        self.version = version
        tensor_count, kv_count = struct.unpack_from(self._endian + "QQ", head, 8)
        self._off = HEADER_BYTES
        self._count(kv_count, MIN_KV_BYTES, "the metadata count")
        self._count(tensor_count, MIN_TENSOR_INFO_BYTES, "the tensor count", reserve=kv_count * MIN_KV_BYTES)
        self._scalar = {t: struct.Struct(self._endian + fmt) for t, (fmt, _) in SCALARS.items()}
        self._u32, self._u64 = self._scalar[GGUFValueType.UINT32], self._scalar[GGUFValueType.UINT64]

        self.metadata: dict[str, object] = {}
        self.value_types: dict[str, tuple[GGUFValueType, ...]] = {}
        for i in range(kv_count):
            key = self._string(f"metadata key {i}", MAX_NAME_BYTES)
            shown = printable(key)
            if key in self.metadata:
                self._fail(f"unreadable GGUF header: metadata key {shown} appears twice")
            raw_type = self._read(self._u32, f"the type of {shown}")
            self.metadata[key], self.value_types[key] = self._value(raw_type, shown, 0)

        self._count(tensor_count, MIN_TENSOR_INFO_BYTES, "the tensor count")
        infos = [self._tensor_info(i) for i in range(tensor_count)]
        self.alignment = self._alignment()
        self.data_offset = -(-self._off // self.alignment) * self.alignment
        self.tensors = self._tensors(infos)

    def release(self, tensor: GGUFTensor) -> None:
        """Drop `tensor`'s pages from this process's resident memory (they stay in the page
        cache, and a later read faults them back in): a load that has laid a tensor out for
        the kernels then holds the layout, not both. Best effort."""
        self.release_range(tensor.data_offset, tensor.n_bytes)

    def release_range(self, offset: int, length: int) -> None:
        """`release` for the file's bytes [offset, offset + length): the pages wholly inside."""
        page = mmap.PAGESIZE
        start = -(-offset // page) * page
        end = min(self.size, (offset + length) // page * page if offset + length < self.size else self.size)
        if end <= start:
            return
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (AttributeError, OSError, ValueError):
            pass

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    # --- errors -------------------------------------------------------------------------

    def _fail(self, problem: str):
        raise ValueError(f"{self.path}: {problem}")

    def _truncated(self, what: str, needed: int):
        self._fail(f"the file is truncated: {what} needs at least {needed} bytes, the file has {self.size}")

    def _count(self, count: int, min_bytes: int, what: str, reserve: int = 0) -> None:
        """Refuse a count of items that cannot fit in the rest of the file (before looping over it)."""
        needed = self._off + reserve + count * min_bytes
        if needed > self.size:
            self._fail(f"the file is truncated or corrupt: {what} {count} needs at least {needed} bytes, "
                       f"the file has {self.size}")

    # --- reading ------------------------------------------------------------------------

    def _read(self, scalar: struct.Struct, what: str):
        end = self._off + scalar.size
        if end > self.size:
            self._truncated(what, end)
        (value,) = scalar.unpack_from(self._map, self._off)
        self._off = end
        return value

    def _string(self, what: str, limit: int | None = None) -> str:
        length = self._read(self._u64, f"the length of {what}")
        end = self._off + length
        if limit is not None and length > limit:
            self._fail(f"unreadable GGUF header: {what} is {length} bytes long (at most {limit})")
        if end > self.size:
            self._fail(f"the file is truncated or corrupt: {what} of {length} bytes needs at least {end} bytes, "
                       f"the file has {self.size}")
        raw = self._map[self._off:end]
        self._off = end
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self._fail(f"unreadable GGUF header: {what} is not UTF-8 ({e.reason} at byte {e.start})")

    def _strings(self, count: int, key: str) -> list[str]:
        """`count` strings (their count already checked): one loop of slices, no numpy per item."""
        unpack, mm, size, off = self._u64.unpack_from, self._map, self.size, self._off
        out = [None] * count
        try:
            for i in range(count):
                if off + 8 > size:
                    self._truncated(f"the length of {key}[{i}]", off + 8)
                (length,) = unpack(mm, off)
                off += 8
                end = off + length
                if end > size:
                    self._fail(f"the file is truncated or corrupt: {key}[{i}] of {length} bytes needs at least "
                               f"{end} bytes, the file has {size}")
                out[i] = mm[off:end].decode("utf-8")
                off = end
        except UnicodeDecodeError as e:
            self._fail(f"unreadable GGUF header: {key}[{i}] is not UTF-8 ({e.reason} at byte {e.start})")
        self._off = off
        return out

    def _value_type(self, raw_type: int, key: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw_type)
        except ValueError:
            self._fail(f"unreadable GGUF header: {key} has unknown value type id {raw_type}")

    def _value(self, raw_type: int, key: str, depth: int):
        """(value, types) of one value of type `raw_type` at the current offset (`key`: the
        key as messages show it)."""
        vtype = self._value_type(raw_type, key)
        if vtype in SCALARS:
            return self._read(self._scalar[vtype], f"the value of {key}"), (vtype,)
        if vtype == GGUFValueType.STRING:
            return self._string(f"the value of {key}"), (vtype,)
        # an array
        if depth >= MAX_NESTING:
            self._fail(f"unreadable GGUF header: {key} nests arrays more than {MAX_NESTING} deep")
        item_type = self._value_type(self._read(self._u32, f"the element type of {key}"), key)
        count = self._read(self._u64, f"the length of {key}")
        self._count(count, MIN_VALUE_BYTES[item_type], f"{key}'s array length")
        if item_type in SCALARS:
            dtype = np.dtype(self._endian + SCALARS[item_type][1])
            value = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._off)
            self._off += value.nbytes
            return value, (vtype, item_type)
        if count > MAX_OBJECT_ARRAY:
            self._fail(f"unreadable GGUF header: {key} is an array of {count} {item_type.name} values "
                       f"(lutlm reads at most {MAX_OBJECT_ARRAY})")
        if item_type == GGUFValueType.STRING:
            return self._strings(count, key), (vtype, item_type)
        items, types = [], (vtype, item_type)
        for i in range(count):
            item, item_types = self._value(item_type, f"{key}[{i}]", depth + 1)
            items.append(item)
            types = (vtype, *item_types)
        return items, types

    def _tensor_info(self, index: int) -> tuple[str, list[int], int, int]:
        name = self._string(f"the name of tensor {index}", MAX_NAME_BYTES)
        shown = printable(name)
        n_dims = self._read(self._u32, f"the dimension count of tensor {shown}")
        if not 1 <= n_dims <= MAX_DIMS:
            self._fail(f"unreadable GGUF header: tensor {shown} has {n_dims} dimensions (ggml tensors have 1 to {MAX_DIMS})")
        self._count(n_dims, 8, f"tensor {shown}'s dimension count", reserve=12)
        dims = list(struct.unpack_from(f"{self._endian}{n_dims}Q", self._map, self._off))
        self._off += 8 * n_dims
        raw_type = self._read(self._u32, f"the type of tensor {shown}")
        offset = self._read(self._u64, f"the data offset of tensor {shown}")
        return name, dims, raw_type, offset

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment")
        if alignment is None:
            return GGUF_DEFAULT_ALIGNMENT
        if self.value_types["general.alignment"] != (GGUFValueType.UINT32,):
            self._fail(f"unreadable GGUF header: general.alignment is a {self.value_types['general.alignment'][0].name}, "
                       "not a UINT32")
        if alignment == 0 or alignment & (alignment - 1):
            self._fail(f"unreadable GGUF header: general.alignment {alignment} is not a power of two")
        return alignment

    def _tensors(self, infos: list[tuple[str, list[int], int, int]]) -> list[GGUFTensor]:
        tensors, names = [], set()
        for name, dims, raw_type, offset in infos:
            shown = printable(name)
            if name in names:
                self._fail(f"unreadable GGUF header: tensor {shown} appears twice")
            names.add(name)
            try:
                ggml_type = GGMLQuantizationType(raw_type)
            except ValueError:
                self._fail(f"unreadable GGUF header: tensor {shown} has unknown ggml type id {raw_type}")
            if any(d == 0 for d in dims):
                self._fail(f"unreadable GGUF header: tensor {shown} has shape {tuple(dims)} (ggml order), "
                           "with a dimension of 0")
            block, block_bytes = GGML_QUANT_SIZES[ggml_type]
            if dims[0] % block:
                self._fail(f"unreadable GGUF header: tensor {shown} of type {ggml_type.name} has rows of {dims[0]} "
                           f"weights, not a whole number of its {block}-weight blocks")
            n_elements = 1
            for d in dims:
                n_elements *= d
            n_bytes = n_elements // block * block_bytes
            if offset % self.alignment:
                self._fail(f"unreadable GGUF header: tensor {shown}'s data offset {offset} is not a multiple of "
                           f"the file's alignment {self.alignment}")
            start = self.data_offset + offset
            if start + n_bytes > self.size:
                self._truncated(f"tensor {shown}'s data (bytes {start} to {start + n_bytes})", start + n_bytes)
            rows = tuple(reversed(dims))
            if ggml_type in TYPED_DATA:
                dtype, shape = np.dtype(self._endian + TYPED_DATA[ggml_type]), rows
            else:
                dtype, shape = np.dtype(np.uint8), (*rows[:-1], rows[-1] // block * block_bytes)
            data = np.frombuffer(self._map, dtype=dtype, count=n_bytes // dtype.itemsize, offset=start).reshape(shape)
            tensors.append(GGUFTensor(name, ggml_type, np.array(dims, dtype=np.uint64), n_elements, n_bytes,
                                      start, data))
        by_start = sorted(tensors, key=lambda t: (t.data_offset, t.n_bytes))
        for before, after in zip(by_start, by_start[1:]):
            if after.data_offset < before.data_offset + before.n_bytes:
                self._fail(f"unreadable GGUF header: the data of tensors {printable(before.name)} (bytes {before.data_offset} to "
                           f"{before.data_offset + before.n_bytes}) and {printable(after.name)} (from byte {after.data_offset}) "
                           "overlap")
        return tensors
