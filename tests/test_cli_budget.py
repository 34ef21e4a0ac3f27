"""GGUF targets from the command line: budgets over the block matrices with GGUF candidates by default,
--fallback for rows that are not whole blocks, --sensitivity, and the combinations that are refused."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import assert_refused, lighten
from tiny_models import sample_text, save_tiny, tiny_bpe_tokenizer, tiny_model

from lighten.checkpoint import read_manifest
from lighten.formats import get
from lighten.plan import GGUF_CANDIDATES, make_plan
from lighten.quantize import weight_shape

# Rows of 64 (hidden size: whole 32-blocks, no 256-block), 256 (o_proj reads 4 heads of 64) and, for
# down_proj, the intermediate size: 256, or 48 (not even whole 32-blocks).
KQUANT_ROWS = dict(head_dim=64, intermediate_size=256)
MIXED_ROWS = dict(head_dim=64, intermediate_size=48)


def test_fallback_stores_each_weight_as_llama_quantize_would(tmp_path):
    src = save_tiny("llama", tmp_path / "src", **MIXED_ROWS)
    out = tmp_path / "q"
    assert_refused(
        lighten("quantize", src, "-f", "q4_k", "-o", out),
        "q4_k stores rows in whole blocks of 256",
        "give --fallback",
        "(this one as q5_0)",
        output=out,
    )
    result = lighten("quantize", src, "-f", "q4_k", "--fallback", "--calibration-tokens", 64, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.mlp.down_proj.weight and 1 more kept in full precision" in result.stderr
    tensors = read_manifest(out)["tensors"]
    model = tiny_model("llama", **MIXED_ROWS)  # the same shapes
    for name in make_plan(model, "int8"):  # every weight a format could take
        fallback = get("q4_k").fallback_for(weight_shape(model, name))
        assert tensors.get(name, {}).get("spec") == (fallback and fallback.name), name
    assert {t["spec"] for t in tensors.values()} == {"q4_k", "q5_0"}  # o_proj's rows of 256 stay q4_k


def test_a_gguf_budget_chooses_gguf_types_within_the_bits_of_the_block_matrices(tmp_path):
    src = save_tiny("llama", tmp_path / "src", initializer_range=0.2, **KQUANT_ROWS)
    out = tmp_path / "q"
    result = lighten("quantize", src, "-f", "q4_k", "--bits", 4.5, "--calibration-tokens", 64, "-o", out)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    summary = manifest["budget"]
    assert summary["counts"] == "block matrices" and summary["sensitivity"] == "imatrix"
    assert summary["bits_per_weight"] <= 4.5
    assert f"over the block matrices ({summary['weights']:,} weights)" in result.stdout
    assert f"{summary['bits_per_weight']:.4f} bits per weight" in result.stdout
    specs = [t["spec"] for t in manifest["tensors"].values()]
    assert set(specs) <= set(GGUF_CANDIDATES) and len(set(specs)) > 1
    assert all(row["format"] in row["candidates"] for row in manifest["allocation"])
    # What eval measures from the stored bytes agrees: the embedding (tied output) is kept, not counted.
    text = tmp_path / "text.txt"
    text.write_text(sample_text(400))
    result = lighten("eval", out, "--text", text, "--tokens", 128, "--context", 64, "--json")
    assert result.returncode == 0, result.stderr
    (cand,) = json.loads(result.stdout)["candidates"]
    assert cand["bits_per_weight"] == pytest.approx(summary["bits_per_weight"])


def test_the_readme_budget_command_runs_in_llama_cpp_as_lighten_runs_it(tmp_path):
    """The user's flow: `quantize M --bits B --algorithm gptq` (no --format: a GGUF budget), then `export Q
    --to gguf` (no --type: every block matrix keeps its type), and llama.cpp computes what lighten's
    checkpoint computes."""
    import gguf

    from lighten.checkpoint import load
    from lighten.export.gguf import gguf_tensor_name
    from lighten.export.llamacpp import open_llama

    src, full = tmp_path / "src", tiny_model("llama", vocab_size=300, initializer_range=0.2, **KQUANT_ROWS)
    full.save_pretrained(src)
    tiny_bpe_tokenizer().save_pretrained(src)
    out = tmp_path / "q"
    result = lighten(
        "quantize", src, "--bits", 5, "--algorithm", "gptq", "--calibration-tokens", 64, "-o", out
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    specs = {name: t["spec"] for name, t in manifest["tensors"].items()}
    assert manifest["budget"]["counts"] == "block matrices" and manifest["recipe"]["algorithm"] == "gptq"
    assert set(specs.values()) <= set(GGUF_CANDIDATES) and len(set(specs.values())) > 1, specs
    # F32 keeps the embedding / output matrix exact, for the logits compared below.
    default, f32 = tmp_path / "default.gguf", tmp_path / "f32.gguf"
    for path, options in ((default, []), (f32, ["--type", "F32"])):
        result = lighten("export", out, "--to", "gguf", "--pre-tokenizer", "gpt-2", *options, "-o", path)
        assert result.returncode == 0, result.stderr
    types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(default).tensors}
    assert all(types[gguf_tensor_name(name)] == spec for name, spec in specs.items())
    assert types["token_embd.weight"] == "q8_0"
    ids = list(range(5, 25))
    llm = open_llama(f32, n_ctx=64, n_threads=2, logits_all=True)
    llm.eval(ids)
    model, _ = load(out)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
        reference = full(torch.tensor([ids])).logits[0].numpy()
    # The same codes; llama.cpp rounds activations to 8 bits in its quantized matmuls, which moves these
    # large random activations' logits by ~0.04 (as much at q8_0 alone), against ~0.56 that the budget's
    # quantization moves them and the logits' own size (~1-3) that a misread type or layout would.
    quantization = np.abs(ours - reference).mean()
    assert np.abs(np.asarray(llm.scores[: len(ids)]) - ours).mean() < 0.15 * quantization


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["-f", "int4", "--bits", 4.5], "budget.candidates: missing"),
        (["-f", "int4:g32", "--fallback"], "fallback: is for GGUF block types"),
        (["-f", "q4_k", "--sensitivity", "kl"], "--candidates and --sensitivity only make sense with --bits"),
        (["-f", "q4_k", "--bits", 4.5, "--sensitivity", "hessian"], "'hessian' is not one of kl, imatrix"),
        (["--recipe", "int8-weights", "--fallback"], "--recipe describes the whole job"),
        (["-f", "q4_k", "--bits", 4.5, "--candidates", "q4_k,q6_k"], "no budget candidate fits the rows"),
        (
            [
                "-f",
                "int8",
                "--bits",
                6,
                "--candidates",
                "int4:g32,int8",
                "--embeddings",
                "--sensitivity",
                "imatrix",
            ],
            "model.embed_tokens.weight is none (an embedding table): use sensitivity kl",
        ),
    ],
)
def test_bad_combinations_are_refused(tmp_path, args, phrase):
    src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "q"
    assert_refused(lighten("quantize", src, *args, "--calibration-tokens", 64, "-o", out), phrase, output=out)
