"""The decoder against Hugging Face transformers' LlamaForCausalLM on the same weights."""

import pytest
import torch

from lutlm.config import ModelConfig
from lutlm.formats import Checkpoint, TokenizerSpec
from lutlm.kv_cache import KVCache
from lutlm.loader import build_model

transformers = pytest.importorskip("transformers")


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=128, tie_word_embeddings=False)
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_pair(config: ModelConfig):
    """A random transformers model and the lutlm model built from its state dict."""
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    tensors = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    ours = build_model(Checkpoint(config, tensors, TokenizerSpec(), source="test"))
    return hf, ours


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
])
def test_logits_match_transformers(overrides):
    config = tiny_config(**overrides)
    hf, ours = hf_pair(config)
    tokens = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(tokens).logits
        ours.setup_cache(2, 64)
        got = ours(tokens, 0)
    # fp32 throughout; differences are summation-order rounding only.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_incremental_decode_matches_full_forward():
    config = tiny_config()
    _, model = hf_pair(config)
    tokens = torch.randint(0, config.vocab_size, (1, 24))
    with torch.no_grad():
        model.setup_cache(1, 32)
        full = model(tokens, 0)
        prefix = model(tokens[:, :10], 0)  # from position 0: SDPA's causal mask
        chunk = model(tokens[:, 10:16], 10)  # after a cached prefix: the explicit offset mask
        steps = [model(tokens[:, i:i + 1], i) for i in range(16, 24)]
    torch.testing.assert_close(prefix, full[:, :10], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk, full[:, 10:16], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 16:], rtol=1e-4, atol=1e-4)


def test_cache_overflow_is_refused():
    _, model = hf_pair(tiny_config())
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        model(torch.zeros(1, 9, dtype=torch.long), 0)


def test_a_cache_that_fits_is_kept_unless_a_fresh_one_is_asked_for():
    """setup_cache keeps a default cache at least as large as asked; with fresh=True it allocates
    one of exactly the size asked (a smaller one frees memory)."""
    _, model = hf_pair(tiny_config())
    cache = model.setup_cache(4, 16)
    assert model.setup_cache(2, 8) is cache
    fresh = model.setup_cache(2, 8, fresh=True)
    assert fresh is not cache and fresh.keys[0].shape[0] == 2 and fresh.keys[0].shape[2] == 8
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        model(torch.zeros(3, 1, dtype=torch.long), 0)


def test_caller_owned_caches_hold_their_own_sequences():
    """Two sequences in two slots of one cache, each at its own position, give what each gives
    alone in a cache of its own; the model's default cache is not touched."""
    config = tiny_config()
    _, model = hf_pair(config)
    a, b = torch.randint(0, config.vocab_size, (1, 12)), torch.randint(0, config.vocab_size, (1, 7))
    with torch.no_grad():
        alone = [model(t, 0, cache=KVCache(config, 1, 16)) for t in (a, b)]
        shared = KVCache(config, 3, 16)
        prefills = [model(a[:, :-1], 0, cache=shared, slots=[2]), model(b[:, :-1], 0, cache=shared, slots=[0])]
        step = model(torch.tensor([[a[0, -1]], [b[0, -1]]]), [11, 6], cache=shared, slots=[2, 0])
    assert model.cache is None
    torch.testing.assert_close(prefills[0], alone[0][:, :-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefills[1], alone[1][:, :-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[:, 0], torch.cat([alone[0][:, -1], alone[1][:, -1]]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), [3], cache=shared, slots=[3])
    with pytest.raises(ValueError, match="no KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), 0)
