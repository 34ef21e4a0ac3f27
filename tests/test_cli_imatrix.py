"""The imatrix algorithm from the command line: the default for GGUF types, llama.cpp imatrix files in and
out, and the refusals that keep a file or an algorithm from meeting a job it does not fit."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import assert_refused, lighten
from tiny_models import save_tiny

from lighten.algorithms.imatrix import collect_imatrix, llama_cpp_name, read_imatrix, write_imatrix
from lighten.checkpoint import load
from lighten.eval.corpora import wiki_texts
from lighten.models import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama", seed=5)


def _recipe(path):
    return json.loads((path / "lighten.json").read_text())["recipe"]


def test_gguf_types_default_to_imatrix_which_beats_rtn_on_the_error_it_weighs(tiny, tmp_path):
    for run, algorithm in (("default", []), ("rtn", ["--algorithm", "rtn"])):
        args = ["-f", "iq4_nl", *algorithm, "--calibration-tokens", 256, "-o", tmp_path / run]
        result = lighten("quantize", tiny, *args)
        assert result.returncode == 0, result.stderr
    assert _recipe(tmp_path / "default")["algorithm"] == "imatrix"
    assert _recipe(tmp_path / "default")["calibration"] == {"tokens": 256, "context": 512}
    assert _recipe(tmp_path / "rtn")["algorithm"] == "rtn"
    model, tokenizer = load_model(tiny)
    sums, counts = collect_imatrix(model, tokenizer, wiki_texts("calibration"), 256, 512)
    errors = {}
    for run in ("default", "rtn"):
        quantized, _ = load(tmp_path / run)
        errors[run] = 0.0
        for name in sums:
            hf_name = next(n for n, _ in model.named_parameters() if llama_cpp_name(n) == name)
            diff = quantized.get_parameter(hf_name) - model.get_parameter(hf_name)
            errors[run] += (diff.square() * torch.from_numpy(sums[name] / counts[name])).sum().item()
    assert errors["default"] < errors["rtn"], errors


def test_lighten_formats_keep_rtn(tiny, tmp_path):
    assert lighten("quantize", tiny, "-f", "int4:g32", "-o", tmp_path / "q").returncode == 0
    assert _recipe(tmp_path / "q")["algorithm"] == "rtn"


def test_an_imatrix_written_by_lighten_imatrix_drives_quantize(tiny, tmp_path):
    path = tmp_path / "imatrix.gguf"
    result = lighten("imatrix", tiny, "-o", path, "--calibration-tokens", 256)
    assert result.returncode == 0, result.stderr
    entries = read_imatrix(path)
    assert len(entries) == 14 and entries["blk.0.attn_q.weight"].shape == (64,)  # 7 linears, 2 blocks
    assert_refused(lighten("imatrix", tiny, "-o", path), "already exists")
    result = lighten("quantize", tiny, "-f", "q4_0", "--imatrix", path, "-o", tmp_path / "q")
    assert result.returncode == 0, result.stderr
    assert _recipe(tmp_path / "q")["algorithm"] == "imatrix"


def test_an_imatrix_for_another_model_is_refused(tiny, tmp_path):
    path = tmp_path / "other.gguf"
    write_imatrix(path, {"blk.0.attn_q.weight": np.ones(32)}, {"blk.0.attn_q.weight": 512}, 512, "x")
    out = tmp_path / "q"
    assert_refused(
        lighten("quantize", tiny, "-f", "q4_0", "--imatrix", path, "-o", out),
        "has 32 values but model.layers.0.self_attn.q_proj.weight has 64 input columns",
        "lighten imatrix MODEL -o FILE",
        output=out,
    )
    missing = tmp_path / "missing.gguf"
    assert_refused(lighten("quantize", tiny, "-f", "q4_0", "--imatrix", missing, "-o", out), "cannot read")


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["-f", "q4_0", "--algorithm", "rtn"], "--imatrix is read by algorithm imatrix, not rtn"),
        (["-f", "int4"], "--imatrix is read by algorithm imatrix, not rtn"),
        (["-f", "q4_0", "--surgery", "fold"], "which --surgery changes"),
    ],
)
def test_imatrix_files_only_go_to_jobs_that_read_them(tiny, tmp_path, args, phrase):
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, {"blk.0.attn_q.weight": np.ones(64)}, {"blk.0.attn_q.weight": 512}, 512, "x")
    out = tmp_path / "q"
    assert_refused(lighten("quantize", tiny, *args, "--imatrix", path, "-o", out), phrase, output=out)


def test_imatrix_needs_a_gguf_type_and_a_llama_cpp_model(tiny, tmp_path):
    out = tmp_path / "q"
    assert_refused(
        lighten("quantize", tiny, "-f", "int4", "--algorithm", "imatrix", "-o", out),
        "imatrix weighs the scale search of GGUF types",
        output=out,
    )
    bert = save_tiny("bert", tmp_path / "bert")
    assert_refused(lighten("imatrix", bert, "-o", out), "exports to GGUF only", output=out)
