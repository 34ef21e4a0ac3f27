import json

import pytest
import torch
from broken_files import CORRUPTIONS, corrupt
from tiny_models import save_tiny
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from lighten.errors import ModelError
from lighten.models import BUILTIN, load_model, model_kind, open_weights, resolve

TINY = {
    "bert": (
        BertConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        ),
        "BertModel",
        "encoder",
    ),
    "gpt2": (
        GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0),
        "GPT2LMHeadModel",
        "causal",
    ),
    "llama": (
        LlamaConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        ),
        "LlamaForCausalLM",
        "causal",
    ),
}


def tiny_dir(tmp_path, kind: str):
    """A complete HF directory with a random tiny model and a word-level tokenizer."""
    from transformers import AutoModel, AutoModelForCausalLM

    config, _, model_kind_ = TINY[kind]
    auto = AutoModelForCausalLM if model_kind_ == "causal" else AutoModel
    out = tmp_path / kind
    auto.from_config(config).save_pretrained(out)
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", TINY)
def test_any_local_hf_directory_loads(tmp_path, kind):
    path = tiny_dir(tmp_path, kind)
    assert resolve(str(path)) == path
    model, tokenizer = load_model(path)
    _, cls, expected = TINY[kind]
    assert type(model).__name__ == cls and not model.training
    assert model_kind(model) == model_kind(model.config) == expected
    with torch.no_grad():
        model(**tokenizer("hello world", return_tensors="pt"))


def test_model_kind_without_architectures():
    assert model_kind(LlamaConfig()) == "causal"
    assert model_kind(BertConfig()) == "encoder"


def problem(path) -> str:
    with pytest.raises(ModelError) as e:
        load_model(path)
    assert all(name in str(e.value) for name in BUILTIN)  # every resolve error names the built-ins
    return str(e.value)


def test_resolve_errors_say_what_is_wrong(tmp_path):
    assert "neither a built-in model name nor an existing directory" in problem("smollm-135m")
    assert "existing directory" in problem(str(tmp_path / "missing"))
    (tmp_path / "file.gguf").write_bytes(b"")
    assert "is a file" in problem(str(tmp_path / "file.gguf"))
    assert "no config.json" in problem(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert "no weights" in problem(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert "only safetensors" in problem(str(tmp_path))


def test_broken_or_unknown_config_is_a_model_error(tmp_path):
    path = tiny_dir(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    with pytest.raises(ModelError, match="cannot read"):
        load_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        load_model(path)


def test_missing_tokenizer_is_a_model_error(tmp_path):
    path = tiny_dir(tmp_path, "bert")
    for f in path.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(path)


def _edit_weights(path, edit):
    """Rewrite a model directory's model.safetensors with edit(state) applied."""
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_weights_are_refused_not_initialised_at_random(tmp_path):
    path = save_tiny("qwen2", tmp_path / "qwen2")
    _edit_weights(path, lambda state: state.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ModelError, match="missing model.layers.1.mlp.down_proj.weight") as e:
        load_model(path)
    assert "ignore_mismatched_sizes" not in str(e.value)


def test_weights_of_another_shape_are_refused(tmp_path):
    path = save_tiny("gpt2", tmp_path / "gpt2")

    def cut(state):
        name = "transformer.h.0.attn.c_attn.weight"
        state[name] = state[name][:, :-1].clone()

    _edit_weights(path, cut)
    with pytest.raises(ModelError, match=r"wrong shape .*c_attn.weight \[64, 191\] \(config") as e:
        load_model(path)
    assert "ignore_mismatched_sizes" not in str(e.value)


def test_a_tied_lm_head_need_not_be_stored(tmp_path):
    path = save_tiny("llama", tmp_path / "llama")  # ties lm_head to the embeddings, as SmolLM2 does
    model, _ = load_model(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_lighten_checkpoint_is_not_loaded_as_a_plain_model(tmp_path):
    from lighten.checkpoint import MANIFEST, save_checkpoint
    from lighten.plan import make_plan
    from lighten.quantize import quantize_weights

    src = save_tiny("llama", tmp_path / "src")
    model, _ = load_model(src)
    quantized = quantize_weights(model, make_plan(model, "int4:g32"))
    save_checkpoint(model, quantized, src, str(src), tmp_path / "q")
    with pytest.raises(ModelError) as e:
        load_model(tmp_path / "q")
    assert f"(already quantized to int4:g32:sym); quantize its source model {src} instead" in str(e.value)
    (tmp_path / "q" / MANIFEST).unlink()
    with pytest.raises(ModelError, match="looks like a lighten checkpoint .* whose lighten.json is missing"):
        load_model(tmp_path / "q")


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_weights_file_is_one_error_naming_it(tmp_path, corruption):
    path = save_tiny("llama", tmp_path / "llama")
    weights = corrupt(path / "model.safetensors", corruption)
    with pytest.raises(ModelError, match=f"{weights} is not a readable safetensors file"):
        load_model(path)
    with pytest.raises(ModelError, match=f"{weights} is not a readable safetensors file"):
        with open_weights(path):
            pass


class _Unpickled:
    """Unpickling this creates the file `marker`: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_weights_beside_safetensors_are_never_read(tmp_path, monkeypatch):
    import pickle

    path = save_tiny("llama", tmp_path / "llama")
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Unpickled(tmp_path / "unpickled")))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    load_model(path)
    assert not (tmp_path / "unpickled").exists()
    (path / "model.safetensors").unlink()
    assert "only safetensors" in problem(str(path))
    assert not (tmp_path / "unpickled").exists()
