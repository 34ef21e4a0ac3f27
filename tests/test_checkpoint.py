"""lighten's checkpoint: save → load rebuilds exactly the fake-quantized model, atomically."""

import json
from pathlib import Path

import pytest
import torch
from broken_files import CORRUPTIONS, corrupt
from tiny_models import save_tiny, tiny_tokenizer

from lighten import checkpoint, formats
from lighten.checkpoint import MANIFEST, load, save_checkpoint
from lighten.errors import LightenError, ModelError
from lighten.eval.size import size_report
from lighten.models import load_model
from lighten.plan import make_plan
from lighten.quantize import quantize_weights


def _quantize_and_save(src, out, spec):
    model, _ = load_model(src)
    save_checkpoint(model, quantize_weights(model, make_plan(model, spec)), src, str(src), out)
    return model


def _fake_quantized(model, spec):
    """Independent path: overwrite each planned weight in place with the format's fake-quantized value."""
    fmt = formats.get(spec)
    with torch.no_grad():
        for name in make_plan(model, spec):
            module = model.get_submodule(name.rsplit(".", 1)[0])
            w = module.weight
            transposed = type(module).__name__ == "Conv1D"
            q = fmt.fake_quantize(w.t() if transposed else w)
            w.copy_(q.t() if transposed else q)
    return model


@pytest.mark.parametrize(
    "arch,spec",
    [("llama", "int4:g32"), ("gpt2", "int8:channel"), ("bert", "nf4"), ("qwen2", "mxfp4"), ("llama", "q4_0"),
     ("qwen2", "iq4_nl")],
)  # fmt: skip
def test_round_trip_equals_fake_quantized_model(tmp_path, arch, spec):
    src = save_tiny(arch, tmp_path / "src")
    model = _quantize_and_save(src, tmp_path / "q", spec)
    loaded, tokenizer = load(tmp_path / "q")
    expected = _fake_quantized(model, spec)
    got_state, want_state = loaded.state_dict(), expected.state_dict()
    assert got_state.keys() == want_state.keys()
    for k in want_state:
        torch.testing.assert_close(got_state[k], want_state[k], rtol=0, atol=0, msg=k)
    ids = torch.tensor([tiny_tokenizer()("the model is light and small")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], expected(ids)[0], rtol=0, atol=0)
    if arch == "llama":  # tied embeddings stay tied after loading
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("spec", ["int4:g32", "q4_0", "q8_0", "q5_1"])
def test_checkpoint_is_packed_and_sized_honestly(tmp_path, spec):
    src = save_tiny("llama", tmp_path / "src")
    _quantize_and_save(src, tmp_path / "q", spec)
    manifest = json.loads((tmp_path / "q" / MANIFEST).read_text())
    assert set(manifest["tensors"]) == set(make_plan(load_model(src)[0], spec))
    row = size_report(tmp_path / "q")
    # int4:g32: 4-bit codes + one fp16 scale per group of 32 = 4.5 bits; the rows here are multiples of 32.
    # GGUF types: bytes per block * 8 / block size (q4_0 4.5, q8_0 8.5, q5_1 6), scales inside the blocks.
    assert row["format"] == formats.get(spec).name
    assert row["bits_per_weight"] == pytest.approx(formats.get(spec).bits_per_element)
    assert size_report(src)["bits_per_weight"] == 32
    assert row["weight_bytes"] < size_report(src)["weight_bytes"]


def test_existing_output_is_refused_without_force(tmp_path):
    src = save_tiny("gpt2", tmp_path / "src")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    with pytest.raises(LightenError, match="--force"):
        _quantize_and_save(src, tmp_path / "q", "int8")
    assert (tmp_path / "q" / "keep.txt").read_text() == "mine"


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    src = save_tiny("gpt2", tmp_path / "src")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError):
        _quantize_and_save(src, tmp_path / "out" / "q", "int8")
    assert list((tmp_path / "out").iterdir()) == []


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    src = save_tiny("gpt2", tmp_path / "src")
    _quantize_and_save(src, tmp_path / "q", "int8")
    manifest = json.loads((tmp_path / "q" / MANIFEST).read_text())
    name = next(iter(manifest["tensors"]))
    manifest["tensors"][name]["keys"].append("nonexistent")
    (tmp_path / "q" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="lacks tensor"):
        load(tmp_path / "q")


def _edit_manifest(checkpoint, edit):
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    edit(manifest)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def _first_tensor(manifest):
    return next(iter(manifest["tensors"].values()))


def _rename_first_tensor(manifest, new_name):
    name = next(iter(manifest["tensors"]))
    manifest["tensors"][new_name] = manifest["tensors"].pop(name)


