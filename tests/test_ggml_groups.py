"""ggml blocks of every common type as groups w = s * (q - z) (lutlm.formats.gguf_packed.ggml_groups),
against gguf-py's own dequantizer (an independent implementation), and the native decoder
(lutlm.kernels.ggml_native) against the numpy one, byte for byte.

Tolerance: exact equality for Q4_0, Q5_0, Q8_0, TQ1_0 and TQ2_0; for the others the bound the
module's docstring states, computed here from the blocks' own fields (which the tests write
with lutlm.formats.ggml_encode, checked against gguf-py's dequantizer first). The tiny GGUF
files of every type (tests/tiny_gguf.py) load through lutlm as gguf-py reads them, and
llama.cpp, where installed, runs them as lutlm does.
"""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from tiny_gguf import write_tiny_gguf

from lutlm.formats import load_checkpoint
from lutlm.formats.ggml_encode import encode_blocks, quantize
from lutlm.formats.gguf import open_gguf, unpermute_rotary
from lutlm.formats.gguf_packed import GROUP_TYPES, LAYOUTS, ggml_groups, pack_ggml, pack_gguf_linears
from lutlm.formats.packed import SUPPORTED_BITS
from lutlm.kernels import ggml_native

TYPES = list(LAYOUTS)
EXACT = ("Q4_0", "Q5_0", "Q8_0", "TQ1_0", "TQ2_0")
OFFSET_TYPES = ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K")  # w = A q - B
SUB_SCALES = {"Q2_K": (16, 0, 16), "Q3_K": (16, 0, 64), "Q4_K": (8, 0, 64), "Q5_K": (8, 0, 64), "Q6_K": (16, -128, 128)}
SUB_MINS = {"Q2_K": (16, 16), "Q4_K": (8, 64), "Q5_K": (8, 64)}
FIXED_ZERO = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128, "Q3_K": 4, "Q6_K": 32, "TQ1_0": 1, "TQ2_0": 1}

native = pytest.mark.skipif(not ggml_native.available(), reason="the lutlm CPU kernel library is not built")


def block_size(kind: str) -> tuple[int, int]:
    return GGML_QUANT_SIZES[GGMLQuantizationType[kind]]


def random_fields(kind: str, n: int, rng: np.random.Generator) -> dict:
    """Random valid fields of n blocks: fp16 d of either sign and dmin in [1e-3, 1e-2], codes over
    their whole range; block 0's first sub-block (or d) is zero, a constant group."""
    weights = block_size(kind)[0]
    bits = GROUP_TYPES[kind][0]
    top = 3 if kind == "TQ1_0" else 2**bits
    fields = {
        "codes": rng.integers(0, top, (n, weights)).astype(np.uint8),
        "d": (rng.uniform(1e-3, 1e-2, n) * rng.choice([-1, 1], n)).astype(np.float16),
        "dmin": rng.uniform(1e-3, 1e-2, n).astype(np.float16),
    }
    if kind in ("Q4_1", "Q5_1"):
        fields["dmin"] = rng.uniform(-0.1, 0.1, n).astype(np.float16)  # their m, of either sign
    if kind in SUB_SCALES:
        count, low, high = SUB_SCALES[kind]
        fields["scales"] = rng.integers(low, high, (n, count))
        fields["scales"][0, 0] = 32 if kind == "Q3_K" else 0  # a zero sub-scale
    else:
        fields["d"][0] = 0
    if kind in SUB_MINS:
        count, high = SUB_MINS[kind]
        fields["mins"] = rng.integers(0, high, (n, count))
    return fields


