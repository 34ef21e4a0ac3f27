"""Loading from the command line: missing, mismatched, corrupt or misplaced files are one `error:` line and
exit status 2 in every command — never a traceback, never a model run on random weights, never an output."""

import json
import shutil

import pytest
from broken_files import corrupt
from cli_helpers import assert_refused
from cli_helpers import lighten as lighten_cli
from safetensors.torch import load_file, save_file
from tiny_models import sample_text, save_tiny

import lighten
from lighten.checkpoint import MANIFEST, WEIGHTS
from lighten.errors import ModelError
from lighten.pipeline import quantize_to_dir
from lighten.recipes import recipe_from_options


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="module")
def checkpoint(src, tmp_path_factory):
    return quantize_to_dir(str(src), "int4:g32", tmp_path_factory.mktemp("checkpoints") / "q")


def copy(directory, tmp_path):
    return shutil.copytree(directory, tmp_path / directory.name)


def test_a_model_missing_a_weight_is_refused(tmp_path, src):
    model = copy(src, tmp_path)
    state = load_file(model / "model.safetensors")
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    result = lighten_cli("quantize", model, "-f", "int4:g32", "-o", tmp_path / "out")
    assert_refused(result, "missing model.layers.0.mlp.up_proj.weight", output=tmp_path / "out")


def test_quantizing_a_checkpoint_is_refused(tmp_path, src, checkpoint):
    result = lighten_cli("quantize", checkpoint, "-f", "int4", "-o", tmp_path / "out")
    assert_refused(
        result,
        "is a lighten checkpoint (already quantized to int4:g32:sym)",
        f"quantize its source model {src} instead",
        output=tmp_path / "out",
    )


def test_a_checkpoint_without_its_manifest_is_named_as_such(tmp_path, checkpoint):
    broken = copy(checkpoint, tmp_path)
    (broken / MANIFEST).unlink()
    result = lighten_cli("quantize", broken, "-f", "int4", "-o", tmp_path / "out")
    assert_refused(
        result, "looks like a lighten checkpoint", "lighten.json is missing", output=tmp_path / "out"
    )


@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "{model}", "-f", "int4:g32", "-o", "{out}"],
        ["eval", "{checkpoint}", "--text", "{text}", "--tokens", 64, "--context", 32],
        ["run", "{checkpoint}", "-p", "the model is"],
        ["inspect", "{checkpoint}", "--text", "{text}", "--tokens", 64, "--plot", "{out}"],
        ["export", "{checkpoint}", "--to", "gguf", "-o", "{out}"],
        ["export", "{checkpoint}", "--to", "compressed-tensors", "-o", "{out}"],
    ],
    ids=["quantize", "eval", "run", "inspect", "export-gguf", "export-compressed-tensors"],
)
def test_a_cut_weights_file_is_one_error_in_every_command(tmp_path, src, checkpoint, command):
    model, broken = copy(src, tmp_path), copy(checkpoint, tmp_path)
    files = {"model": model, "checkpoint": broken, "out": tmp_path / "out", "text": tmp_path / "text.txt"}
    files["text"].write_text(sample_text(200))
    weights = corrupt((model if command[0] == "quantize" else broken) / WEIGHTS, "cut in half")
    result = lighten_cli(*[str(arg).format(**files) for arg in command])
    assert_refused(result, f"{weights} is not a readable safetensors file", output=files["out"])


def test_a_cut_weights_file_is_one_error_in_python(tmp_path, src, checkpoint):
    for directory in (src, checkpoint):
        broken = copy(directory, tmp_path)
        weights = corrupt(broken / WEIGHTS, "cut in half")
        with pytest.raises(ModelError, match=f"{weights} is not a readable safetensors file"):
            lighten.load(broken)


def _edit_manifest(checkpoint, edit):
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    edit(manifest)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def test_a_manifest_naming_a_path_outside_is_refused(tmp_path, checkpoint):
    broken = copy(checkpoint, tmp_path)

    def point_outside(manifest):
        name = next(iter(manifest["tensors"]))
        manifest["tensors"]["../../etc/passwd"] = manifest["tensors"].pop(name)

    _edit_manifest(broken, point_outside)
    result = lighten_cli("export", broken, "--to", "compressed-tensors", "-o", tmp_path / "out")
    assert_refused(result, f"{broken / MANIFEST} is broken", "'../../etc/passwd'", output=tmp_path / "out")
    result = lighten_cli("run", broken, "-p", "the model is")
    assert_refused(result, f"{broken / MANIFEST} is broken", "'../../etc/passwd'")


def test_eval_compares_with_the_source_from_any_folder(tmp_path, src):
    """The source is recorded absolute; an old manifest's relative source is refused, not guessed."""
    (tmp_path / "models").mkdir()
    shutil.copytree(src, tmp_path / "models" / "src")
    result = lighten_cli("quantize", "models/src", "-f", "int4:g32", "-o", "q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "models" / "src").mkdir(parents=True)  # a decoy at the same relative path
    text = tmp_path / "text.txt"
    text.write_text(sample_text(300))
    result = lighten_cli(
        "eval", tmp_path / "q", "--text", text, "--tokens", 64, "--context", 32, "--json", cwd=elsewhere
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["reference"]["name"] == str(tmp_path / "models" / "src")

    _edit_manifest(tmp_path / "q", lambda manifest: manifest["source"].update(model="models/src"))
    result = lighten_cli("eval", tmp_path / "q", "--text", text, cwd=elsewhere)
    assert_refused(result, "relative path 'models/src'", "--reference")
    _edit_manifest(tmp_path / "q", lambda manifest: manifest["source"].update(model="../../etc/passwd"))
    assert_refused(lighten_cli("eval", tmp_path / "q", "--text", text, cwd=elsewhere), "--reference")


@pytest.mark.parametrize("to,runtime", [("compressed-tensors", "vLLM"), ("gguf", "llama.cpp")])
def test_exporting_a_checkpoint_with_online_rotations_is_refused(tmp_path, src, to, runtime):
    recipe = recipe_from_options("int4:g32", surgery=("fold", "rotate"))
    rotated = quantize_to_dir(str(src), recipe, tmp_path / "rotated")
    result = lighten_cli("export", rotated, "--to", to, "-o", tmp_path / "out")
    assert_refused(result, runtime, "cannot run", "--surgery fold,rotate_fused", output=tmp_path / "out")


def test_pickled_weights_are_refused(tmp_path, src):
    model = copy(src, tmp_path)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    result = lighten_cli("quantize", model, "-f", "int4:g32", "-o", tmp_path / "out")
    assert_refused(result, "lighten loads only safetensors", output=tmp_path / "out")


def test_a_recipe_with_a_python_tag_is_refused_without_running_it(tmp_path, src):
    marker = tmp_path / "ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'format: int4\ndescription: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = lighten_cli("quantize", src, "--recipe", recipe, "-o", tmp_path / "out")
    assert_refused(result, f"{recipe} is not valid YAML", output=tmp_path / "out")
    assert not marker.exists()
