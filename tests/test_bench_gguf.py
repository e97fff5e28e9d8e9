"""`lutlm bench e2e --gguf` / `--synthetic-types` on tiny GGUF files, lutlm only (--no-peer): the
rows, the weight bytes per token (the file's linear tensors), the load measures, the written
report, and one-line refusals of bad input."""

import argparse
import json
import math

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from lutlm import peer
from lutlm.bench import e2e, e2e_gguf, synthetic
from lutlm.config import ModelConfig
from lutlm.formats import TokenizerSpec, gguf_writer
from lutlm.kernels import cpu

TINY = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, name="tiny")
LINEAR_SHAPES = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (128, 64), "up": (128, 64),
                 "down": (64, 128)}


def tiny_vocabulary(n: int = 100) -> TokenizerSpec:
    """A byte-level BPE vocabulary of `n` tokens with one merge (loading a GGUF needs one)."""
    tokens = ["a", "b", "ab"] + [f"t{i}" for i in range(n - 3)]
    return TokenizerSpec(gguf_model="gpt2", tokens=tokens, merges=["a b"], token_types=[1] * n,
                         bos_token_id=3, eos_token_id=4)


def write_tiny_gguf(path, matrix_type: str) -> None:
    """The tiny random model as a GGUF, F16, with its decoder linears and output head in `matrix_type`."""
    linear = None if matrix_type == "F16" else matrix_type
    gguf_writer.save_gguf(synthetic.random_checkpoint(TINY, tiny_vocabulary()), path, "F16", linear_type=linear,
                          head_type=linear)


def linear_bytes(matrix_type: str) -> int:
    """What one decode step reads of the tiny file, from the shapes alone: 7 linears per layer
    and the (untied) head, each rows x columns weights in `matrix_type`'s blocks."""
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[matrix_type]]
    weights = TINY.num_hidden_layers * sum(r * c for r, c in LINEAR_SHAPES.values()) + TINY.vocab_size * 64
    return weights // block * block_bytes


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    paths = {}
    for kind in ("F16", "Q8_0"):
        paths[kind] = folder / f"tiny-{kind}.gguf"
        write_tiny_gguf(paths[kind], kind)
    return paths


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    e2e.add_parser(parser.add_subparsers())
    return parser.parse_args(["e2e", *argv])


def test_file_info_counts_every_linear_and_the_head(tiny_files):
    for kind, path in tiny_files.items():
        info = e2e_gguf.gguf_info(path)
        assert info.bytes_per_token == linear_bytes(kind)
        assert info.layer_types == {kind: 7 * TINY.num_hidden_layers}
        assert (info.head_tensor, info.head_type) == ("output.weight", kind)
        assert info.file_bytes > info.bytes_per_token  # plus the embedding, norms and header


