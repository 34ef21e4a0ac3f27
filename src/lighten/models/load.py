"""Names and directories → a loaded model and tokenizer.

transformers is imported inside the functions: it takes seconds, and `lighten --help` should not wait."""

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lighten.errors import ModelError
from lighten.models.builtin import BUILTIN, builtin_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")
PACKED_SUFFIXES = (".codes", ".scales")  # how a lighten checkpoint stores each quantized weight
WeightReader = Callable[[str], torch.Tensor | None]  # tensor name -> the tensor, read from a model's files


def resolve(name_or_path: str | Path) -> Path:
    """A HF model directory: a built-in name (made on first use) or a local directory, checked.

    Built-in names win; a local directory called like one is reached as ./minilm."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN:
        return builtin_dir(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        problem = "is neither a built-in model name nor an existing directory"
    elif not path.is_dir():
        problem = "is a file; pass the Hugging Face model directory that holds config.json and the weights"
    elif not (path / "config.json").is_file():
        problem = "has no config.json, so it is not a Hugging Face model directory"
    elif any(path.glob("*.safetensors")):
        return path
    elif any(path.glob("*.bin")):
        # Unpickling a .bin can run arbitrary code; safetensors cannot.
        problem = (
            "has only pickled *.bin weights and lighten loads only safetensors: re-save it with "
            "model.save_pretrained(dir) (safetensors is the default)"
        )
    else:
        problem = "has no weights (*.safetensors)"
    raise ModelError(f"{str(name_or_path)!r} {problem}. Built-in models: {', '.join(BUILTIN)}.")


def model_kind(model_or_config) -> str:
    """What a model is: "causal" for decoder LMs (GPT-2, Llama, ...), "encoder" for BERT-like models."""
    if hasattr(model_or_config, "config"):  # a model: its class says what it is
        config, names = model_or_config.config, [type(model_or_config).__name__]
    else:
        config, names = model_or_config, model_or_config.architectures or []
    if any(n.endswith(("ForConditionalGeneration", "Seq2SeqLM")) for n in names):
        raise ModelError(
            f"{names[0]} is an encoder-decoder or multimodal model; lighten supports encoders "
            "(BERT-like) and causal LMs"
        )
    if names:
        return "causal" if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names) else "encoder"
    # No architectures recorded (a hand-written config): BERT-likes have a masked-LM head, decoders do not.
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    kind = type(config)
    causal = kind in MODEL_FOR_CAUSAL_LM_MAPPING and kind not in MODEL_FOR_MASKED_LM_MAPPING
    return "causal" if causal else "encoder"


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer), model in eval mode: AutoModel for encoders, AutoModelForCausalLM for causal LMs.

    Refuses, rather than initialise at random, any weight the config needs that the files lack or hold in
    another shape; weights tied to another one (a tied lm_head) are not needed in the files."""
    _refuse_checkpoint(resolve(name_or_path))
    path, config, auto, tokenizer = _open(name_or_path)
    for f in sorted(path.glob("*.safetensors")):
        with open_safetensors(f):  # a corrupt file is named here; transformers' own error would not say which
            pass
    try:
        # Mismatched shapes are ignored only to be reported below, in lighten's words.
        with _without_load_report():
            model, info = auto.from_pretrained(
                path,
                config=config,
                dtype=dtype,
                use_safetensors=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load the weights in {path}: {e}") from e
    _require_all_weights(path, info)
    return model.eval(), tokenizer


def _refuse_checkpoint(path: Path) -> None:
    """A lighten checkpoint is not a Hugging Face model: loaded as one, its packed weights would be missing
    and the model random."""
    from lighten.checkpoint import is_checkpoint, read_manifest  # lighten.checkpoint imports this module

    if not is_checkpoint(path):
        return
    manifest = read_manifest(path)
    specs = sorted({info["spec"] for info in manifest["tensors"].values()})
    raise ModelError(
        f"{path} is a lighten checkpoint (already quantized to {', '.join(specs) or 'nothing'}); "
        f"quantize its source model {manifest['source']['model']} instead"
    )


def _require_all_weights(path: Path, info: dict) -> None:
    """Refuse a model some of whose weights transformers initialised at random: missing from the files
    (tied weights are not listed) or stored in another shape than the config says."""
    missing = sorted(info["missing_keys"])
    mismatched = sorted(
        f"{name} {list(stored)} (config: {list(wanted)})" for name, stored, wanted in info["mismatched_keys"]
    )
    if not missing and not mismatched:
        return
    if any(key.endswith(PACKED_SUFFIXES) for key in info["unexpected_keys"]):
        raise ModelError(
            f"{path} looks like a lighten checkpoint (its weights are stored as *.codes / *.scales) whose "
            "lighten.json is missing: copy lighten.json back from where the checkpoint was made, or "
            "quantize the source model again"
        )
    problems = [
        f"{label} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
        for label, names in (("missing", missing), ("wrong shape", mismatched))
        if names
    ]
    raise ModelError(
        f"{path} does not hold the weights its config.json describes ({'; '.join(problems)}): "
        "the weights and config.json must come from the same save_pretrained"
    )


@contextlib.contextmanager
def _without_load_report():
    """transformers logs its own table of missing or mismatched weights, with advice that does not apply to
    lighten (options it does not have); lighten reports them itself. With that log quiet, transformers checks
    a tensor-parallel plan that lighten never uses and logs which layers it "did not shard": quiet too."""
    names = ("modeling_utils", "distributed.tensor_parallel")
    loggers = [logging.getLogger(f"transformers.{name}") for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def open_weights(name_or_path: str | Path) -> Iterator[WeightReader]:
    """read(name): the tensor `name` of a model directory's safetensors files (None if they have no such
    tensor), each read on its own with pread(2). Not mapped: the pages of a mapped file, once touched, count
    in the process's RSS until the file is closed, so reading a whole model through a map holds all of it."""
    with contextlib.ExitStack() as stack:
        files = [
            stack.enter_context(open_safetensors(f))
            for f in sorted(resolve(name_or_path).glob("*.safetensors"))
        ]
        where = {key: f for f in files for key in f.keys()}
        yield lambda name: where[name].get_tensor(name) if name in where else None


def open_safetensors(file: Path):
    """safe_open with pread(2) (see open_weights). safetensors checks the whole header, and that the data
    covers the file exactly, when it opens one: a corrupt, cut or empty file is one ModelError naming it."""
    try:
        return safe_open(file, framework="pt", backend="pread")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{file} is not a readable safetensors file ({e}): re-save or re-download it") from e


def build_model(name_or_path: str | Path):
    """(model, tokenizer) with the directory's architecture but freshly initialised weights, for a caller
    that fills in the weights itself (a quantized checkpoint)."""
    _, config, auto, tokenizer = _open(name_or_path)
    return auto.from_config(config).eval(), tokenizer


def _open(name_or_path: str | Path):
    """Resolve a model directory and read its config, model class and tokenizer."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    # Without these files transformers 5 quietly builds an empty tokenizer that maps every word to unk.
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): "
            "save it beside the weights with tokenizer.save_pretrained(dir)"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(
            f"cannot read {path / 'config.json'} (broken, or a model type this transformers "
            f"does not know): {e}"
        ) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the tokenizer in {path}: {e}") from e
    auto = AutoModelForCausalLM if model_kind(config) == "causal" else AutoModel
    return path, config, auto, tokenizer
