"""GGUF Q4_0/Q4_1 blocks packed as they are: against gguf-py's own quantizer and dequantizer,
and the bundled model run from its packed blocks against the float path."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from lutlm.formats.gguf_packed import pack_ggml_4bit, pack_gguf_linears
from lutlm.loader import build_model

FP16_HALF_ULP = 2.0**-11  # relative rounding error of a value stored in fp16


def random_rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, k)).astype(np.float32)
    x[0, :32] = 0.25  # a constant block: Q4_1 stores it with d == 0
    x[1, :32] += 3.0  # an offset block: Q4_1's zero is large there
    return x


def test_q4_0_blocks_pack_exactly():
    raw = quants.quantize(random_rows(8, 96), GGMLQuantizationType.Q4_0)
    expected = quants.dequantize(raw, GGMLQuantizationType.Q4_0)
    packed = pack_ggml_4bit(raw, "Q4_0", (8, 96))
    assert packed.group_size == 32 and packed.bits == 4
    assert torch.equal(packed.dequantize(), torch.from_numpy(expected))


def test_q4_1_blocks_pack_within_the_rounding_of_their_zero():
    raw = quants.quantize(random_rows(8, 96), GGMLQuantizationType.Q4_1)
    expected = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q4_1))
    packed = pack_ggml_4bit(raw, "Q4_1", (8, 96))
    # z = -m / d rounded to fp16 moves a weight by d * |dz| <= |m| * 2^-11; |m| is the block's
    # minimum, so at most its largest magnitude. The constant block (d == 0) is exact.
    block_max = expected.abs().view(8, 3, 32).amax(-1, keepdim=True)
    err = (packed.dequantize() - expected).abs().view(8, 3, 32)
    assert (err <= block_max * FP16_HALF_ULP * 1.01 + 1e-7).all()
    assert torch.equal(packed.dequantize()[0, :32], expected[0, :32])


def test_bundled_model_runs_from_its_own_blocks(bundled):
    model, tokenizer, checkpoint = bundled
    packed = pack_gguf_linears(checkpoint)
    assert len(packed.packed) == 7 * checkpoint.config.num_hidden_layers
    assert not any(name.removesuffix(".weight") in packed.packed for name in packed.tensors)
    # The reference backend dequantizes the packed blocks: the same model up to the Q4_1 zero rounding.
    tokens = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.inference_mode():
        model.setup_cache(1, 64)
        expected = model(tokens, 0)
        from_blocks = build_model(packed, backend="reference")
        from_blocks.setup_cache(1, 64)
        got = from_blocks(tokens, 0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_only_a_gguf_can_be_packed_from_blocks(bundled, tmp_path):
    import dataclasses

    folder = dataclasses.replace(bundled[2], source=str(tmp_path))
    with pytest.raises(ValueError, match="only a GGUF file's linears can be packed"):
        pack_gguf_linears(folder)
