"""GGUF Q4_0/Q4_1/Q4_K blocks packed as they are: against gguf-py's own quantizer and dequantizer
(Q4_0, Q4_1), blocks written field by field and lutlm's dequantizer (Q4_K, which gguf-py cannot
quantize), and the bundled model run from its packed blocks against the float path."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from lutlm.formats import load_checkpoint
from lutlm.formats.ggml_quants import dequantize
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


def q4_k_blocks(n_blocks: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Super-blocks in block_q4_K's layout (lutlm/formats/ggml_quants.py) from random fields, and
    each weight's |s q| and offset dmin m: the two terms of the packing's error bound. Sub-block 0
    of block 0 has scale 0 (a constant group)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(1e-3, 1e-2, n_blocks).astype(np.float16)
    dmin = rng.uniform(1e-3, 1e-2, n_blocks).astype(np.float16)
    sc = rng.integers(0, 64, (n_blocks, 8), dtype=np.uint8)
    sc[0, 0] = 0
    m = rng.integers(0, 64, (n_blocks, 8), dtype=np.uint8)
    q = rng.integers(0, 16, (n_blocks, 4, 2, 32), dtype=np.uint8)  # sub-block 2j + h: nibble h of qs[32j + l]
    blocks = np.zeros((n_blocks, 144), dtype=np.uint8)
    blocks[:, 0:2] = d.view(np.uint8).reshape(n_blocks, 2)
    blocks[:, 2:4] = dmin.view(np.uint8).reshape(n_blocks, 2)
    blocks[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    blocks[:, 8:12] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    blocks[:, 12:16] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    blocks[:, 16:144] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n_blocks, 128)
    step = d.astype(np.float32)[:, None, None] * sc.reshape(n_blocks, 8, 1)
    offset = dmin.astype(np.float32)[:, None, None] * m.reshape(n_blocks, 8, 1)
    codes = q.reshape(n_blocks, 8, 32)
    return blocks, (step * codes).reshape(-1), np.broadcast_to(offset, codes.shape).reshape(-1)


def test_q4_k_sub_blocks_pack_within_the_rounding_of_their_grid():
    n, k = 4, 512
    blocks, scaled_codes, offset = q4_k_blocks(n * k // 256)
    expected = dequantize(blocks.reshape(-1), "Q4_K", (n, k))
    packed = pack_ggml_4bit(blocks.reshape(-1), "Q4_K", (n, k))
    assert packed.group_size == 32 and packed.bits == 4
    # s = d sc rounded to fp16 moves s q by at most |s q| 2^-11; z = dmin m / s rounded to fp16
    # moves s z = dmin m by at most dmin m 2^-11 (the constant group: its value rounded once).
    bound = torch.from_numpy((scaled_codes + offset) * FP16_HALF_ULP * 1.01 + 1e-7).view(n, k)
    assert ((packed.dequantize() - expected).abs() <= bound).all()
    assert (packed.dequantize()[0, :32] == packed.dequantize()[0, 0]).all()  # the constant group stays constant


def test_q4_k_m_file_packs_its_q4_k_linears(bundled_path, tmp_path):
    """llama.cpp's Q4_K_M of the bundled model: every Q4_K decoder linear is packed from its
    blocks, the others stay float, and the model computes what the float path computes."""
    pytest.importorskip("llama_cpp")
    from lutlm.peer import quantize

    path = str(tmp_path / "q4_k_m.gguf")
    quantize(bundled_path, path, "Q4_K")
    checkpoint = load_checkpoint(path)
    q4_k = {name.removesuffix(".weight") for name, kind in checkpoint.tensor_types.items()
            if kind == "Q4_K" and name.startswith("model.layers.")}
    assert q4_k  # K = 1536 (mlp.down_proj) is a whole number of super-blocks
    packed = pack_gguf_linears(checkpoint)
    assert q4_k <= set(packed.packed)
    assert_runs_as(build_model(checkpoint), packed, torch.tensor([[1, 504, 3575, 282, 4649, 314, 7042, 30]]))


def assert_runs_as(dense, packed, tokens: torch.Tensor) -> None:
    """The packed checkpoint, on the reference backend (which dequantizes the packed blocks),
    predicts what the dense model does, logits within the rounding of the packed grids."""
    with torch.inference_mode():
        dense.setup_cache(1, tokens.shape[1])
        expected = dense(tokens, 0)
        from_blocks = build_model(packed, backend="reference")
        from_blocks.setup_cache(1, tokens.shape[1])
        got = from_blocks(tokens, 0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_bundled_model_runs_from_its_own_blocks(bundled):
    model, tokenizer, checkpoint = bundled
    packed = pack_gguf_linears(checkpoint)
    assert len(packed.packed) == 7 * checkpoint.config.num_hidden_layers
    assert not any(name.removesuffix(".weight") in packed.packed for name in packed.tensors)
    tokens = tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    assert_runs_as(model, packed, torch.tensor([tokens]))  # the same model up to the Q4_1 zero rounding


def test_only_a_gguf_can_be_packed_from_blocks(bundled, tmp_path):
    import dataclasses

    folder = dataclasses.replace(bundled[2], source=str(tmp_path))
    with pytest.raises(ValueError, match="only a GGUF file's linears can be packed"):
        pack_gguf_linears(folder)
