"""lutlm's ggml dequantizers against gguf-py's own (an independent implementation).

Tolerance: exact equality. Both sides evaluate the same float32 products and sums in the
same order (ggml's reference formula), so any difference, even one ulp, means a field was
read from the wrong place.
"""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lutlm.formats.ggml_quants import BLOCK_TYPES, dequantize
from lutlm.formats.gguf import open_gguf

# Byte offsets of each block type's f16 fields, which random bytes could turn into inf/NaN.
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    "TQ1_0": [52], "TQ2_0": [64],
}
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}


def random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random bytes of a `name` tensor of `shape`, with every f16 field a finite, moderate value."""
    block_weights, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    n_blocks = int(np.prod(shape)) // block_weights
    if name in FLOAT_TYPES:
        return rng.standard_normal(n_blocks).astype(FLOAT_TYPES[name]).view(np.uint8)
    if name == "BF16":
        return (rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[name]:
        scales = rng.uniform(-0.1, 0.1, size=n_blocks).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def reference(raw: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's dequantization of the same bytes, reshaped to `shape`."""
    qtype = GGMLQuantizationType[name]
    rows = raw.reshape(-1, shape[-1] // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1])
    return gguf_dequantize(rows, qtype).reshape(shape)


def test_block_sizes_match_ggml():
    for name, (block_weights, block_bytes, _) in BLOCK_TYPES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (block_weights, block_bytes), name


@pytest.mark.parametrize("name", list(BLOCK_TYPES))
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_random_blocks_match_gguf(name, rows):
    rng = np.random.default_rng(rows)
    block_weights = BLOCK_TYPES[name][0]
    shape = (rows, block_weights * 5 if block_weights > 1 else 37)  # odd row counts and block counts
    raw = random_tensor(name, shape, rng)
    ours = dequantize(raw, name, shape)
    assert ours.shape == shape
    np.testing.assert_array_equal(ours.numpy(), reference(raw, name, shape))


def test_three_dimensional_shape_and_chunked_path(monkeypatch):
    import lutlm.formats.ggml_quants as gq

    monkeypatch.setattr(gq, "CHUNK_WEIGHTS", 512)  # force several chunks, one of them partial
    rng = np.random.default_rng(0)
    shape = (3, 5, 512)
    raw = random_tensor("Q4_K", shape, rng)
    np.testing.assert_array_equal(dequantize(raw, "Q4_K", shape).numpy(), reference(raw, "Q4_K", shape))


def test_type_may_be_name_enum_or_id():
    rng = np.random.default_rng(1)
    raw = random_tensor("Q6_K", (2, 256), rng)
    expected = dequantize(raw, "Q6_K", (2, 256))
    for spelling in ("q6_k", GGMLQuantizationType.Q6_K, int(GGMLQuantizationType.Q6_K)):
        assert dequantize(raw, spelling, (2, 256)).equal(expected)


@pytest.fixture(scope="module")
def bundled_reader(bundled_path):
    return open_gguf(bundled_path)


@pytest.mark.parametrize("tensor_name", ["token_embd.weight", "blk.0.ffn_down.weight", "blk.29.attn_k.weight",
                                         "blk.3.attn_norm.weight", "output_norm.weight"])
def test_real_tensors_match_gguf(bundled_reader, tensor_name):
    tensor = next(t for t in bundled_reader.tensors if t.name == tensor_name)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    ours = dequantize(tensor.data, tensor.tensor_type, shape)
    np.testing.assert_array_equal(ours.numpy(), gguf_dequantize(tensor.data, tensor.tensor_type).reshape(shape))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"])
def test_real_weights_requantized_by_gguf(bundled_reader, name):
    """Real weight values (not random bytes) put through gguf-py's quantizer, then both dequantizers."""
    tensor = next(t for t in bundled_reader.tensors if t.name == "blk.5.ffn_gate.weight")
    weights = gguf_dequantize(tensor.data, tensor.tensor_type)  # [1536, 576]
    raw = gguf_quantize(weights, GGMLQuantizationType[name])
    ours = dequantize(raw, name, weights.shape).numpy()
    np.testing.assert_array_equal(ours, reference(raw.view(np.uint8), name, weights.shape))
    # And the round trip lands near the original (loose: it only guards against garbage).
    assert np.abs(ours - weights).max() < 0.2 * np.abs(weights).max()


@pytest.mark.parametrize("name", ["TQ1_0", "TQ2_0"])
def test_ternary_blocks_round_trip_gguf_quantizer(name):
    """Ternary weights (d * t, t in {-1, 0, 1}) through gguf-py's quantizer come back exactly."""
    rng = np.random.default_rng(5)
    d = rng.uniform(0.01, 0.1, size=(6, 1)).astype(np.float16).astype(np.float32)
    weights = d * rng.integers(-1, 2, size=(6, 512)).astype(np.float32)
    weights[:, 0] = d[:, 0]  # each block's largest magnitude is its d
    weights[:, 256] = -d[:, 0]
    raw = gguf_quantize(weights, GGMLQuantizationType[name])
    np.testing.assert_array_equal(dequantize(raw, name, weights.shape).numpy(), weights)


def test_every_tq1_0_byte_decodes_as_ggml_does():
    """All 256 byte values in every qs/qh position (tq1_0 has no invalid byte)."""
    blocks = np.zeros((256, 54), dtype=np.uint8)
    blocks[:, :52] = np.arange(256, dtype=np.uint8)[:, None]
    blocks[:, 52:54] = np.array([1.0], dtype=np.float16).view(np.uint8)
    raw = blocks.reshape(-1)
    np.testing.assert_array_equal(dequantize(raw, "TQ1_0", (256, 256)).numpy(), reference(raw, "TQ1_0", (256, 256)))


def test_unsupported_and_unknown_types_are_named():
    with pytest.raises(ValueError, match="unsupported ggml tensor type IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), GGMLQuantizationType.IQ2_XXS, (256,))
    with pytest.raises(ValueError, match="unknown ggml tensor type id 999"):
        dequantize(np.zeros(66, np.uint8), 999, (256,))
    with pytest.raises(ValueError, match="unsupported ggml tensor type NOPE"):
        dequantize(np.zeros(4, np.uint8), "nope", (1,))


def test_wrong_byte_count_and_partial_blocks_are_refused():
    with pytest.raises(ValueError, match=r"Q4_0 tensor of shape \(2, 32\) takes 36 bytes, got 35"):
        dequantize(np.zeros(35, np.uint8), "Q4_0", (2, 32))
    with pytest.raises(ValueError, match="whole 256-weight blocks"):
        dequantize(np.zeros(210, np.uint8), "Q6_K", (2, 128))
