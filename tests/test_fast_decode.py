"""The fast decode path: the C helpers against lutlm.model's PyTorch operations, and whole
FastDecoder steps against Transformer.forward.

Error bounds. Everything is float32 (unit roundoff u = 6e-8). The helpers compute the same
formulas as PyTorch, but sums (squares for RMSNorm, dot products and the softmax total for
attention) are added in another order and products may be fused, so results differ by
rounding: a sum of n terms by about sqrt(n) u in relative terms (random-walk rounding, a
few times 1e-6 for the sizes here), exp by one or two ulp. rtol 1e-5 leaves a margin of
several times that; values near zero get atol 1e-6 against outputs of order one.
"""

import pytest
import torch
import torch.nn.functional as F

from lutlm import decode_ops
from lutlm.config import ModelConfig
from lutlm.fast_decode import FastDecoder, fast_decoder_for, unsupported_reason
from lutlm.formats import Checkpoint, TokenizerSpec
from lutlm.formats.packed import PackedWeight, pack_planes
from lutlm.kernels import cpu
from lutlm.loader import build_model
from lutlm.model import RMSNorm, rope_tables, rotate_half

pytestmark = pytest.mark.skipif(not (decode_ops.available() and cpu.available()),
                                reason="the C decode helpers or the CPU kernels are not built")
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 576, 4099])
def test_rmsnorm_matches_model(n):
    torch.manual_seed(n)
    x, w = torch.randn(n) * 3, torch.rand(n) + 0.5
    norm = RMSNorm(n, 1e-5)
    norm.weight.data = w
    torch.testing.assert_close(decode_ops.rmsnorm(x, w, 1e-5), norm(x).detach(), **TOL)


@pytest.mark.parametrize("n", [3, 576, 4100])
def test_add_rmsnorm_updates_residual_then_normalizes(n):
    torch.manual_seed(n)
    x, delta, w = torch.randn(n), torch.randn(n), torch.rand(n) + 0.5
    expected_x = x + delta
    norm = RMSNorm(n, 1e-6)
    norm.weight.data = w
    out = decode_ops.add_rmsnorm(x, delta, w, 1e-6)
    assert torch.equal(x, expected_x)  # one float addition per element, as in PyTorch
    torch.testing.assert_close(out, norm(expected_x).detach(), **TOL)


@pytest.mark.parametrize("n", [1, 13, 1536, 11008])
def test_silu_mul_matches_torch(n):
    torch.manual_seed(n)
    gate, up = torch.randn(n) * 4, torch.randn(n)
    torch.testing.assert_close(decode_ops.silu_mul(gate, up), F.silu(gate) * up, **TOL)


