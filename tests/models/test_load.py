import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from lighten.errors import ModelError
from lighten.models import BUILTIN, load_model, model_kind, resolve

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