def step_and_offset(kind: str, f: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per weight [n, weights]: ggml's step A (float32, as its dequantizer forms it), offset B and
    signed code q' with w = A q' - B."""
    n, weights = f["codes"].shape
    group = GROUP_TYPES[kind][1]
    d = f["d"].astype(np.float32)[:, None]
    dmin = f["dmin"].astype(np.float32)[:, None]
    per_weight = lambda x: np.repeat(x.astype(np.float32), group, axis=1)  # noqa: E731
    q = f["codes"].astype(np.float32) - FIXED_ZERO.get(kind, 0)
    if kind in ("Q4_1", "Q5_1"):
        return per_weight(d), per_weight(-dmin), q
    if kind in SUB_SCALES:
        scales = f["scales"].astype(np.float32) - (32 if kind == "Q3_K" else 0)
        a = per_weight(d * scales)
        b = per_weight(dmin * f["mins"]) if kind in SUB_MINS else np.zeros_like(a)
        return a, b, q
    return per_weight(d), np.zeros((n, weights), np.float32), q


def bound(kind: str, a: np.ndarray, b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The docstring's bound: (2^-11 + 2^-22) (|A q'| + |B|) + 2^-25 (2^bits + |A|)."""
    return (2.0**-11 + 2.0**-22) * (np.abs(a * q) + np.abs(b)) + 2.0**-25 * (2 ** GROUP_TYPES[kind][0] + np.abs(a))


def gguf_reference(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> np.ndarray:
    weights, size = block_size(kind)
    return gguf_dequantize(raw.reshape(shape[0], shape[1] // weights * size), GGMLQuantizationType[kind])


def assert_same_bytes(x, y):
    for name in ("codes", "scales", "zeros"):
        a, b = getattr(x, name), getattr(y, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=name)
    assert (x.bits, x.group_size, x.ternary) == (y.bits, y.group_size, y.ternary)


@pytest.mark.parametrize("kind", TYPES)
def test_written_blocks_are_what_gguf_reads(kind):
    """The test blocks themselves: gguf-py's dequantizer reads A q' - B from them."""
    f = random_fields(kind, 6, np.random.default_rng(0))
    blocks = encode_blocks(kind, f["codes"], f["d"], f["dmin"], f.get("scales"), f.get("mins"))
    a, b, q = step_and_offset(kind, f)
    expected = (a * q - b) if kind in OFFSET_TYPES else a * q
    np.testing.assert_array_equal(gguf_dequantize(blocks, GGMLQuantizationType[kind]), expected)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_groups_reproduce_gguf(kind, rows):
    rng = np.random.default_rng(rows)
    weights, _ = block_size(kind)
    blocks_per_row = 5 if weights == 32 else 3
    shape = (rows, weights * blocks_per_row)
    f = random_fields(kind, rows * blocks_per_row, rng)
    raw = encode_blocks(kind, f["codes"], f["d"], f["dmin"], f.get("scales"), f.get("mins")).reshape(-1)
    groups = ggml_groups(raw, kind, shape)
    bits, group = GROUP_TYPES[kind]
    assert (groups.bits, groups.group_size) == (bits, group)
    assert groups.codes.shape == shape and groups.codes.dtype == np.uint8 and int(groups.codes.max()) < 2**bits
    assert groups.scales.shape == groups.zeros.shape == (rows, shape[1] // group)
    assert groups.scales.dtype == groups.zeros.dtype == np.float16
    assert groups.ternary == (kind == "TQ1_0" or (kind == "TQ2_0" and not (f["codes"] == 3).any()))
    got, expected = groups.dequantize(), gguf_reference(raw, kind, shape)
    if kind in EXACT:
        np.testing.assert_array_equal(got, expected)
    else:
        a, b, q = (x.reshape(shape) for x in step_and_offset(kind, f))
        assert (np.abs(got - expected) <= bound(kind, a, b, q)).all()
        constant = slice(0, group)  # block 0's first group (zero sub-scale or d): stays constant
        assert (got[0, constant] == got[0, 0]).all()
        np.testing.assert_allclose(got[0, constant], expected[0, constant], rtol=2.0**-11, atol=0)
    if ggml_native.available():
        assert_same_bytes(ggml_native.ggml_groups_native(raw, kind, shape), groups)


@native
@pytest.mark.parametrize("kind", TYPES)
def test_native_matches_numpy_on_random_bytes(kind):
    """Any bytes (with finite, moderate fp16 fields, some subnormal): the same codes, scales, zeros."""
    from test_ggml_quants import random_tensor

    rng = np.random.default_rng(7)
    weights, _ = block_size(kind)
    shape = (13, weights * 4)
    raw = random_tensor(kind, shape, rng)
    groups = ggml_groups(raw, kind, shape)
    assert_same_bytes(ggml_native.ggml_groups_native(raw, kind, shape), groups)
    if kind in EXACT:
        np.testing.assert_array_equal(groups.dequantize(), gguf_reference(raw, kind, shape))


F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "TQ1_0": [52], "TQ2_0": [64]}


@native
@pytest.mark.parametrize("kind", TYPES)
def test_native_matches_numpy_on_extreme_fields(kind):
    """Random bytes whose fp16 fields are any finite value below 2, subnormals and zeros
    included: every path of the grid (s or z subnormal, s rounding to 0, z overflowing fp16)."""
    rng = np.random.default_rng(17)
    weights, size = block_size(kind)
    per_row = 64 if weights == 32 else 8
    shape = (9, weights * per_row)
    blocks = rng.integers(0, 256, (shape[0] * per_row, size), dtype=np.uint8)
    for offset in F16_FIELDS[kind]:
        sign = rng.integers(0, 2, len(blocks), dtype=np.uint16) << 15
        bits = rng.integers(0, 1 << 14, len(blocks), dtype=np.uint16) | sign
        bits[::7] &= 0x83FF  # many subnormals and zeros
        blocks[:, offset:offset + 2] = bits.view(np.uint8).reshape(-1, 2)
    raw = blocks.reshape(-1)
    groups = ggml_groups(raw, kind, shape)
    assert_same_bytes(ggml_native.ggml_groups_native(raw, kind, shape), groups)
    if kind in EXACT:
        np.testing.assert_array_equal(groups.dequantize(), gguf_reference(raw, kind, shape))


@native
def test_native_threads_and_a_tall_tensor_give_the_same_bytes():
    from lutlm.kernels import cpu

    rng = np.random.default_rng(3)
    f = random_fields("Q4_K", 301 * 2, rng)
    raw = encode_blocks("Q4_K", f["codes"], f["d"], f["dmin"], f["scales"], f["mins"]).reshape(-1)
    expected = ggml_groups(raw, "Q4_K", (301, 512))
    before = cpu.get_num_threads()
    try:
        for threads in (1, 2, 3):
            cpu.set_num_threads(threads)
            assert_same_bytes(ggml_native.ggml_groups_native(raw, "Q4_K", (301, 512)), expected)
    finally:
        cpu.set_num_threads(before)


@pytest.mark.parametrize("kind", ["Q4_1", "Q5_1", "Q4_K", "Q2_K"])
def test_a_zero_beyond_fp16_becomes_a_constant_group(kind):
    """An offset of more than 65504 steps: z would overflow fp16, so the group is stored as its
    value at the middle code, within 1.5 * 2^-11 |B|."""
    rng = np.random.default_rng(11)
    f = random_fields(kind, 2, rng)
    if kind in ("Q4_1", "Q5_1"):
        f["d"][1], f["dmin"][1] = 1e-4, 30.0  # z = -m / d = -3e5
    else:
        f["d"][1], f["dmin"][1] = 1e-4, 1.0
        f["scales"][1, 1], f["mins"][1, 1] = 1, SUB_MINS[kind][1] - 1  # z = dmin m / (d sc) > 1e5
    weights, _ = block_size(kind)
    shape = (2, weights)
    raw = encode_blocks(kind, f["codes"], f["d"], f["dmin"], f.get("scales"), f.get("mins")).reshape(-1)
    groups = ggml_groups(raw, kind, shape)
    group = GROUP_TYPES[kind][1]
    g = 0 if kind in ("Q4_1", "Q5_1") else 1
    assert float(groups.zeros[1, g]) == -1 and (groups.codes[1, g * group:(g + 1) * group] == 0).all()
    a, b, q = (x.reshape(shape) for x in step_and_offset(kind, f))
    err = np.abs(groups.dequantize() - gguf_reference(raw, kind, shape))
    assert (err <= np.maximum(bound(kind, a, b, q), 1.5 * 2.0**-11 * np.abs(b))).all()
    if ggml_native.available():
        assert_same_bytes(ggml_native.ggml_groups_native(raw, kind, shape), groups)


@pytest.mark.parametrize("kind,field", [("Q6_K", 60000.0), ("Q4_0", np.inf), ("Q4_K", np.nan)])
def test_a_scale_beyond_fp16_is_refused(kind, field):
    f = random_fields(kind, 1, np.random.default_rng(0))
    f["d"][0] = field
    if kind == "Q6_K":
        f["scales"][0, 3] = 127  # A = 60000 * 127
    shape = (1, block_size(kind)[0])
    raw = encode_blocks(kind, f["codes"], f["d"], f["dmin"], f.get("scales"), f.get("mins")).reshape(-1)
    with pytest.raises(ValueError, match="does not fit fp16"):
        ggml_groups(raw, kind, shape)
    with pytest.raises(ValueError, match="does not fit fp16"):
        ggml_native.ggml_groups_native(raw, kind, shape)


def test_tq2_0_with_a_field_of_3_is_two_bit_not_ternary():
    f = random_fields("TQ2_0", 2, np.random.default_rng(2))
    for codes, ternary in ((f["codes"] % 3, True), (np.maximum(f["codes"], 0), (f["codes"] < 3).all())):
        raw = encode_blocks("TQ2_0", codes, f["d"]).reshape(-1)
        groups = ggml_groups(raw, "TQ2_0", (1, 512))
        assert groups.ternary == ternary and groups.bits == 2 and groups.group_size == 256
        np.testing.assert_array_equal(groups.dequantize(), gguf_reference(raw, "TQ2_0", (1, 512)))
        assert (groups.zeros == 1).all()
        if ggml_native.available():
            assert_same_bytes(ggml_native.ggml_groups_native(raw, "TQ2_0", (1, 512)), groups)


def test_unsupported_types_and_sizes_are_refused():
    for grouping in (ggml_groups, ggml_native.ggml_groups_native):
        with pytest.raises(ValueError, match="ggml type IQ2_XXS has no grouped form: lutlm maps Q4_0, Q4_1"):
            grouping(np.zeros(66, np.uint8), GGMLQuantizationType.IQ2_XXS, (1, 256))
        with pytest.raises(ValueError, match="ggml type F16 has no grouped form"):
            grouping(np.zeros(64, np.uint8), "F16", (1, 32))
        with pytest.raises(ValueError, match=r"a Q4_K tensor of shape \(2, 256\) takes 288 bytes, got 144"):
            grouping(np.zeros(144, np.uint8), "Q4_K", (2, 256))
        with pytest.raises(ValueError, match="rows must be whole 256-weight blocks"):
            grouping(np.zeros(144, np.uint8), "Q6_K", (2, 128))


@native
def test_native_refuses_what_it_cannot_decode():
    lib = ggml_native._library()
    buf = np.zeros(1024, np.uint8)
    p = buf.ctypes.data
    assert lib.lutlm_ggml_groups(int(GGMLQuantizationType.IQ2_XXS), p, 1, 256, p, p, p) == -1
    assert lib.lutlm_ggml_groups(int(GGMLQuantizationType.Q4_0), p, 1, 48, p, p, p) == -1
    assert lib.lutlm_ggml_groups(int(GGMLQuantizationType.Q4_0), p, 0, 32, p, p, p) == 0


@native
def test_native_float_to_half_rounds_as_numpy():
    rng = np.random.default_rng(0)
    bits = np.concatenate([
        rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32),
        # around every fp16 rounding boundary (ties included), the normal/subnormal/zero edges and overflow
        (np.arange(0x33000000 - 4, 0x477ff000 + 0x2000, 0x1000, dtype=np.uint64).astype(np.uint32)[:, None]
         + np.array([0, 1, 0xfff], dtype=np.uint32)).reshape(-1),
        np.array([0, 0x80000000, 0x7f800000, 0xff800000, 0x33000000, 0x33000001, 0x477fefff, 0x477ff000], np.uint32),
    ])
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    x = np.concatenate([x, -x])
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    np.testing.assert_array_equal(ggml_native.float_to_half(x).view(np.uint16), expected.view(np.uint16))


# --- files --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES)
def test_tiny_gguf_of_each_type_loads_as_gguf_reads_it(kind, tmp_path):
    """The tiny model, decoder linears and head in `kind`: lutlm's float tensors are gguf-py's
    dequantization of the file's blocks (q/k rows un-permuted), and the groups reproduce them."""
    path = tmp_path / f"tiny-{kind}.gguf"
    source = write_tiny_gguf(path, kind, head_type=kind)
    checkpoint = load_checkpoint(path)
    tensors = {t.name: t for t in open_gguf(path).tensors}
    config = checkpoint.config
    assert checkpoint.tensor_types["model.layers.1.mlp.down_proj.weight"] == kind
    assert checkpoint.tensor_types["lm_head.weight"] == kind
    for gguf_name, name, heads in [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", config.num_attention_heads),
        ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", config.num_key_value_heads),
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight", None),
        ("output.weight", "lm_head.weight", None),
    ]:
        t = tensors[gguf_name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        reference = torch.from_numpy(gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(shape))
        groups = ggml_groups(np.asarray(t.data), kind, shape)
        if heads:
            reference = unpermute_rotary(reference, heads)
        loaded = checkpoint.tensors[name]
        assert torch.equal(loaded, reference), gguf_name
        # The file holds a quantization of the float model (a loose check against garbage).
        assert (loaded - source.tensors[name]).abs().max() < 0.6 * source.tensors[name].abs().max()
        from_groups = torch.from_numpy(groups.dequantize())
        if heads:
            from_groups = unpermute_rotary(from_groups, heads)
        if kind in EXACT:
            assert torch.equal(from_groups, loaded), gguf_name
        else:  # |A q| + |B| is under 3.1x the row's largest magnitude in these round-to-nearest blocks
            row_max = loaded.abs().amax(1, keepdim=True)
            assert ((from_groups - loaded).abs() <= 4 * 2.0**-11 * row_max + 1e-7).all(), gguf_name
        if ggml_native.available():
            assert_same_bytes(ggml_native.ggml_groups_native(np.asarray(t.data), kind, shape), groups)


@pytest.mark.parametrize("kind", [k for k in TYPES if GROUP_TYPES[k][0] in SUPPORTED_BITS])
def test_gguf_linears_pack_from_their_blocks(kind, tmp_path):
    path = tmp_path / f"tiny-{kind}.gguf"
    write_tiny_gguf(path, kind)
    checkpoint = load_checkpoint(path)
    packed = pack_gguf_linears(checkpoint, kinds=[kind])
    assert len(packed.packed) == 7 * checkpoint.config.num_hidden_layers
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = packed.packed[name]
        assert (w.bits, w.group_size) == GROUP_TYPES[kind] and w.ternary == (kind in ("TQ1_0", "TQ2_0"))
        dense = checkpoint.tensors[f"{name}.weight"]
        if kind in EXACT:
            assert torch.equal(w.dequantize(), dense)
        else:
            assert ((w.dequantize() - dense).abs() <= 4 * 2.0**-11 * dense.abs().amax(1, keepdim=True) + 1e-7).all()


def test_pack_ggml_and_the_4bit_default(tmp_path):
    path = tmp_path / "tiny-Q4_K.gguf"
    write_tiny_gguf(path, "Q4_K")
    packed = pack_gguf_linears(load_checkpoint(path))  # the default kinds: Q4_0, Q4_1, Q4_K
    assert len(packed.packed) == 14 and all(w.bits == 4 and w.group_size == 32 for w in packed.packed.values())
    assert not pack_gguf_linears(load_checkpoint(path), kinds=["Q4_0"]).packed
    with pytest.raises(ValueError, match=r"ggml types \['IQ2_XXS'\] have no grouped form"):
        pack_gguf_linears(load_checkpoint(path), kinds=["IQ2_XXS"])
    raw = quantize(np.random.default_rng(0).normal(size=(4, 256)).astype(np.float32), "Q2_K")
    w = pack_ggml(raw, "Q2_K", (4, 256))
    assert (w.bits, w.group_size) == (2, 16)
    np.testing.assert_array_equal(w.dequantize().numpy(), ggml_groups(raw, "Q2_K", (4, 256)).dequantize())


@pytest.fixture(scope="module")
def bundled_vocabulary():
    from lutlm.bench.synthetic import bundled_vocabulary

    return bundled_vocabulary()


@pytest.mark.parametrize("kind", TYPES)
def test_llama_cpp_runs_the_tiny_files_as_lutlm_reads_them(kind, tmp_path, bundled_vocabulary):
    """llama.cpp (the formats' own implementation) on the tiny file of each type, with a real
    vocabulary: its logits match lutlm's float model of the same file to 1.6% of the largest
    (its 8-bit activations; 0.04% on an F32 file). A block read differently would be ~100%."""
    from conftest import open_llama_cpp

    from lutlm.loader import build_model

    path = str(tmp_path / f"tiny-{kind}.gguf")
    write_tiny_gguf(path, kind, vocabulary=bundled_vocabulary)
    llama = open_llama_cpp(path)
    tokens = [1, 504, 3575, 282, 4649, 314, 7042, 30]
    model = build_model(load_checkpoint(path))
    with torch.inference_mode():
        model.setup_cache(1, len(tokens))
        ours = model(torch.tensor([tokens]), 0)[0]
    theirs = llama.logits(tokens)
    assert (ours - theirs).abs().max() < 0.05 * ours.abs().max()