def test_bench_gguf_rows_report_and_files(tiny_files, tmp_path, capsys):
    backend = "cpu" if cpu.available() else "reference"
    files = ",".join(str(tiny_files[k]) for k in ("F16", "Q8_0"))
    args = parse(["--gguf", files, "--no-peer", "--threads", "1", "--prompts", "4,6", "--decode-prompt", "4",
                  "--new-tokens", "3", "--repeats", "1", "--bandwidth-mib", "64", "--backend", backend,
                  "--machine", "testbox", "--name", "tiny", "--out-dir", str(tmp_path), "--json",
                  "--work-dir", str(tmp_path / "work")])
    (result,) = e2e.run(args)

    rows = result["rows"]
    assert {(r["file"], r["engine"], r["metric"]) for r in rows} == {
        (f"tiny-{k}.gguf", "lutlm", m) for k in ("F16", "Q8_0") for m in ("prefill 4", "prefill 6", "decode 3")}
    for r in rows:
        s = r["tokens_per_s"]
        assert all(math.isfinite(v) and v > 0 for v in (s["median"], s["min"], s["max"]))
        kind = r["file"].removeprefix("tiny-").removesuffix(".gguf")
        assert r["weight_bytes_per_token"] == linear_bytes(kind)
        if r["metric"] == "decode 3":
            assert r["weight_bytes_per_s"] == pytest.approx(linear_bytes(kind) * s["median"])
            if cpu.available():
                assert math.isfinite(r["bandwidth_fraction"]) and r["bandwidth_fraction"] > 0
    assert [f["bytes_per_token"] for f in result["files"]] == [linear_bytes("F16"), linear_bytes("Q8_0")]
    assert result["files"][0]["config"]["hidden_size"] == 64

    assert [(load["file"], load["engine"]) for load in result["loads"]] == [
        ("tiny-F16.gguf", "lutlm"), ("tiny-Q8_0.gguf", "lutlm")]
    for load in result["loads"]:
        assert load["seconds"]["median"] > 0
        assert load["peak_rss_first"] >= load["peak_rss_load"] >= load["rss_before"] > 0
        assert load["peak_rss_load_per_file_byte"] == load["peak_rss_load"] / load["file_bytes"]
    if cpu.available():
        assert [b["threads"] for b in result["bandwidth"]] == [1] and result["bandwidth"][0]["bytes_per_s"] > 0
        targets = {t["target"]: t for t in result["targets"]}
        assert set(targets) == {f"lutlm decode bandwidth fraction: tiny-{k}.gguf, 1 thread" for k in ("F16", "Q8_0")}
    assert "llama.cpp" not in {r["engine"] for r in rows}

    out = tmp_path / "testbox"
    assert sorted(p.name for p in out.iterdir()) == ["e2e_gguf_tiny.json", "e2e_gguf_tiny.md", "e2e_gguf_tiny.png"]
    text = (out / "e2e_gguf_tiny.md").read_text()
    assert "| tiny-Q8_0.gguf | Q8_0 |" in text and "| tiny-F16.gguf | lutlm | 1 |" in text
    assert "## Load" in text and "--no-peer" in text and result["cpu_model"] in text
    assert json.loads((out / "e2e_gguf_tiny.json").read_text())["files"][1]["layer_types"] == {"Q8_0": 14}
    assert (out / "e2e_gguf_tiny.png").stat().st_size > 10_000
    assert "wrote " in capsys.readouterr().out


def test_targets_per_file_and_thread_count():
    def row(engine, metric, speed, file="Q2_K", fraction=None):
        r = {"engine": engine, "file": file, "file_type": file, "threads": 2, "metric": metric,
             "tokens_per_s": {"median": speed}}
        if metric.startswith("decode"):
            r["bandwidth_fraction"] = fraction
        return r

    rows = [row("lutlm", "decode 128", 12.0, fraction=0.9), row("llama.cpp", "decode 128", 10.0, fraction=0.75),
            row("lutlm", "prefill 512", 90.0), row("llama.cpp", "prefill 512", 100.0),
            row("lutlm", "decode 128", 11.0, file="Q4_0", fraction=0.8),
            row("llama.cpp", "decode 128", 10.0, file="Q4_0", fraction=0.7)]
    targets = {t["target"]: t for t in e2e_gguf.check_targets(rows)}
    q2 = targets["decode 128 tok/s lutlm / llama.cpp: Q2_K, 2 threads"]
    assert (q2["value"], q2["required"], q2["met"]) == (1.2, 1.3, False)  # Q2_K must be 1.3x
    q4 = targets["decode 128 tok/s lutlm / llama.cpp: Q4_0, 2 threads"]
    assert (q4["value"], q4["required"], q4["met"]) == (1.1, 1.0, True)
    assert not targets["prefill 512 tok/s lutlm / llama.cpp: Q2_K, 2 threads"]["met"]
    bw = targets["lutlm decode bandwidth fraction: Q2_K, 2 threads"]
    assert (bw["lutlm"], bw["llama.cpp"], bw["met"]) == (0.9, 0.75, True)
    assert not targets["lutlm decode bandwidth fraction: Q4_0, 2 threads"]["met"]
    assert len(targets) == 5  # no prefill 512 for Q4_0