def reference_attention(q, k, v, cos, sin, k_cache, v_cache, pos):
    """lutlm.model.Attention's arithmetic for one token, on copies of the caches (read in
    float32 whatever their type, as the model reads them)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k_cache[:, pos], v_cache[:, pos] = k, v
    keys, values = k_cache[:, : pos + 1].float(), v_cache[:, : pos + 1].float()
    out = F.scaled_dot_product_attention(q.unsqueeze(1), keys, values, enable_gqa=True)
    return out.squeeze(1), k_cache, v_cache


# Head sizes 64 and 128 take blocks of 16 cached rows, then 4, then single rows (pos + 1 = 16,
# 38 = 2 * 16 + 4 + 2, 131 = 8 * 16 + 3); other sizes the generic loops of 4 and 1 rows.
@pytest.mark.parametrize("n_heads,n_kv,head_dim,pos", [(1, 1, 2, 0), (6, 2, 10, 37), (9, 3, 64, 130), (4, 4, 128, 5),
                                                       (8, 2, 64, 15), (32, 8, 128, 37), (4, 1, 48, 70)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_attend_one_matches_model_attention(n_heads, n_kv, head_dim, pos, cache_dtype):
    torch.manual_seed(pos)
    max_seq = pos + 3
    q, k, v = torch.randn(n_heads, head_dim), torch.randn(n_kv, head_dim), torch.randn(n_kv, head_dim)
    k_cache = torch.randn(n_kv, max_seq, head_dim).to(cache_dtype)
    v_cache = torch.randn(n_kv, max_seq, head_dim).to(cache_dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos, sin = (t[pos].contiguous() for t in rope_tables(inv_freq, 0, max_seq, torch.float32))
    expected, expected_k, expected_v = reference_attention(q, k, v, cos, sin, k_cache, v_cache, pos)
    out = decode_ops.attend_one(q.clone(), k.clone(), v, cos, sin, k_cache, v_cache, pos)
    # The rotated key is a float rounded to the cache's type; in float16 C and PyTorch may
    # round their (differently contracted) rotations to neighbouring values, 2^-11 apart
    # relative, which moves the output by about as much at most.
    tol = TOL if cache_dtype == torch.float32 else dict(rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(k_cache, expected_k, **tol)
    assert torch.equal(v_cache, expected_v)  # values are copied (and rounded alike), not computed


def test_float16_cache_reads_every_kind_of_value_exactly():
    """The fp16 cache is widened by bit operations: zeros of both signs, subnormals, the
    largest normals. With a zero query every position weighs 1/5, and every position holds
    the same values, so the output is those values as PyTorch widens them (to float rounding
    of the weights: a relative bound, which a subnormal read as zero would break)."""
    special = torch.tensor([0.0, -0.0, 2.0**-24, -(2.0**-20), 6.1e-5, -1.0, 3.14159, 65504.0, -65504.0, 1e-3,
                            -7.5, 2.0**-14, 1024.5, -0.33, 0.5, 100.0], dtype=torch.float16)
    head_dim, pos = 16, 4  # a block of 4 rows, then one row
    v_cache = special.repeat(1, pos + 2, 1)
    k_cache = torch.randn(1, pos + 2, head_dim).half()
    v = v_cache[:, pos].float().clone()
    ones, zeros = torch.ones(head_dim), torch.zeros(head_dim)
    out = decode_ops.attend_one(torch.zeros(1, head_dim), torch.zeros(1, head_dim), v, ones, zeros,
                                k_cache, v_cache, pos)
    torch.testing.assert_close(out[0], special.float(), rtol=1e-6, atol=0.0)


def test_helpers_refuse_bad_input_with_clear_messages():
    x = torch.randn(8)
    with pytest.raises(ValueError, match="x has shape \\(7,\\), expected \\(8,\\)"):
        decode_ops.rmsnorm(torch.randn(7), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor, got torch.float64"):
        decode_ops.silu_mul(x.double(), x.double())
    with pytest.raises(ValueError, match="not contiguous"):
        decode_ops.add_rmsnorm(torch.randn(8, 2)[:, 0], x, torch.ones(8), 1e-5)
    q, kv, cache = torch.randn(4, 8), torch.randn(2, 8), torch.zeros(2, 5, 8)
    with pytest.raises(ValueError, match="position 5 is outside the cache of 5 positions"):
        decode_ops.attend_one(q, kv, kv, x, x, cache, cache, 5)
    with pytest.raises(ValueError, match="3 query heads of size 8 cannot attend over 2 key/value heads"):
        decode_ops.attend_one(torch.randn(3, 8), kv, kv, x, x, cache, cache, 0)
    with pytest.raises(ValueError, match="heads of 258 values: the decode attention takes up to 256"):
        decode_ops.attend_one(torch.randn(1, 258), torch.randn(1, 258), torch.randn(1, 258), torch.randn(258),
                              torch.randn(258), torch.zeros(1, 2, 258), torch.zeros(1, 2, 258), 0)
    with pytest.raises(ValueError, match="float32 or float16 KV cache, not torch.bfloat16"):
        decode_ops.attend_one(q, kv, kv, x, x, cache.bfloat16(), cache.bfloat16(), 0)
    with pytest.raises(ValueError, match="v_cache must be a contiguous float16 CPU tensor, got torch.float32"):
        decode_ops.attend_one(q, kv, kv, x, x, cache.half(), cache, 0)


# ---- whole decode steps ----

def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_packed(n: int, k: int, bits: int, group: int | None, generator: torch.Generator) -> PackedWeight:
    """Random codes, scales and zeros; group None means one group per row."""
    group = group or k
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(n, k // group, generator=generator) * 0.04 + 0.01).half()
    zeros = (torch.rand(n, k // group, generator=generator) * ((1 << bits) - 1)).half()
    return PackedWeight(pack_planes(codes, bits), scales, zeros, bits, group)


def packed_checkpoint(config: ModelConfig, bits: int = 4, group: int | None = 32, pack_head: bool = True) -> Checkpoint:
    """Random float tensors and random packed linears of `config`'s shapes."""
    g = torch.Generator().manual_seed(0)
    c = config
    attn, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"self_attn.q_proj": (attn, c.hidden_size), "self_attn.k_proj": (kv, c.hidden_size),
              "self_attn.v_proj": (kv, c.hidden_size), "self_attn.o_proj": (c.hidden_size, attn),
              "mlp.gate_proj": (c.intermediate_size, c.hidden_size),
              "mlp.up_proj": (c.intermediate_size, c.hidden_size),
              "mlp.down_proj": (c.hidden_size, c.intermediate_size)}
    packed = {f"model.layers.{i}.{name}": random_packed(*shape, bits, group, g)
              for i in range(c.num_hidden_layers) for name, shape in shapes.items()}
    tensors = {"model.embed_tokens.weight": torch.randn(c.vocab_size, c.hidden_size, generator=g),
               "model.norm.weight": torch.rand(c.hidden_size, generator=g) + 0.5}
    for i in range(c.num_hidden_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.rand(c.hidden_size, generator=g) + 0.5
    if pack_head:
        packed["lm_head"] = random_packed(c.vocab_size, c.hidden_size, bits, group, g)
    elif not c.tie_word_embeddings:
        tensors["lm_head.weight"] = torch.randn(c.vocab_size, c.hidden_size, generator=g) * 0.1
    return Checkpoint(c, tensors, TokenizerSpec(), source="test", packed=packed)


def forward_then_fast(checkpoint: Checkpoint, steps: int = 6, cache_dtype: torch.dtype | None = None):
    """Logits of `steps` tokens from position 0: the reference backend's model.forward on the
    whole sequence, and a FastDecoder (CPU kernels, float tables) one token at a time, both
    over KV caches of `cache_dtype` (default the model's float32)."""
    reference, fast_model = build_model(checkpoint, "reference"), build_model(checkpoint, "cpu")
    fast_model.setup_cache(1, checkpoint.config.max_position_embeddings, cache_dtype)
    reference.setup_cache(1, checkpoint.config.max_position_embeddings, cache_dtype)
    decoder = FastDecoder(fast_model, table_mode="float")
    tokens = torch.randint(0, checkpoint.config.vocab_size, (1, steps), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(tokens, 0)[0]
        got = torch.stack([decoder(int(tokens[0, pos]), pos).clone() for pos in range(steps)])
    return expected, got


# Float tables make each kernel product exact up to float32 rounding in another order (the
# kernels' own tests bound it); chained through two layers and the head, logits of order 1-10
# agree to well within 1e-4 relative, the bound asserted.
STEP_TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides,bits,group,pack_head", [
    ({}, 4, 32, True),
    ({"num_key_value_heads": 4, "hidden_size": 96, "intermediate_size": 160}, 2, 32, True),
    ({"tie_word_embeddings": True}, 3, 32, False),  # float head: the tied embedding
    ({"num_hidden_layers": 3, "intermediate_size": 200}, 1, None, False),  # K = 200: one group per row
])
def test_fast_steps_match_forward(overrides, bits, group, pack_head):
    expected, got = forward_then_fast(packed_checkpoint(tiny_config(**overrides), bits, group, pack_head))
    torch.testing.assert_close(got, expected, **STEP_TOL)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_fast_steps_match_forward_on_smollm2_shapes(cache_dtype):
    """Real shapes: SmolLM2-135M's widths (576, 1536, 9 heads over 3 KV heads, head size 64),
    over the float32 cache of scoring and the float16 one of generation."""
    config = tiny_config(vocab_size=300, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, num_hidden_layers=2, tie_word_embeddings=True)
    expected, got = forward_then_fast(packed_checkpoint(config, 4, 64, pack_head=True), steps=3,
                                      cache_dtype=cache_dtype)
    torch.testing.assert_close(got, expected, **STEP_TOL)


