"""The packed model folder: exact save/load round trip, loading without the source, and
clear refusals of broken folders."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoint import tiny_checkpoint

from lutlm.formats import load_checkpoint
from lutlm.formats.packed_model import CONFIG_FILE, TENSOR_FILE, load_packed_model, save_packed_model
from lutlm.loader import build_model
from lutlm.quantize.config import QuantConfig
from lutlm.quantize.model_quantizer import quantize_checkpoint


def quantized(method: str = "rtn", **options):
    config = QuantConfig(method=method, **options)
    checkpoint, _ = quantize_checkpoint(tiny_checkpoint(), config, progress=False)
    return checkpoint


@pytest.mark.parametrize("options", [dict(bits=3, group_size=32), dict(bits=4, group_size=None),
                                     dict(method="ternary"), dict(method="ternary", ternary_group=32)])
def test_round_trip_is_exact(tmp_path, options):
    original = quantized(**options)
    save_packed_model(str(tmp_path), original, float_dtype="float32")
    loaded = load_packed_model(str(tmp_path))
    assert loaded.packed.keys() == original.packed.keys()
    for name, w in original.packed.items():
        back = loaded.packed[name]
        assert (back.bits, back.group_size, back.ternary) == (w.bits, w.group_size, w.ternary)
        for part in ("planes", "scales", "zeros"):
            assert torch.equal(getattr(back, part), getattr(w, part)), f"{name}.{part}"
    assert loaded.tensors.keys() == original.tensors.keys()
    for name, t in original.tensors.items():
        assert torch.equal(loaded.tensors[name], t), name
    assert loaded.config == original.config
    assert loaded.tokenizer == original.tokenizer
    assert loaded.quantization == json.loads(json.dumps(original.quantization))


def test_float16_storage_rounds_matrices_only(tmp_path):
    original = quantized(bits=4, group_size=32)
    save_packed_model(str(tmp_path), original)  # float16 by default
    loaded = load_packed_model(str(tmp_path))
    embedding = "model.embed_tokens.weight"
    assert torch.equal(loaded.tensors[embedding], original.tensors[embedding].half().float())
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(loaded.tensors[norm], original.tensors[norm])  # vectors stay float32
    assert loaded.tensor_types[embedding] == "F16"
    assert loaded.tensor_types["model.layers.0.mlp.down_proj.weight"] == "lutlm-4bit-g32"


def test_ternary_zeros_are_not_stored(tmp_path):
    save_packed_model(str(tmp_path), quantized("ternary"))
    names = load_file(os.path.join(tmp_path, TENSOR_FILE)).keys()
    assert not [n for n in names if n.endswith(".zeros")]
    loaded = load_packed_model(str(tmp_path))
    assert all(bool((w.zeros == 1).all()) for w in loaded.packed.values())


def test_folder_loads_alone_and_computes_the_same(tmp_path):
    original = quantized(bits=2, group_size=32)
    save_packed_model(str(tmp_path), original, float_dtype="float32")
    loaded = load_checkpoint(str(tmp_path))  # the dispatch every `-m DIR` goes through
    tokens = torch.randint(0, 128, (1, 12))
    logits = []
    for checkpoint in (original, loaded):
        model = build_model(checkpoint, backend="reference")
        model.setup_cache(1, 16)
        logits.append(model(tokens))
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_built_model_holds_its_packed_weights_once(tmp_path, backend):
    """A model built from a loaded folder keeps its weights in the backend's layout only: once
    the checkpoint is dropped, its packed weights are freed (they doubled a model's memory)."""
    import gc
    import weakref

    from lutlm.kernels import cpu

    if backend == "cpu" and not cpu.available():
        pytest.skip("the CPU kernels are not built")
    save_packed_model(str(tmp_path), quantized(bits=4, group_size=32))
    checkpoint = load_checkpoint(str(tmp_path))
    planes = [weakref.ref(w.planes) for w in checkpoint.packed.values()]
    model = build_model(checkpoint, backend=backend)
    del checkpoint
    gc.collect()
    assert all(ref() is None for ref in planes)
    assert "4-bit, group=32" in repr(model.model.layers[0].mlp.up_proj)


def test_commands_load_models_without_the_packed_weights(bundled_path):
    """The command line's loader returns the checkpoint without its packed weights (the model
    holds them), and the model's description still counts every parameter."""
    import argparse

    from lutlm.cli import describe, load
    from lutlm.linear import PackedLinear

    def loaded(backend: str):
        return load(argparse.Namespace(model=bundled_path, backend=backend, threads=None))

    model, _, checkpoint = loaded("cpu")
    assert checkpoint.packed == {}
    # Every decoder linear and the output head (the tied embedding's Q8_0 blocks).
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 7 * checkpoint.config.num_hidden_layers + 1
    parameters = next(line for line in describe(checkpoint, model).splitlines() if line.startswith("parameters"))
    float_model, _, float_checkpoint = loaded("reference")
    assert parameters in describe(float_checkpoint, float_model)


def test_saving_an_unquantized_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no packed weights"):
        save_packed_model(str(tmp_path), tiny_checkpoint())


@pytest.fixture
def saved(tmp_path):
    save_packed_model(str(tmp_path), quantized(bits=4, group_size=32))
    return tmp_path


def test_missing_config_is_refused(saved):
    os.remove(saved / CONFIG_FILE)
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG_FILE}"):
        load_packed_model(str(saved))


def test_wrong_format_version_is_refused(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    meta["version"] = 99
    (saved / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 99"):
        load_packed_model(str(saved))


def test_corrupt_config_is_refused(saved):
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_packed_model(str(saved))


def test_missing_tensor_is_refused(saved):
    tensors = load_file(saved / TENSOR_FILE)
    del tensors["model.layers.1.mlp.up_proj.scales"]
    save_file(tensors, saved / TENSOR_FILE)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.scales is missing"):
        load_packed_model(str(saved))


def test_wrong_tensor_shape_is_refused(saved):
    tensors = load_file(saved / TENSOR_FILE)
    name = "model.layers.0.self_attn.q_proj.planes"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, saved / TENSOR_FILE)
    with pytest.raises(ValueError, match=r"tensor model.layers.0.self_attn.q_proj.planes has shape \(4, 63, 8\) and dtype U8; expected \(4, 64, 8\)"):
        load_packed_model(str(saved))


def test_corrupt_tensor_file_is_refused(saved):
    (saved / TENSOR_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_packed_model(str(saved))