def test_synthetic_type_names_are_llama_cpps_file_types():
    for name, peer_name in e2e_gguf.QUANT_TYPES.items():
        assert peer.FTYPES[peer_name] == LlamaFileType[f"MOSTLY_{name}"].value
    assert set(e2e_gguf.DEFAULT_SYNTHETIC_TYPES) <= set(e2e_gguf.QUANT_TYPES)


@pytest.mark.parametrize("argv,message", [
    (["--gguf", "/nonexistent/model.gguf", "--no-write"], "--gguf: no such file: /nonexistent/model.gguf"),
    (["--synthetic-types", "Q4_0,Q9_9", "--no-write"], "unknown type 'Q9_9' for --synthetic-types; choose from"),
    (["--synthetic-types", "Q4_0", "--models", "smollm2", "--no-write", "--no-peer"],
     "--synthetic-types takes --models llama2-7b or llama3-8b, not 'smollm2'"),
    (["--synthetic-types", "Q4_0", "--no-write", "--no-peer"],
     "--synthetic-types needs llama.cpp's quantizer to make the files: it cannot run with --no-peer"),
    (["--gguf", "x.gguf", "--synthetic-types", "Q4_0"], "give --gguf or --synthetic-types, not both"),
    (["--gguf", "{tiny}"], "--machine NAME is required to write the results"),
    (["--gguf", "{tiny}", "--machine", "../up"], "--machine takes a folder name"),
])
def test_bad_input_is_one_line(argv, message, capsys, tmp_path, tiny_files):
    from lutlm import cli

    argv = [a.replace("{tiny}", str(tiny_files["F16"])) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "e2e", *argv, "--work-dir", str(tmp_path)])
    assert exit_.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_file_that_is_not_gguf_is_one_line(tmp_path, capsys):
    from lutlm import cli

    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"not a gguf file at all, just bytes" * 4)
    with pytest.raises(SystemExit):
        cli.main(["bench", "e2e", "--gguf", str(bad), "--no-write", "--no-peer"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err, err


def test_a_file_lutlm_cannot_load_is_reported_not_fatal(tiny_files, tmp_path, monkeypatch):
    import lutlm.loader

    def refuse(path, backend=None, progress=None):
        raise ValueError("tensor type XYZ is not supported\nsecond line")

    monkeypatch.setattr(lutlm.loader, "load_model", refuse)
    args = parse(["--gguf", str(tiny_files["F16"]), "--no-peer", "--threads", "1", "--prompts", "4",
                  "--decode-prompt", "4", "--new-tokens", "2", "--repeats", "1", "--load-repeats", "0",
                  "--bandwidth-mib", "16", "--no-write", "--work-dir", str(tmp_path)])
    (result,) = e2e.run(args)
    assert result["rows"] == [] and result["loads"] == []
    (target,) = result["targets"]
    assert target["met"] is False
    assert target["target"] == "lutlm loads and runs tiny-F16.gguf: ValueError: tensor type XYZ is not supported"
    text = e2e_gguf.markdown(result)
    assert "- lutlm could not load or run tiny-F16.gguf: ValueError: tensor type XYZ is not supported" in text
    assert "| **no** |" in text


def test_lazy_synthetic_checkpoint_is_random_checkpoints(tmp_path):
    eager = synthetic.random_checkpoint(TINY, tiny_vocabulary(), seed=3)
    lazy = e2e_gguf.lazy_random_checkpoint(TINY, tiny_vocabulary(), seed=3)
    assert lazy.config == eager.config and lazy.tensor_types == eager.tensor_types
    assert list(lazy.tensors) == list(eager.tensors)
    assert all(torch.equal(lazy.tensors[name], eager.tensors[name]) for name in eager.tensors)
    gguf_writer.save_gguf(eager, tmp_path / "eager.gguf", "F16")
    gguf_writer.save_gguf(lazy, tmp_path / "lazy.gguf", "F16")
    assert (tmp_path / "eager.gguf").read_bytes() == (tmp_path / "lazy.gguf").read_bytes()