def test_cache_reallocation_is_followed():
    checkpoint = packed_checkpoint(tiny_config())
    model, reference = build_model(checkpoint, "cpu"), build_model(checkpoint, "reference")
    decoder = FastDecoder(model, table_mode="float")
    with pytest.raises(ValueError, match="call model.setup_cache first"):
        decoder(1, 0)
    with torch.inference_mode():
        model.setup_cache(1, 8)
        decoder(3, 0)
        model.setup_cache(1, 32)  # a new, larger cache: the decoder must rebind to it
        decoder(3, 0)
        model.setup_cache(1, 32, torch.float16)  # the same size in float16: rebind to its attention
        decoder(3, 0)
        reference.setup_cache(1, 32, torch.float16)
        reference(torch.tensor([[3]]), 0)
        got = decoder(5, 1)
        expected = reference(torch.tensor([[5]]), 1)[0, -1]
    torch.testing.assert_close(got, expected, **STEP_TOL)
    with pytest.raises(ValueError, match="position 32 does not fit the KV cache of 32 positions"):
        decoder(5, 32)
    with pytest.raises(ValueError, match="token 101 is outside the vocabulary of 101"):
        decoder(101, 2)


def test_unsupported_models_fall_back_with_a_reason():
    checkpoint = packed_checkpoint(tiny_config())
    reference = build_model(checkpoint, "reference")
    assert "not a packed linear on the CPU kernels" in unsupported_reason(reference)
    assert fast_decoder_for(reference) is None
    with pytest.raises(ValueError, match="fast decode path cannot run this model: .*model.layers.0.self_attn.q_proj"):
        FastDecoder(reference)
    with pytest.raises(ValueError, match="unknown table mode 'exact'"):
        FastDecoder(build_model(checkpoint, "cpu"), table_mode="exact")
    assert isinstance(fast_decoder_for(build_model(checkpoint, "cpu")), FastDecoder)
    wide_heads = packed_checkpoint(tiny_config(hidden_size=288, num_attention_heads=1, num_key_value_heads=1))
    assert unsupported_reason(build_model(wide_heads, "cpu")) == \
        "heads of 288 values (the decode attention takes up to 256)"


def test_matmuls_only_runs_the_step_products():
    checkpoint = packed_checkpoint(tiny_config())
    model = build_model(checkpoint, "cpu")
    model.setup_cache(1, 8)
    decoder = FastDecoder(model, table_mode="float")
    decoder.buf["h"].normal_()
    decoder.run_matmuls_only()  # the head is one of them: logits = head(h) with nothing else run
    expected = decoder.buf["h"] @ checkpoint.packed["lm_head"].dequantize().T
    torch.testing.assert_close(decoder.buf["logits"], expected, **STEP_TOL)