BROKEN_MANIFESTS = {
    "no tensors": (lambda m: m.pop("tensors"), '"tensors"'),
    "tensors a list": (lambda m: m.update(tensors=[]), '"tensors"'),
    "no source": (lambda m: m.pop("source"), '"source"'),
    "source path a number": (lambda m: m["source"].update(path=3), '"source"'),
    "kind unknown": (lambda m: m.update(kind="seq2seq"), '"kind"'),
    "recipe a string": (lambda m: m.update(recipe="int4"), '"recipe"'),
    "no spec": (lambda m: _first_tensor(m).pop("spec"), '"spec"'),
    "unknown spec": (lambda m: _first_tensor(m).update(spec="int9"), "unknown format"),
    "shape of strings": (lambda m: _first_tensor(m).update(shape=["64", "64"]), '"shape"'),
    "negative shape": (lambda m: _first_tensor(m).update(shape=[-1, 64]), '"shape"'),
    "keys a string": (lambda m: _first_tensor(m).update(keys="codes"), '"keys"'),
    "name leaves the folder": (lambda m: _rename_first_tensor(m, "../../etc/passwd"), "dotted module path"),
    "name is absolute": (lambda m: _rename_first_tensor(m, "/etc/passwd"), "dotted module path"),
}


@pytest.mark.parametrize("broken", BROKEN_MANIFESTS)
def test_a_broken_manifest_is_one_clear_error_for_every_reader(tmp_path, broken):
    src = save_tiny("llama", tmp_path / "src")
    _quantize_and_save(src, tmp_path / "q", "int4:g32")
    edit, phrase = BROKEN_MANIFESTS[broken]
    _edit_manifest(tmp_path / "q", edit)
    for reader in (checkpoint.read_manifest, load, size_report):
        with pytest.raises(ModelError, match=f"{tmp_path / 'q' / MANIFEST} is broken: .*{phrase}"):
            reader(tmp_path / "q")


def test_a_manifest_that_is_not_an_object_is_refused(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    _quantize_and_save(src, tmp_path / "q", "int8")
    (tmp_path / "q" / MANIFEST).write_text("[]")
    with pytest.raises(ModelError, match="is broken: it is not a JSON object"):
        load(tmp_path / "q")


def test_a_manifest_that_does_not_fit_the_model_is_refused(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    _quantize_and_save(src, tmp_path / "q", "int4:g32")
    _edit_manifest(tmp_path / "q", lambda m: _first_tensor(m).update(shape=[64, 32]))
    with pytest.raises(ModelError, match=r"of shape \[64, 32\], but the model .* has it in shape \[64, 64\]"):
        load(tmp_path / "q")
    _edit_manifest(tmp_path / "q", lambda m: _rename_first_tensor(m, "model.nothing.weight"))
    with pytest.raises(ModelError, match="names model.nothing.weight .* has no such weight"):
        load(tmp_path / "q")


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_checkpoint_weights_are_one_error_naming_the_file(tmp_path, corruption):
    src = save_tiny("gpt2", tmp_path / "src")
    _quantize_and_save(src, tmp_path / "q", "int8")
    weights = corrupt(tmp_path / "q" / checkpoint.WEIGHTS, corruption)
    for reader in (load, size_report):
        with pytest.raises(ModelError, match=f"{weights} is not a readable safetensors file"):
            reader(tmp_path / "q")


def test_weights_cut_while_being_read_are_one_error_naming_the_file(tmp_path, monkeypatch):
    """safetensors checks a file's size when it opens it; a file cut after that fails only at a read."""
    src = save_tiny("gpt2", tmp_path / "src")
    _quantize_and_save(src, tmp_path / "q", "int8")
    weights = tmp_path / "q" / checkpoint.WEIGHTS
    open_safetensors = checkpoint.open_safetensors

    def open_then_cut(file):
        opened = open_safetensors(file)
        weights.write_bytes(weights.read_bytes()[:1000])
        return opened

    monkeypatch.setattr(checkpoint, "open_safetensors", open_then_cut)
    with pytest.raises(ModelError, match=f"cannot read {weights}"):
        load(tmp_path / "q")


def test_source_is_recorded_absolute_and_builtin_names_stay_names(tmp_path, monkeypatch):
    save_tiny("gpt2", tmp_path / "models" / "src")
    monkeypatch.chdir(tmp_path)
    _quantize_and_save(Path("models/src"), tmp_path / "q", "int8")
    source = checkpoint.read_manifest(tmp_path / "q")["source"]
    assert source == {"model": str(tmp_path / "models" / "src"), "path": str(tmp_path / "models" / "src")}
    model, _ = load_model("models/src")
    save_checkpoint(model, {}, Path("models/src"), "minilm", tmp_path / "named")
    assert checkpoint.read_manifest(tmp_path / "named")["source"]["model"] == "minilm"
