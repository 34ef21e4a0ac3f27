"""The command line as a user meets it: exit codes, what it prints, no tracebacks (tests/cli_helpers.py)."""

import json

import pytest
from cli_helpers import assert_refused, lighten
from tiny_models import sample_text, save_tiny


def snapshot(folder):
    """Every path under `folder` with its bytes (None for a directory), to show nothing changed."""
    return {p: None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_formats_json_lists_the_zoo():
    result = lighten("formats", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    names = {r["name"].split(":")[0] for r in rows}
    assert {
        "int8",
        "int4",
        "fp8_e4m3",
        "fp8_e5m2",
        "fp6_e3m2",
        "fp6_e2m3",
        "fp4_e2m1",
        "mxfp4",
        "mxfp6_e2m3",
        "mxfp8_e4m3",
        "mxint8",
        "nf4",
        "ternary",
        "binary",
    } <= names
    assert all(isinstance(r["bits_per_element"], (int, float)) and r["bits_per_element"] > 0 for r in rows)


@pytest.mark.parametrize(
    "args,phrases",
    [
        (["quantize", "/no/such/model", "-f", "int4", "-o", "x"], ["/no/such/model", "minilm"]),
        (["eval", "/no/such/model"], ["/no/such/model"]),
        (["eval", "minilm", "--text", "/no/such/file.txt"], ["/no/such/file.txt"]),
    ],
)
def test_user_mistakes_exit_2_with_one_message(args, phrases):
    assert_refused(lighten(*args), *phrases)


def test_bad_format_spec_and_existing_output(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    assert_refused(lighten("quantize", src, "-f", "int4:g0", "-o", tmp_path / "q"), "int4:g0")
    assert not (tmp_path / "q").exists()
    (tmp_path / "q").mkdir()
    assert_refused(lighten("quantize", src, "-f", "int4:g32", "-o", tmp_path / "q"), "--force")


def test_quantize_then_eval_a_causal_model(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text(sample_text(800))
    result = lighten("quantize", src, "-f", "int4:g32", "-o", tmp_path / "q")
    assert result.returncode == 0, result.stderr
    result = lighten("eval", tmp_path / "q", "--text", text, "--tokens", 256, "--context", 64, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "causal" and report["reference"]["name"] == str(src)
    (cand,) = report["candidates"]
    assert cand["format"] == "int4:g32:sym" and cand["kl"] > 0 and cand["perplexity"] > 1
    assert cand["weight_bytes"] < report["reference"]["weight_bytes"]


def test_eval_clamps_the_context_to_the_position_table(tmp_path):
    """GPT-2 with 32 positions, asked for windows of 512: clamped to 32 and said (an IndexError before)."""
    src = save_tiny("gpt2", tmp_path / "src", n_positions=32)
    text = tmp_path / "text.txt"
    text.write_text(sample_text(400))
    result = lighten(
        "eval", src, "--reference", src, "--text", text, "--tokens", 128, "--context", 512, "--json"
    )
    assert result.returncode == 0, result.stderr
    assert "context 512 is beyond the 32 positions the model reads: clamped to 32" in result.stderr
    report = json.loads(result.stdout)
    assert report["data"]["context"] == 32 and report["candidates"][0]["kl"] == pytest.approx(0, abs=1e-6)


def test_a_gguf_block_type_end_to_end(tmp_path):
    """lighten quantize -f q4_0 writes a checkpoint that runs packed and evaluates at exactly 4.5 bits."""
    src = save_tiny("llama", tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text(sample_text(400))
    assert lighten("quantize", src, "-f", "Q4_0", "-o", tmp_path / "q").returncode == 0
    result = lighten("run", tmp_path / "q", "-p", "the model is", "--max-new-tokens", 2, "--json")
    assert result.returncode == 0, result.stderr
    result = lighten("eval", tmp_path / "q", "--text", text, "--tokens", 128, "--context", 64, "--json")
    assert result.returncode == 0, result.stderr
    (cand,) = json.loads(result.stdout)["candidates"]
    assert cand["format"] == "q4_0" and cand["bits_per_weight"] == 4.5 and cand["kl"] > 0


def test_eval_an_encoder_against_itself(tmp_path):
    src = save_tiny("bert", tmp_path / "src")
    text = tmp_path / "sentences.txt"
    text.write_text("the model is light\na small number of layers\nthe scale of a group\nthe norm of a row\n")
    result = lighten("eval", src, "--reference", src, "--text", text, "--json")
    assert result.returncode == 0, result.stderr
    (cand,) = json.loads(result.stdout)["candidates"]
    assert cand["cosine"] == pytest.approx(1.0) and cand["spearman"] == pytest.approx(1.0)


def test_run_generates_from_a_packed_checkpoint_and_embeds_with_an_encoder(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    assert lighten("quantize", src, "-f", "int4:g32", "-o", tmp_path / "q").returncode == 0
    result = lighten("run", tmp_path / "q", "-p", "the model is", "--max-new-tokens", 4, "--json")
    assert result.returncode == 0, result.stderr
    (gen,) = json.loads(result.stdout)["generations"]
    assert 1 <= gen["new_tokens"] <= 4 and gen["decode_tokens_per_s"] > 0
    bert = save_tiny("bert", tmp_path / "bert")
    result = lighten("run", bert, "-p", "the model is light", "-p", "a small layer", "--json")
    assert result.returncode == 0, result.stderr
    cos = json.loads(result.stdout)["cosine"]
    assert cos[0][0] == pytest.approx(1.0, abs=1e-5) and len(cos) == 2


def test_inspect_writes_json_and_plot(tmp_path):
    src = save_tiny("gpt2", tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text(sample_text(400))
    png = tmp_path / "out.png"
    result = lighten("inspect", src, "--text", text, "--tokens", 128, "--plot", png, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == "gpt2" and len(report["sites"]) == 2 * 4 + 1
    assert png.read_bytes().startswith(b"\x89PNG")
    again = ("inspect", src, "--text", text, "--tokens", 128, "--plot", png)
    assert_refused(lighten(*again), str(png), "--force")
    assert lighten(*again, "--force").returncode == 0  # lighten's own plot: replaced
    photo = tmp_path / "photo.png"
    photo.write_bytes(png.read_bytes().replace(b"lighten", b"someone"))  # a PNG lighten did not write
    before = snapshot(tmp_path)
    assert_refused(lighten(*again[:-1], photo, "--force"), "not written by lighten")
    assert snapshot(tmp_path) == before


def test_quantize_with_gptq_and_with_a_budget(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    result = lighten(
        "quantize",
        src,
        "-f",
        "int4:g32",
        "--algorithm",
        "gptq",
        "--calibration-tokens",
        64,
        "-o",
        tmp_path / "gptq",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "gptq" / "lighten.json").read_text())["recipe"]["algorithm"] == "gptq"
    result = lighten(
        "quantize",
        src,
        "-f",
        "int4:g32",
        "--bits",
        6,
        "--candidates",
        "int4:g32,int8",
        "--calibration-tokens",
        64,
        "-o",
        tmp_path / "mixed",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "mixed" / "lighten.json").read_text())
    assert {t["spec"] for t in manifest["tensors"].values()} == {"int4:g32:sym", "int8:channel:sym"}
    assert len(manifest["allocation"]) == len(manifest["tensors"])
    assert manifest["recipe"]["budget"]["size"] == "6.0bits"
    twice = ("--bits", 6, "--budget", "1MB", "--candidates", "int4:g32,int8", "-o", tmp_path / "twice")
    assert_refused(lighten("quantize", src, "-f", "int4:g32", *twice), "--bits")


def test_recipe_and_its_conflicts(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    result = lighten("quantize", src, "--recipe", "int8-weights", "-o", tmp_path / "q")
    assert result.returncode == 0, result.stderr
    assert_refused(
        lighten("quantize", src, "--recipe", "int8-weights", "-f", "int4", "-o", tmp_path / "r"), "--recipe"
    )
    assert_refused(lighten("quantize", src, "-o", tmp_path / "r"), "--format")


def test_export_targets_and_refusals(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    assert lighten("quantize", src, "-f", "int4:g32", "-o", tmp_path / "q").returncode == 0
    result = lighten("export", tmp_path / "q", "--to", "compressed-tensors", "-o", tmp_path / "ct")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert_refused(
        lighten("export", tmp_path / "q", "--to", "compressed-tensors", "-o", tmp_path / "ct"), "--force"
    )
    assert_refused(lighten("export", tmp_path / "q", "--to", "onnx", "-o", tmp_path / "x"), "gguf")
    # The tiny tokenizer is word-level; GGUF export supports byte-level BPE tokenizers only.
    assert_refused(lighten("export", tmp_path / "q", "--to", "gguf", "-o", tmp_path / "m.gguf"))
    assert not (tmp_path / "m.gguf").exists()


def test_force_replaces_only_what_lighten_wrote(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    assert lighten("quantize", src, "-f", "int8", "-o", tmp_path / "q").returncode == 0
    assert lighten("quantize", src, "-f", "int4:g32", "-o", tmp_path / "q", "--force").returncode == 0
    assert json.loads((tmp_path / "q" / "lighten.json").read_text())["tensors"]  # replaced, whole
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "notes.gguf").write_text("mine")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "results.md").write_text("mine")
    before = snapshot(tmp_path)
    for args in (
        ["quantize", src, "-f", "int8", "-o", tmp_path / "mine", "--force"],
        ["export", tmp_path / "q", "--to", "compressed-tensors", "-o", tmp_path / "mine", "--force"],
        ["export", tmp_path / "q", "--to", "gguf", "-o", tmp_path / "notes.gguf", "--force"],
        ["demo", "-o", tmp_path / "demo"],  # a rerun replaces only what an earlier demo wrote
    ):
        assert_refused(lighten(*args), "not written by lighten", "delete it yourself")
    assert snapshot(tmp_path) == before


def test_an_output_that_is_or_holds_the_input_is_refused(tmp_path):
    src = save_tiny("llama", tmp_path / "models" / "src")
    assert lighten("quantize", src, "-f", "int8", "-o", tmp_path / "q").returncode == 0
    (tmp_path / "link").symlink_to(src)
    before = snapshot(tmp_path)
    for args in (
        ["quantize", src, "-f", "int8", "-o", src, "--force"],
        ["quantize", "src", "-f", "int8", "-o", ".", "--force"],  # relative, from inside models/
        ["quantize", src, "-f", "int8", "-o", tmp_path / "link", "--force"],
        ["export", tmp_path / "q", "--to", "compressed-tensors", "-o", tmp_path / "q", "--force"],
        ["export", tmp_path / "q", "--to", "gguf", "-o", tmp_path, "--force"],
    ):
        assert_refused(lighten(*args, cwd=tmp_path / "models"), "input", "another output path")
    assert snapshot(tmp_path) == before


def test_an_unwritable_output_fails_at_once(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    for args in (
        ["quantize", src, "-f", "int8", "-o", tmp_path / "file" / "q"],
        ["export", src, "--to", "gguf", "-o", tmp_path / "file" / "m.gguf"],
        ["inspect", src, "--plot", tmp_path / "file" / "p.png"],
    ):
        assert_refused(lighten(*args), "not a directory")
    assert snapshot(tmp_path) == before
