"""`lutlm bench ppl --packed`: a folder quantized elsewhere gets a row only if it comes from the
scored source and was calibrated on the scored text; its config is read back as it was made."""

import pytest
import torch
from tiny_checkpoint import tiny_checkpoint

from lutlm.bench.ppl_table import packed_folder
from lutlm.formats.packed_model import save_packed_model
from lutlm.quantize.calibration import CalibrationSet
from lutlm.quantize.config import QuantConfig
from lutlm.quantize.model_quantizer import quantize_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    checkpoint = tiny_checkpoint()
    calibration = CalibrationSet(torch.randint(0, 128, (4, 32)), "data/wiki.txt", (1000, 1128))
    config = QuantConfig(method="rtn", bits=2, group_size=32, tune_steps=2, tune_sequences=2)
    quantized, _ = quantize_checkpoint(checkpoint, config, calibration, progress=False)
    path = tmp_path_factory.mktemp("packed") / "tiny-2bit"
    save_packed_model(path, quantized)
    return str(path), config


def test_a_folder_from_the_source_and_text_reads_back_its_config(folder):
    path, config = folder
    checkpoint, read = packed_folder(path, "models/tiny", "other/dir/wiki.txt")
    assert read == config
    assert checkpoint.quantization["calibration"]["token_range"] == [1000, 1128]


@pytest.mark.parametrize("source,text,message", [
    ("models/big.gguf", "wiki.txt", "was quantized from tiny, not from models/big.gguf"),
    ("tiny", "c4.txt", "was calibrated on data/wiki.txt, not on the scored text c4.txt"),
])
def test_a_folder_from_another_source_or_text_is_refused(folder, source, text, message):
    with pytest.raises(ValueError, match=message):
        packed_folder(folder[0], source, text)

